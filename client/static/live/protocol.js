// The densecap.v1 websocket protocol, browser side (docs/protocol.md is the reference).
//
// Connection: one websocket to /ws/stream with reconnect and exponential backoff. The token travels
// as the subprotocol "token.<t>" next to "densecap.v1" (browsers cannot set an Authorization header on
// a websocket, and a subprotocol stays out of URLs and access logs).

export const SUBPROTOCOL = "densecap.v1";
const MAGIC = [0x44, 0x43, 0x46, 0x31]; // "DCF1"
export const HEADER_BYTES = 16;

// Close codes the gateway documents. 1006 is what a browser reports when the handshake itself was
// refused (HTTP 401/403): the page checks the token over HTTPS to tell those apart.
export const CLOSE_REASONS = {
  1000: "closed",
  1001: "the gateway is restarting",
  1008: "connection timed out (no pong)",
  1009: "a frame was larger than the gateway allows: lower the frame size or JPEG quality",
  1011: "internal error in the gateway",
  4013: "the gateway is full (too many live sessions): retrying",
};

/** The 16-byte frame header: magic, seq (u32 BE), client timestamp in ms (f64 BE). */
export function frameHeader(seq, tsMs) {
  const buf = new ArrayBuffer(HEADER_BYTES);
  const view = new DataView(buf);
  MAGIC.forEach((b, i) => view.setUint8(i, b));
  view.setUint32(4, seq >>> 0, false);
  view.setFloat64(8, tsMs, false);
  return buf;
}

export function wsUrl(path = "/ws/stream") {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}${path}`;
}

/**
 * A websocket that reconnects with backoff until stop() is called.
 * Callbacks: onOpen(), onMessage(obj), onClose({code, reason, willRetryInMs}).
 */
export class Connection {
  constructor({ token, onOpen, onMessage, onClose, url = wsUrl() }) {
    this.token = token;
    this.url = url;
    this.onOpen = onOpen || (() => {});
    this.onMessage = onMessage || (() => {});
    this.onClose = onClose || (() => {});
    this.ws = null;
    this.attempt = 0;
    this.stopped = true;
    this.timer = null;
  }

  start() {
    this.stopped = false;
    this.attempt = 0;
    this._open();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    if (this.ws) this.ws.close(1000, "client stopped");
    this.ws = null;
  }

  get ready() {
    return this.ws !== null && this.ws.readyState === WebSocket.OPEN;
  }

  get bufferedAmount() {
    return this.ws ? this.ws.bufferedAmount : 0;
  }

  send(data) {
    if (this.ready) this.ws.send(data);
  }

  sendJson(obj) {
    this.send(JSON.stringify(obj));
  }

  /** The session said hello: the connection is healthy, so the next outage starts a fresh backoff. */
  resetBackoff() {
    this.attempt = 0;
  }

  _open() {
    const protocols = [SUBPROTOCOL];
    if (this.token) protocols.push("token." + this.token);
    const ws = new WebSocket(this.url, protocols);
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    ws.onopen = () => this.onOpen();
    ws.onmessage = (ev) => {
      if (typeof ev.data !== "string") return; // the server sends JSON text only
      let msg;
      try {
        msg = JSON.parse(ev.data);
      } catch (e) {
        return;
      }
      this.onMessage(msg);
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return; // an older socket, already replaced
      this.ws = null;
      let retry = null;
      if (!this.stopped) {
        // 0.5 s, 1 s, 2 s ... capped at 10 s, with jitter so many clients do not return in lockstep.
        const base = Math.min(10000, 500 * 2 ** this.attempt);
        retry = Math.round(base * (0.75 + Math.random() * 0.5));
        this.attempt += 1;
        this.timer = setTimeout(() => this._open(), retry);
      }
      this.onClose({ code: ev.code, reason: ev.reason, willRetryInMs: retry });
    };
  }
}
