"""``/ws/stream``: the live websocket (flask-sock), wire protocol in ``gateway/wire.py`` and docs/protocol.md.

Before the upgrade (``before_request``): token (401) and Origin allowlist (403) are checked, so a refused
client never gets a socket; permessage-deflate is refused too (JPEG does not compress; inflating costs
CPU and memory). After the upgrade: a session slot (close 4013 when full), then the session loop.

One thread per session (the gunicorn thread running the handler) does everything for it: it reads
client messages, writes frames to Redis and sends what the client must hear. It sleeps on the socket's
event, which simple-websocket sets when a message arrives and ``Session.deliver`` sets when a result
arrives from the pub/sub listener. While it sleeps, the listener thread forwards a result itself if the
socket can take it at once (``StreamSession._direct``); ``Session.lock`` makes the two take turns.
simple-websocket's own reader thread reads the same TLS socket meanwhile: the upgrade hands it a
``gateway.tlssock.SerializedTLSSocket``, so no read and write ever run inside OpenSSL at once.
"""

from __future__ import annotations

import json
import logging
import select
import time
from urllib.parse import urlsplit

import redis
from flask import Blueprint, request
from flask_sock import Sock
from simple_websocket import ConnectionClosed
from wsproto.utilities import LocalProtocolError

from densecap_core import protocol
from densecap_core.imageio import ImageDecodeError, ImageTooLarge, peek_size
from gateway import wire
from gateway.app import error_response, get_state, request_is_authenticated, unauthorized_response
from gateway.sessions import Session, new_session_id
from gateway.tlssock import serialize_environ_socket

log = logging.getLogger("densecap.gateway.stream")

bp = Blueprint("stream", __name__)
sock = Sock()  # used only for its route decorator: routes are registered on ``bp``, not on a global app

#: simple-websocket options. Reads of 64 KiB: a 4 KiB read buffer halves the frame rate, and over TLS
#: with pings on, a small read can leave decrypted bytes unseen by select() until the next ping.
WS_RECEIVE_BYTES = 65536
WS_PING_INTERVAL_S = 25
#: How often the same kind of non-frame error (rate limit, Redis down) is reported to a client.
ERROR_REPORT_EVERY_S = 1.0
#: ``config.query`` (live find): longer than any caption the model writes (15 words), short enough to be cheap.
MAX_QUERY_CHARS = 200


def origin_allowed(origin: str | None, host: str, allowed: tuple[str, ...]) -> bool:
    """Same host as the request, or listed in ``allowed`` (``scheme://host[:port]``, or ``*``).

    A missing Origin is allowed: browsers always send one on websocket handshakes, so its absence means
    a non-browser client, which cross-site websocket hijacking cannot involve (it still needs a token).
    """
    if not origin:
        return True
    origin = origin.rstrip("/").lower()
    if "*" in allowed or origin in (a.rstrip("/").lower() for a in allowed):
        return True
    parts = urlsplit(origin)
    return parts.scheme in ("https", "http") and parts.netloc == host.lower()


def send_text(ws, text: str) -> None:
    """``ws.send`` where a client that went away mid-send raises ``ConnectionClosed``, whatever the layer.

    simple-websocket checks ``ws.connected`` before sending, but its reader thread may take the client's close
    frame (wsproto then refuses to send: ``LocalProtocolError``) or see the connection reset (``OSError``,
    ``ssl.SSLError``) between that check and the write. Either way the client is gone, which is no bug.
    """
    try:
        ws.send(text)
    except (LocalProtocolError, OSError) as exc:
        raise ConnectionClosed(message=f"the connection ended while sending: {exc}") from exc


def close_quietly(ws, code: int, reason: str) -> None:
    """Close ``ws`` with ``code``; a connection that already ended needs no close frame."""
    try:
        ws.close(code, reason)
    except (ConnectionClosed, LocalProtocolError, OSError):
        pass


@bp.before_request
def _check_handshake():
    state = get_state()
    if not request_is_authenticated():
        state.metrics.sessions_refused.labels("unauthorized").inc()
        return unauthorized_response()
    if not origin_allowed(request.headers.get("Origin"), request.host, state.settings.allowed_origins):
        state.metrics.sessions_refused.labels("origin").inc()
        return error_response(403, "forbidden_origin",
                              f"websocket Origin {request.headers.get('Origin')!r} is not allowed: open the page "
                              "from this gateway, or add the origin to DENSECAP_ALLOWED_ORIGINS")
    if request.headers.get("Upgrade", "").lower() != "websocket":
        return error_response(400, "not_websocket", "this endpoint speaks websocket only (subprotocol densecap.v1)")
    request.environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)
    # simple-websocket reads on its own thread while this session sends: serialize their TLS calls
    serialize_environ_socket(request.environ)
    return None


def server_options(settings) -> dict:
    """``SOCK_SERVER_OPTIONS`` for flask-sock (set on the app by ``create_app``)."""
    return {
        "subprotocols": [wire.SUBPROTOCOL],
        "receive_bytes": WS_RECEIVE_BYTES,
        "ping_interval": WS_PING_INTERVAL_S,
        "max_message_size": settings.max_message_bytes,
    }


@sock.route("/ws/stream", bp=bp)
def stream(ws):
    state = get_state()
    session = Session(sid=new_session_id(), wake=ws.event)
    if not state.sessions.admit(session):
        state.metrics.sessions_refused.labels("server_full").inc()
        try:
            send_text(ws, json.dumps(wire.error("server_full", f"the gateway is at its limit of "
                                                f"{state.sessions.limit} live sessions; retry in a few seconds")))
        except ConnectionClosed:
            return
        close_quietly(ws, wire.CLOSE_SERVER_FULL, "server full")
        return
    state.metrics.sessions_total.inc()
    state.metrics.sessions_active.inc()
    state.router.ensure_started()
    try:
        StreamSession(ws, session, state).run()
    except ConnectionClosed:
        raise  # the client went away: flask-sock ends the request quietly
    except Exception:  # a bug must cost this session a 1011 close, not an HTTP 500 written into the websocket
        log.exception("live session %s failed", session.sid)
        try:
            ws.close(wire.CLOSE_INTERNAL, "internal error")
        except Exception:  # noqa: BLE001 - the socket may be gone already, or in any state after a bug
            pass
    finally:
        state.sessions.remove(session.sid)
        state.metrics.sessions_active.dec()
        try:  # the session is gone: don't let a worker spend time on its last frame
            state.redis.delete(protocol.frame_slot_key(session.sid))
        except redis.RedisError:
            pass


class TokenBucket:
    """Per-session rate limit: ``rate`` frames/s sustained, bursts up to ``burst`` frames."""

    def __init__(self, rate: float, burst: float):
        self.rate, self.burst = rate, burst
        self.tokens, self.t = burst, time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class StreamSession:
    """The loop of one live session. Runs on the session's handler thread only."""

    def __init__(self, ws, session: Session, state):
        self.ws, self.session, self.state = ws, session, state
        s = state.settings
        self.settings = s
        self.metrics = state.metrics
        self.ingest = protocol.FrameIngest(state.redis, s.frame_ttl_s)
        self.bucket = TokenBucket(s.max_fps_per_session, burst=max(2.0, s.max_fps_per_session / 2))
        self.max_regions: int | None = None
        self.query: str | None = None  # live find: the phrase to look for in every frame (docs/protocol.md)
        self.last_seq: int | None = None  # newest frame written to the slot and not known to be taken
        self.last_ts: float | None = None
        self._last_report: dict[str, float] = {}

    # --- sending (this thread only) -------------------------------------------------------------

    def send(self, msg: dict) -> None:
        send_text(self.ws, json.dumps(msg, separators=(",", ":")))

    def report(self, code: str, message: str, seq: int | None = None, throttle: bool = False) -> None:
        if throttle:
            now = time.monotonic()
            if now - self._last_report.get(code, -1e9) < ERROR_REPORT_EVERY_S:
                return
            self._last_report[code] = now
        self.send(wire.error(code, message, seq))

    # --- the loop -------------------------------------------------------------------------------

    def run(self) -> None:
        with self.session.lock:
            self.send(wire.hello(self.session.sid, self.limits(), self._worker_count()))
        self.session.direct = self._direct
        try:
            while self.ws.connected:
                if self.state.shutting_down.is_set():
                    with self.session.lock:
                        close_quietly(self.ws, wire.CLOSE_GOING_AWAY, "gateway restarting")
                    return
                self.session.wake.wait(timeout=1.0)
                self.session.wake.clear()
                with self.session.lock:
                    self._drain_input()
                    for raw in self.session.take_all():
                        self._forward(raw)
        finally:
            self.session.direct = None

    def _direct(self, raw: bytes) -> bool:
        """On the listener thread, with ``session.lock`` held: forward ``raw`` now if sending cannot block.

        A result is a few KB and the socket takes it at once unless the client has stopped reading (its
        buffers full): then decline, and the handler thread sends it (and waits, alone). Once sending has
        begun the result counts as delivered, whatever happens.
        """
        sock = getattr(self.ws, "sock", None)
        try:
            if sock is None or not self.ws.connected or not select.select((), (sock,), (), 0)[1]:
                return False
        except (OSError, ValueError):  # closed under us: the handler thread finds out by itself
            return False
        try:
            self._forward(raw)
        except ConnectionClosed:
            pass  # the client went away while we sent: the handler thread ends the session
        except Exception:  # noqa: BLE001 - must not reach the listener thread, which serves every session
            log.exception("forwarding a result to live session %s failed", self.session.sid)
        return True

    def limits(self) -> dict:
        s = self.settings
        return {"max_message_bytes": s.max_message_bytes, "max_pixels": s.max_stream_pixels,
                "max_fps": s.max_fps_per_session, "frame_ttl_ms": int(s.frame_ttl_s * 1000),
                "max_frame_age_ms": int(s.max_frame_age_s * 1000)}

    def _worker_count(self) -> int | None:
        try:
            return protocol.live_worker_count(self.state.redis, time.time())
        except redis.RedisError:
            return None

    def _drain_input(self) -> None:
        """Handle every message that arrived; of several queued frames only the newest goes to Redis."""
        newest = None
        while True:
            msg = self.ws.receive(timeout=0)
            if msg is None:
                break
            if isinstance(msg, str):
                self._control(msg)
                continue
            frame = self._accept_frame(msg)
            if frame is None:
                continue
            if newest is not None:  # an older frame that never reached Redis: newest frame wins
                self.metrics.frames_dropped.labels("replaced").inc()
                self.send({"type": "dropped", "seq": newest[1], "ts": newest[2], "reason": "replaced"})
            newest = frame
        if newest is not None:
            self._store(*newest)

    def _accept_frame(self, msg: bytes):
        """Check one binary message; ``(t_in, seq, ts, w, h, image)`` or ``None`` after reporting why not."""
        t_in = time.time()
        self.metrics.frames_in.inc()
        try:
            seq, ts, image = wire.unpack_client_frame(msg)
        except wire.HeaderError as exc:
            self.metrics.frames_dropped.labels("bad_header").inc()
            self.report("bad_header", f"{exc}; see docs/protocol.md", throttle=True)
            return None
        if not self.bucket.take():
            self.metrics.frames_dropped.labels("rate_limited").inc()
            self.report("rate_limited", f"more than {self.settings.max_fps_per_session:g} frames/s: frames are "
                        "being dropped; keep at most one or two frames in flight", seq, throttle=True)
            return None
        try:
            w, h = peek_size(image)
        except ImageDecodeError as exc:
            self.metrics.frames_dropped.labels("bad_image").inc()
            self.report("bad_image", f"frame {seq}: {exc}", seq)
            return None
        except ImageTooLarge as exc:  # a header Pillow will not even open (a decompression bomb)
            self.metrics.frames_dropped.labels("too_large").inc()
            self.report("too_large", f"frame {seq}: {exc}", seq)
            return None
        if w * h > self.settings.max_stream_pixels:
            self.metrics.frames_dropped.labels("too_large").inc()
            self.report("too_large", f"frame {seq} is {w}x{h}; at most {self.settings.max_stream_pixels} pixels "
                        "per frame are allowed: scale it down before sending", seq)
            return None
        return t_in, seq, ts, w, h, image

    def _store(self, t_in: float, seq: int, ts: float, w: int, h: int, image: memoryview) -> None:
        meta = {"seq": seq, "ts": ts, "t_in": t_in, "w": w, "h": h}
        if self.max_regions is not None:
            meta["max_regions"] = self.max_regions
        if self.query is not None:
            meta["query"] = self.query
        try:
            replaced, _ = self.ingest.ingest(self.session.sid, meta, bytes(image))
        except redis.RedisError:
            self.metrics.frames_dropped.labels("redis_unavailable").inc()
            self.report("unavailable", "the frame queue is unreachable; frames are dropped until it is back "
                        "(the gateway reconnects by itself)", seq, throttle=True)
            return
        if replaced and self.last_seq is not None:
            self.metrics.frames_dropped.labels("replaced").inc()
            self.send({"type": "dropped", "seq": self.last_seq, "ts": self.last_ts, "reason": "replaced"})
        self.last_seq, self.last_ts = seq, ts

    def _control(self, text: str) -> None:
        try:
            msg = json.loads(text)
            kind = msg.get("type") if isinstance(msg, dict) else None
        except (ValueError, RecursionError):  # RecursionError: deeply nested arrays, a few hundred KB of '['
            kind = None
        if kind == "ping":
            self.send({"type": "pong", "t": msg.get("t")})
        elif kind == "config":
            self._config(msg)
        else:
            self.report("bad_message", "text messages must be JSON objects with type 'config' or 'ping'; "
                        "frames are binary (see docs/protocol.md)", throttle=True)

    def _config(self, msg: dict) -> None:
        """Apply the fields a config message carries (all or none of them), then echo the session's settings."""
        n, query = msg.get("max_regions", self.max_regions), msg.get("query", self.query)
        if not (n is None or (isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 1000)):
            self.report("bad_message", "config.max_regions must be an integer from 1 to 1000, or null")
            return
        if not (query is None or (isinstance(query, str) and len(query) <= MAX_QUERY_CHARS)):
            self.report("bad_message", f"config.query must be a phrase of at most {MAX_QUERY_CHARS} characters, "
                        "or null to stop finding")
            return
        self.max_regions, self.query = n, (query.strip() or None) if isinstance(query, str) else None
        self.send({"type": "config", "max_regions": self.max_regions, "query": self.query})

    def _forward(self, raw: bytes) -> None:
        """Send one worker message to the client, observing its timings."""
        try:
            msg = protocol.decode_message(raw)
            if not isinstance(msg, dict):
                raise ValueError("not a JSON object")
        except ValueError:
            log.warning("ignored an unreadable message on session %s's result channel", self.session.sid)
            return
        t_in = msg.pop("t_in", None)
        seq = msg.get("seq")
        if seq is not None and seq == self.last_seq:
            self.last_seq = None  # taken by a worker: a later overwrite of the slot drops nothing of it
        kind = msg.get("type")
        if kind == "result":
            timings = msg.setdefault("timings", {})
            m = self.metrics
            for key, hist in (("queue_ms", m.queue_wait), ("decode_ms", m.decode_time),
                              ("inference_ms", m.inference_time)):
                if key in timings:
                    hist.observe(timings[key] / 1000.0)
            if "batch_size" in timings:
                m.batch_size.observe(timings["batch_size"])
            if t_in is not None:
                server_s = max(0.0, time.time() - t_in)
                timings["server_ms"] = round(server_s * 1000.0, 3)
                m.e2e.observe(server_s)
            m.results_out.inc()
        elif kind == "dropped":
            self.metrics.frames_dropped.labels(msg.get("reason", "stale")).inc()
        elif kind == "error" and msg.get("code") == "bad_image":
            self.metrics.frames_dropped.labels("bad_image").inc()
        self.send(msg)
