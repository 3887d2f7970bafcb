/*
 * DenseCap results viewer (the original view_results.html, rebuilt; no external assets).
 *
 * Data: <data_dir>/results.json in the original format
 *   {"results": [{"img_name", "boxes": [[x, y, w, h], ...], "scores", "captions"}], "opt": {...}}
 * with boxes in pixels of the image file <data_dir>/<img_name> (see docs/formats.md). data_dir comes from
 * the URL (?data_dir=...) and defaults to "data", which is where `densecap view DIR` serves DIR.
 *
 * The image is drawn at its natural size into an SVG whose viewBox is that size, so boxes need no
 * scaling and the whole picture shrinks to fit the window. Captions and file names are inserted as
 * text (never as HTML): they come from files and models we do not control.
 *
 * For tests and scripts, #canvas carries data-index, data-shown and data-image once an image is drawn.
 */
(function () {
  "use strict";

  // Same palette and order as densecap_core/render.py (the original's WAD_COLORS).
  const PALETTE = [
    [173, 35, 25], [42, 75, 215], [87, 87, 87], [29, 105, 20], [129, 74, 25], [129, 197, 122],
    [157, 175, 255], [41, 208, 208], [255, 146, 51], [255, 238, 51], [233, 222, 187], [255, 205, 243],
    [0, 0, 0],
  ];
  const SVG_NS = "http://www.w3.org/2000/svg";
  const DEFAULT_BOXES = 10;

  const state = {
    dataDir: dataDirFromUrl(),
    results: [],
    index: 0,
    toShow: DEFAULT_BOXES,
    inlineText: false,
    drawGeneration: 0, // a newer draw cancels an older one whose image is still loading
  };

  const el = (id) => document.getElementById(id);

  function dataDirFromUrl() {
    const dir = new URLSearchParams(window.location.search).get("data_dir") || "data";
    return dir.replace(/\/+$/, "") || ".";
  }

  function rgb(colour) {
    return `rgb(${colour[0]}, ${colour[1]}, ${colour[2]})`;
  }

  function colourFor(rank) {
    return PALETTE[rank % PALETTE.length];
  }

  // Black or white, whichever contrasts more with the colour (WCAG relative luminance).
  function textColourOn(colour) {
    const lin = colour.map((c) => {
      const v = c / 255;
      return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4);
    });
    const luminance = 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2];
    return luminance > 0.179 ? "#000" : "#fff";
  }

  function showMessage(text) {
    const box = el("message");
    box.textContent = text;
    box.hidden = !text;
  }

  // One image's detections as objects, best score first (the original sorted too).
  function detections(record) {
    const boxes = record.boxes || [];
    const scores = record.scores || [];
    const captions = record.captions || [];
    const out = boxes.map((box, i) => ({
      box: box.map(Number),
      score: i < scores.length ? Number(scores[i]) : 0,
      caption: i < captions.length ? String(captions[i]) : "",
    }));
    out.sort((a, b) => b.score - a.score);
    return out;
  }

  async function load() {
    // A random query string defeats caches, so a re-run shows its new results (the original's ?sigh=).
    const url = `${state.dataDir}/results.json?sigh=${Math.floor(Math.random() * 1e9)}`;
    let doc;
    try {
      const response = await fetch(url, { cache: "no-store" });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      doc = await response.json();
    } catch (err) {
      showMessage(`Could not load ${state.dataDir}/results.json (${err.message}). Write one with ` +
        "`densecap caption --input-dir IMAGES --output-vis-dir DIR`, then run `densecap view DIR`.");
      return;
    }
    state.results = Array.isArray(doc.results) ? doc.results : [];
    if (!state.results.length) {
      showMessage("results.json holds no images.");
    }
    draw();
  }

  function updateStatus(record, shown) {
    const n = state.results.length;
    el("counter").textContent = `image ${n ? state.index + 1 : 0}/${n}`;
    el("box-count").textContent = `${shown} box${shown === 1 ? "" : "es"}`;
    el("img-name").textContent = record ? record.img_name : "";
    el("toggle-text").setAttribute("aria-pressed", String(state.inlineText));
  }

  function svgElement(name, attrs) {
    const node = document.createElementNS(SVG_NS, name);
    for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
    return node;
  }

  function drawCaptionList(shownDetections) {
    const list = el("captions");
    list.replaceChildren();
    shownDetections.forEach((det, rank) => {
      const item = document.createElement("li");
      item.className = "caption";
      item.style.color = rgb(colourFor(rank));
      item.textContent = det.caption;
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = det.score.toFixed(2);
      item.appendChild(score);
      list.appendChild(item);
    });
  }

  // A caption on a strip filled with the box colour: above the box if it fits, else inside; kept in the image.
  function drawLabel(svg, det, rank, width, height) {
    const colour = colourFor(rank);
    const fontSize = Math.max(10, Math.round(Math.max(width, height) / 32));
    const pad = Math.max(1, Math.round(fontSize / 6));
    const group = svgElement("g", { class: "label" });
    const background = svgElement("rect", { fill: rgb(colour) });
    const text = svgElement("text", { class: "label-text", "font-size": fontSize, fill: textColourOn(colour) });
    text.textContent = det.caption;
    group.append(background, text);
    svg.appendChild(group);
    const textWidth = text.getComputedTextLength();
    const stripW = Math.min(width, textWidth + 2 * pad);
    const stripH = fontSize * 1.25 + 2 * pad;
    const [x, y] = det.box;
    let top = y - stripH >= 0 ? y - stripH : y;
    top = Math.max(0, Math.min(top, height - stripH));
    const left = Math.max(0, Math.min(x, width - stripW));
    background.setAttribute("x", left);
    background.setAttribute("y", top);
    background.setAttribute("width", stripW);
    background.setAttribute("height", stripH);
    text.setAttribute("x", left + pad);
    text.setAttribute("y", top + pad);
  }

  function drawOverlay(svg, shownDetections, width, height) {
    const strokeWidth = Math.max(2, Math.round(Math.max(width, height) / 90)); // 8 at 720 px, as the original
    // Worst first so the best box is painted on top.
    for (let rank = shownDetections.length - 1; rank >= 0; rank--) {
      const [x, y, w, h] = shownDetections[rank].box;
      svg.appendChild(svgElement("rect", {
        class: "box", "data-rank": rank, x, y, width: Math.max(0, w), height: Math.max(0, h),
        stroke: rgb(colourFor(rank)), "stroke-width": strokeWidth,
      }));
    }
    if (state.inlineText) {
      for (let rank = shownDetections.length - 1; rank >= 0; rank--) {
        drawLabel(svg, shownDetections[rank], rank, width, height);
      }
    }
  }

  function draw() {
    const record = state.results[state.index];
    const svg = el("canvas");
    const generation = ++state.drawGeneration;
    if (!record) {
      svg.replaceChildren();
      updateStatus(null, 0);
      return;
    }
    const all = detections(record);
    const shown = all.slice(0, Math.max(0, state.toShow));
    updateStatus(record, shown.length);
    drawCaptionList(shown);
    const src = `${state.dataDir}/${encodeURIComponent(record.img_name)}`;
    const picture = new Image();
    picture.onload = () => {
      if (generation !== state.drawGeneration) return;
      const width = picture.naturalWidth;
      const height = picture.naturalHeight;
      svg.replaceChildren();
      svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
      svg.setAttribute("width", width);
      svg.setAttribute("height", height);
      svg.appendChild(svgElement("image", { href: src, x: 0, y: 0, width, height }));
      drawOverlay(svg, shown, width, height);
      showMessage("");
      svg.dataset.index = String(state.index);
      svg.dataset.image = record.img_name;
      svg.dataset.shown = String(shown.length);
    };
    picture.onerror = () => {
      if (generation !== state.drawGeneration) return;
      svg.replaceChildren();
      showMessage(`Could not load the image ${src}.`);
      svg.dataset.index = String(state.index);
      svg.dataset.image = record.img_name;
      svg.dataset.shown = "0";
    };
    picture.src = src;
  }

  function step(delta) {
    const n = state.results.length;
    if (!n) return;
    state.index = (state.index + delta + n) % n;
    draw();
  }

  function changeBoxes(delta) {
    const record = state.results[state.index];
    const available = record ? (record.boxes || []).length : 0;
    // Never count past what this image has, so 's' takes effect at once after many 'w's.
    state.toShow = Math.max(0, Math.min(Math.min(state.toShow, available) + delta, available));
    draw();
  }

  function toggleText() {
    state.inlineText = !state.inlineText;
    draw();
  }

  function randomImage() {
    const n = state.results.length;
    if (n < 2) return;
    let next = state.index;
    while (next === state.index) next = Math.floor(Math.random() * n);
    state.index = next;
    draw();
  }

  const ACTIONS = {
    a: () => step(-1),
    d: () => step(1),
    w: () => changeBoxes(1),
    s: () => changeBoxes(-1),
    t: toggleText,
    r: randomImage,
  };

  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const action = ACTIONS[event.key.toLowerCase()];
    if (action) {
      event.preventDefault();
      action();
    }
  });
  el("prev").addEventListener("click", ACTIONS.a);
  el("next").addEventListener("click", ACTIONS.d);
  el("more").addEventListener("click", ACTIONS.w);
  el("fewer").addEventListener("click", ACTIONS.s);
  el("toggle-text").addEventListener("click", ACTIONS.t);
  el("random").addEventListener("click", ACTIONS.r);

  load();
})();
