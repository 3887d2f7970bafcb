// Boxes and captions over the live video.
//
// Tracker: keeps colours stable from frame to frame by matching each new box to the previous frame's
// boxes by IoU (greedy, best pairs first), and smooths matched boxes a little, like the temporal
// smoothing of the original DenseCap webcam demo. Overlay: draws onto a canvas laid over a <video>
// shown with object-fit: contain.

const PALETTE = [
  "#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
  "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324", "#fffac8", "#800000", "#aaffc3",
];

/** Black or white text, whichever reads better on the hex colour ``bg``. */
function textColour(bg) {
  const n = parseInt(bg.slice(1), 16);
  const lum = 0.299 * ((n >> 16) & 255) + 0.587 * ((n >> 8) & 255) + 0.114 * (n & 255);
  return lum > 140 ? "#000" : "#fff";
}

/** IoU of two [x, y, w, h] boxes. */
export function iou(a, b) {
  const x1 = Math.max(a[0], b[0]);
  const y1 = Math.max(a[1], b[1]);
  const x2 = Math.min(a[0] + a[2], b[0] + b[2]);
  const y2 = Math.min(a[1] + a[3], b[1] + b[3]);
  const inter = Math.max(0, x2 - x1) * Math.max(0, y2 - y1);
  const union = a[2] * a[3] + b[2] * b[3] - inter;
  return union > 0 ? inter / union : 0;
}

export class Tracker {
  constructor({ matchIou = 0.3, smoothing = 0.5 } = {}) {
    this.matchIou = matchIou;
    this.smoothing = smoothing; // weight of the previous box when a region is matched
    this.tracks = []; // {box, color, caption, score}
    this.nextColor = 0;
  }

  reset() {
    this.tracks = [];
  }

  /** regions: [{box, caption, score}] in frame pixels. Returns tracks with stable colours. */
  update(regions) {
    const pairs = [];
    regions.forEach((r, i) =>
      this.tracks.forEach((t, j) => {
        const v = iou(r.box, t.box);
        if (v >= this.matchIou) pairs.push([v, i, j]);
      }),
    );
    pairs.sort((p, q) => q[0] - p[0]);
    const matchOf = new Map();
    const usedTracks = new Set();
    for (const [, i, j] of pairs) {
      if (matchOf.has(i) || usedTracks.has(j)) continue;
      matchOf.set(i, j);
      usedTracks.add(j);
    }
    const inUse = new Set([...usedTracks].map((j) => this.tracks[j].color));
    const next = regions.map((r, i) => {
      if (matchOf.has(i)) {
        const prev = this.tracks[matchOf.get(i)];
        const a = this.smoothing;
        const box = r.box.map((v, k) => a * prev.box[k] + (1 - a) * v);
        return { box, color: prev.color, caption: r.caption, score: r.score };
      }
      let color = this.nextColor % PALETTE.length;
      for (let k = 0; k < PALETTE.length && inUse.has(color); k++) color = (color + 1) % PALETTE.length;
      this.nextColor = color + 1;
      inUse.add(color);
      return { box: r.box.slice(), color, caption: r.caption, score: r.score };
    });
    this.tracks = next;
    return next;
  }
}

/** Where the video's picture sits inside its element (object-fit: contain letterboxing). */
export function contentRect(video) {
  const cw = video.clientWidth;
  const ch = video.clientHeight;
  const vw = video.videoWidth || cw;
  const vh = video.videoHeight || ch;
  const scale = Math.min(cw / vw, ch / vh);
  const w = vw * scale;
  const h = vh * scale;
  return { x: (cw - w) / 2, y: (ch - h) / 2, w, h };
}

export class Overlay {
  constructor(canvas, video) {
    this.canvas = canvas;
    this.video = video;
    this.ctx = canvas.getContext("2d");
    this.drawn = []; // what the last draw() put on screen, for tests and the caption list
    this.found = null; // the find box of the last draw(), if any
  }

  clear() {
    this._fit();
    this.ctx.clearRect(0, 0, this.canvas.width, this.canvas.height);
    this.drawn = [];
    this.found = null;
  }

  _fit() {
    const dpr = window.devicePixelRatio || 1;
    const w = Math.round(this.video.clientWidth * dpr);
    const h = Math.round(this.video.clientHeight * dpr);
    if (this.canvas.width !== w || this.canvas.height !== h) {
      this.canvas.width = w;
      this.canvas.height = h;
    }
    return dpr;
  }

  /** tracks: from Tracker.update, in pixels of a frame of size frameW x frameH; found: {box, label} drawn
   *  over them in white, thicker and dashed (the live find), or null. */
  draw(tracks, frameW, frameH, found = null) {
    const dpr = this._fit();
    const ctx = this.ctx;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, this.canvas.width, this.canvas.height);
    const rect = contentRect(this.video);
    const sx = (rect.w / frameW) * dpr;
    const sy = (rect.h / frameH) * dpr;
    const fontPx = Math.max(11, Math.round(13 * dpr));
    ctx.font = `${fontPx}px system-ui, sans-serif`;
    ctx.textBaseline = "top";
    this.drawn = [];
    // Draw the lowest-scoring first so the best boxes and labels end up on top.
    for (const t of [...tracks].reverse()) {
      const [x, y, w, h] = t.box;
      const px = rect.x * dpr + x * sx;
      const py = rect.y * dpr + y * sy;
      const colour = PALETTE[t.color];
      ctx.lineWidth = Math.max(2, 2 * dpr);
      ctx.strokeStyle = colour;
      ctx.strokeRect(px, py, w * sx, h * sy);
      const label = t.caption;
      const tw = ctx.measureText(label).width + 6 * dpr;
      const th = fontPx + 4 * dpr;
      const ly = py >= th ? py - th : py; // above the box when there is room
      ctx.fillStyle = colour;
      ctx.fillRect(px, ly, tw, th);
      ctx.fillStyle = textColour(colour);
      ctx.fillText(label, px + 3 * dpr, ly + 2 * dpr);
      this.drawn.push({ box: t.box, caption: t.caption, score: t.score, color: colour });
    }
    this.drawn.reverse();
    this.found = null;
    if (found) {
      const [x, y, w, h] = found.box;
      const px = rect.x * dpr + x * sx;
      const py = rect.y * dpr + y * sy;
      ctx.lineWidth = Math.max(4, 4 * dpr);
      ctx.setLineDash([8 * dpr, 4 * dpr]);
      ctx.strokeStyle = "#fff";
      ctx.strokeRect(px, py, w * sx, h * sy);
      ctx.setLineDash([]);
      const tw = ctx.measureText(found.label).width + 6 * dpr;
      const th = fontPx + 4 * dpr;
      const ly = py + h * sy + th <= this.canvas.height ? py + h * sy : py; // below the box when there is room
      ctx.fillStyle = "#fff";
      ctx.fillRect(px, ly, tw, th);
      ctx.fillStyle = "#000";
      ctx.fillText(found.label, px + 3 * dpr, ly + 2 * dpr);
      this.found = { box: found.box, label: found.label };
    }
  }
}

export { PALETTE };
