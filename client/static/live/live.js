// DenseCap Live: webcam -> JPEG frames over wss -> captions drawn over the video.
//
// Flow control: at most 1 (optionally 2) frames in flight. A frame is "settled" by its result, or a
// "dropped"/"error" message naming its seq, or after IN_FLIGHT_TIMEOUT_MS; only then is the next frame
// captured. So a slow worker lowers the frame rate instead of building a queue, and what is drawn is
// never older than one round trip.
//
// Find: a phrase typed under "Find" is sent as config.query; each result then names the region where the
// model would most readily say it (find.best, with its log p), drawn in white when log p is above
// FIND_MIN_LOG_PROB and reported as "not in view" below it (docs/protocol.md, *Find*).
//
// For tests and debugging, window.densecapLive exposes the state, and <body> carries data-state,
// data-results, data-boxes and data-find (found | absent | error | empty).

import { CLOSE_REASONS, Connection, frameHeader } from "./protocol.js";
import { Overlay, PALETTE, Tracker } from "./overlay.js";

const IN_FLIGHT_TIMEOUT_MS = 1500;
const TICK_MS = 50;
// Below this log p the best region is not taken for the phrase. On 200 held-out scenes, 98.5% of "a <colour>
// <shape>" queries that found their object scored above it, and 5% of queries for a colour and shape absent
// from the scene did (scripts/measure_search.py; docs/model.md, *Search*).
const FIND_MIN_LOG_PROB = -6;

const $ = (id) => document.getElementById(id);
const ui = {
  video: $("video"), overlay: $("overlay"), status: $("status"), start: $("start"), stop: $("stop"),
  flip: $("flip"), camera: $("camera"), token: $("token"), size: $("size"), quality: $("quality"),
  qualityOut: $("qualityOut"), boxes: $("boxes"), boxesOut: $("boxesOut"), inflight: $("inflight"),
  fps: $("fps"), latency: $("latency"), server: $("server"), captions: $("captions"), query: $("query"),
  find: $("find"),
};

const state = {
  running: false,
  session: null,
  stream: null,
  conn: null,
  facing: "user",
  seq: 0,
  inFlight: new Map(), // seq -> {sentAt}
  capturing: false,
  lastSentAt: 0,
  maxFps: 30,
  lastDrawnSeq: -1,
  lastFrameSize: null,
  results: 0,
  resultTimes: [],
  rtts: [],
  serverMs: [],
  lastError: null,
  find: null, // the last result's find: {query, best|error}
};

const tracker = new Tracker();
const overlay = new Overlay(ui.overlay, ui.video);
const grab = document.createElement("canvas");

// --- status -------------------------------------------------------------------------------------

function setStatus(kind, text) {
  document.body.dataset.state = kind;
  ui.status.textContent = text;
}

// --- token: from the URL fragment (#token=...), kept in sessionStorage, never in the URL -----------

function loadToken() {
  const params = new URLSearchParams(location.hash.slice(1));
  const fromHash = params.get("token");
  if (fromHash) {
    sessionStorage.setItem("densecap-token", fromHash);
    history.replaceState(null, "", location.pathname + location.search); // keep it out of history
  }
  ui.token.value = sessionStorage.getItem("densecap-token") || "";
}

async function tokenAccepted(token) {
  try {
    const r = await fetch("/auth/check", { headers: { Authorization: "Bearer " + token }, cache: "no-store" });
    return r.status !== 401;
  } catch (e) {
    return true; // the gateway is unreachable: the websocket retry loop will say so
  }
}

// --- camera -------------------------------------------------------------------------------------

async function openCamera() {
  if (state.stream) state.stream.getTracks().forEach((t) => t.stop());
  const deviceId = ui.camera.value;
  const video = deviceId
    ? { deviceId: { exact: deviceId }, width: { ideal: 1280 }, height: { ideal: 720 } }
    : { facingMode: state.facing, width: { ideal: 1280 }, height: { ideal: 720 } };
  state.stream = await navigator.mediaDevices.getUserMedia({ audio: false, video });
  ui.video.srcObject = state.stream;
  await ui.video.play();
  await listCameras();
}

async function listCameras() {
  const devices = (await navigator.mediaDevices.enumerateDevices()).filter((d) => d.kind === "videoinput");
  const current = ui.camera.value;
  ui.camera.replaceChildren(new Option("Default", ""));
  devices.forEach((d, i) => ui.camera.add(new Option(d.label || `Camera ${i + 1}`, d.deviceId)));
  ui.camera.value = devices.some((d) => d.deviceId === current) ? current : "";
}

// --- start / stop -------------------------------------------------------------------------------

async function start() {
  if (state.running || ui.start.disabled) return;
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    setStatus("error", "No camera access here: open this page over https (or on localhost).");
    return;
  }
  ui.start.disabled = true; // no second start while this one awaits the token check and the camera
  const fail = (text) => {
    ui.start.disabled = false;
    setStatus("error", text);
  };
  const token = ui.token.value.trim();
  sessionStorage.setItem("densecap-token", token);
  if (!(await tokenAccepted(token))) {
    fail("The API token was rejected: paste the gateway's token (see its state directory).");
    return;
  }
  try {
    setStatus("connecting", "Opening camera…");
    await openCamera();
  } catch (e) {
    fail(`Camera unavailable (${e.name}): allow camera access, or pick another camera.`);
    return;
  }
  state.running = true;
  ui.stop.disabled = false;
  setStatus("connecting", "Connecting…");
  state.conn = new Connection({ token, onOpen, onMessage, onClose });
  state.conn.start();
}

function stop() {
  state.running = false;
  if (state.conn) state.conn.stop();
  state.conn = null;
  if (state.stream) state.stream.getTracks().forEach((t) => t.stop());
  state.stream = null;
  ui.video.srcObject = null;
  state.inFlight.clear();
  tracker.reset();
  overlay.clear();
  ui.captions.replaceChildren();
  ui.start.disabled = false;
  ui.stop.disabled = true;
  setStatus("idle", "Stopped");
}

// --- connection events --------------------------------------------------------------------------

function onOpen() {
  setStatus("connecting", "Connected, waiting for the session…");
}

function onClose({ code, reason, willRetryInMs }) {
  state.inFlight.clear();
  state.session = null;
  if (!state.running) return;
  const why = CLOSE_REASONS[code] || reason || `connection lost (code ${code})`;
  const retry = willRetryInMs != null ? `; reconnecting in ${(willRetryInMs / 1000).toFixed(1)} s` : "";
  setStatus("connecting", why + retry);
  if (code === 1006 && ui.token.value) {
    // A refused handshake (401/403) shows up as 1006: find out which and stop retrying if it is the token.
    tokenAccepted(ui.token.value.trim()).then((ok) => {
      if (!ok && state.running) {
        stop();
        setStatus("error", "The API token was rejected: paste the gateway's token.");
      }
    });
  }
}

function onMessage(msg) {
  switch (msg.type) {
    case "hello":
      state.session = msg.session;
      state.maxFps = (msg.limits && msg.limits.max_fps) || 30;
      state.conn.resetBackoff();
      state.conn.sendJson({ type: "config", max_regions: +ui.boxes.value, query: currentQuery() });
      setStatus("streaming", msg.stream_workers === 0 ? "Connected — no stream worker is running yet" : "Streaming");
      break;
    case "result":
      settle(msg.seq);
      onResult(msg);
      break;
    case "dropped":
      settle(msg.seq);
      break;
    case "error":
      if (msg.seq != null) settle(msg.seq);
      state.lastError = msg;
      if (msg.code !== "bad_image") setStatus("streaming", `Server: ${msg.message}`);
      break;
    default:
      break; // config echo, pong
  }
  pump();
}

function settle(seq) {
  const entry = state.inFlight.get(seq);
  state.inFlight.delete(seq);
  return entry ? performance.now() - entry.sentAt : null;
}

// --- results ------------------------------------------------------------------------------------

function onResult(msg) {
  const now = performance.now();
  state.results += 1;
  state.resultTimes.push(now);
  const sent = msg.ts != null ? performance.timeOrigin + now - msg.ts : null;
  if (sent != null && sent >= 0) push(state.rtts, sent);
  if (msg.timings && msg.timings.server_ms != null) push(state.serverMs, msg.timings.server_ms);
  if (msg.seq <= state.lastDrawnSeq) return; // an older frame's answer arrived late: skip it
  state.lastDrawnSeq = msg.seq;
  state.lastFrameSize = [msg.width, msg.height];
  const regions = msg.regions.slice(0, +ui.boxes.value);
  const tracks = tracker.update(regions);
  state.find = msg.find || null;
  overlay.draw(tracks, msg.width, msg.height, foundRegion());
  renderCaptions();
  renderFind();
  document.body.dataset.results = String(state.results);
  document.body.dataset.boxes = String(overlay.drawn.length);
}

function currentQuery() {
  return ui.query.value.trim() || null;
}

/** The find result worth drawing: the best region, if likely enough and for the phrase now in the box. */
function foundRegion() {
  const f = state.find;
  if (!f || !f.best || f.query !== currentQuery() || f.best.log_prob < FIND_MIN_LOG_PROB) return null;
  return { box: f.best.box, label: `${f.query} (log p ${f.best.log_prob.toFixed(1)})` };
}

function renderFind() {
  const f = state.find;
  let kind = "";
  let text = "";
  if (f && f.query === currentQuery()) {
    if (f.error) [kind, text] = ["error", f.error];
    else if (foundRegion()) [kind, text] = ["found", `Found “${f.query}”: the white box (log p ${f.best.log_prob.toFixed(1)})`];
    else [kind, text] = ["absent", `“${f.query}” is not in view`];
  }
  document.body.dataset.find = kind || "empty";
  ui.find.textContent = text;
}

function sendQuery() {
  state.find = null;
  renderFind();
  if (state.conn && state.conn.ready) state.conn.sendJson({ type: "config", query: currentQuery() });
}

function push(list, v, keep = 60) {
  list.push(v);
  if (list.length > keep) list.shift();
}

function renderCaptions() {
  ui.captions.replaceChildren(
    ...overlay.drawn.map((d) => {
      const li = document.createElement("li");
      const sw = document.createElement("span");
      sw.className = "swatch";
      sw.style.background = d.color;
      li.append(sw, d.caption);
      return li;
    }),
  );
}

function median(list) {
  if (!list.length) return null;
  const s = [...list].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
}

function renderStats() {
  const now = performance.now();
  state.resultTimes = state.resultTimes.filter((t) => now - t < 2000);
  ui.fps.textContent = (state.resultTimes.length / 2).toFixed(1);
  const rtt = median(state.rtts);
  const srv = median(state.serverMs);
  ui.latency.textContent = rtt == null ? "–" : Math.round(rtt);
  ui.server.textContent = srv == null ? "–" : Math.round(srv);
}

// --- capture and send ---------------------------------------------------------------------------

function pump() {
  if (!state.running || !state.conn || !state.conn.ready || !state.session || state.capturing) return;
  const now = performance.now();
  for (const [seq, e] of state.inFlight) {
    if (now - e.sentAt > IN_FLIGHT_TIMEOUT_MS) state.inFlight.delete(seq); // lost: stop waiting for it
  }
  if (state.inFlight.size >= +ui.inflight.value) return;
  if (state.conn.bufferedAmount > 0) return; // the last frame is still leaving: don't pile up
  const video = ui.video;
  if (video.readyState < 2 || !video.videoWidth) return;
  if (now - state.lastSentAt < 1000 / state.maxFps) return; // stay under the gateway's rate limit

  const long = +ui.size.value;
  const scale = Math.min(1, long / Math.max(video.videoWidth, video.videoHeight));
  grab.width = Math.round(video.videoWidth * scale);
  grab.height = Math.round(video.videoHeight * scale);
  grab.getContext("2d").drawImage(video, 0, 0, grab.width, grab.height);
  const seq = ++state.seq;
  const ts = performance.timeOrigin + performance.now();
  state.capturing = true;
  state.lastSentAt = now;
  grab.toBlob(
    (blob) => {
      state.capturing = false;
      if (!blob || !state.running || !state.conn || !state.conn.ready) return;
      state.conn.send(new Blob([frameHeader(seq, ts), blob]));
      state.inFlight.set(seq, { sentAt: performance.now() });
    },
    "image/jpeg",
    +ui.quality.value,
  );
}

// --- wiring -------------------------------------------------------------------------------------

ui.start.addEventListener("click", start);
ui.stop.addEventListener("click", stop);
ui.flip.addEventListener("click", async () => {
  state.facing = state.facing === "user" ? "environment" : "user";
  ui.camera.value = "";
  if (state.running) await openCamera().catch((e) => setStatus("error", `Camera unavailable (${e.name})`));
});
ui.camera.addEventListener("change", () => {
  if (state.running) openCamera().catch((e) => setStatus("error", `Camera unavailable (${e.name})`));
});
ui.quality.addEventListener("input", () => (ui.qualityOut.value = (+ui.quality.value).toFixed(2)));
ui.boxes.addEventListener("input", () => {
  ui.boxesOut.value = ui.boxes.value;
  if (state.conn && state.conn.ready) state.conn.sendJson({ type: "config", max_regions: +ui.boxes.value });
});
let queryTimer = null;
ui.query.addEventListener("input", () => {
  clearTimeout(queryTimer);
  queryTimer = setTimeout(sendQuery, 300); // once typing pauses, not on every key
});
ui.query.addEventListener("change", () => {
  clearTimeout(queryTimer);
  sendQuery();
});
window.addEventListener("resize", () => {
  if (state.lastFrameSize) overlay.draw(tracker.tracks, ...state.lastFrameSize, foundRegion());
});
setInterval(pump, TICK_MS);
setInterval(renderStats, 500);
loadToken();

window.densecapLive = {
  start,
  stop,
  get state() {
    return state;
  },
  get drawn() {
    return overlay.drawn;
  },
  get found() {
    return overlay.found;
  },
  palette: PALETTE,
};
