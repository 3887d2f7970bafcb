#!/usr/bin/env python
"""Load and soak test of the live path: many well-behaved websocket sessions for a fixed time, while the
gateway's /healthz latency and the memory (RSS) of the gateway and workers are sampled.

    .venv/bin/python scripts/soak.py --duration 600 --sessions 16          # own stack: redis, gateway, 1 worker
    .venv/bin/python scripts/soak.py --duration 3600 --sessions 32 --fps 10 --json soak.json
    .venv/bin/python scripts/soak.py --gateway https://host:8443 --token T --duration 600 --sessions 24 \\
        --watch gateway=<gunicorn master pid> --watch worker=<worker pid>   # a running deployment

Each session is a ``LiveSession`` thread that behaves like the browser client (docs/protocol.md, *Flow
control*): one frame in flight, settled by its ``result``/``dropped``/``error`` or after an in-flight timeout
(1.5 s), reconnect with exponential backoff and jitter after any close but 1000 (reset on ``hello``). Every
session sends frames of its own size, so a result that belongs to another session is counted (``cross_talk``).
``--over-cap N`` opens N more sessions once all are connected and records how they are refused (with
``--sessions`` equal to the gateway's cap they must get ``server_full`` and close 4013).

At the end it prints the figures and, with ``--json``, writes them; the exit status is 1 when a bound is broken
(``--max-health-ms``, ``--max-rss-growth-mb``, any cross-talk, a session without results). The tests
(tests/test_reliability_load.py) run it for seconds against their own stack; run it for hours by hand.
Machine load (``os.getloadavg``) is recorded, since figures from a busy machine mean little.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import random
import ssl
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.wire import pack_client_frame  # noqa: E402  (torch-free)

#: Same as the browser client: a frame without an answer for this long is given up.
INFLIGHT_TIMEOUT_S = 1.5
BACKOFF_S = (0.5, 10.0)
#: Close codes after which the browser client does not reconnect.
NO_RECONNECT = {1000}


def _insecure() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def percentile(values, q: float) -> float | None:
    s = sorted(values)
    if not s:
        return None
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def jpeg_frame(width: int, height: int, shade: int = 0) -> bytes:
    """A small JPEG of this exact size (a gradient, so it is a real photo-like encode, not one flat block)."""
    from PIL import Image
    im = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    im = Image.merge("RGB", [im.getchannel(0), im.getchannel(1).point(lambda v: (v + shade) % 256),
                             im.getchannel(2).point(lambda v: 255 - v)])
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=80)
    return buf.getvalue()


def recv_message(ws, timeout: float):
    """One message from ``ws``: a dict (JSON text), an int (the close code), or None after ``timeout`` s."""
    import websocket
    ws.settimeout(max(0.01, timeout))
    while True:
        try:
            opcode, data = ws.recv_data(control_frame=True)
        except websocket.WebSocketTimeoutException:
            return None
        if opcode == websocket.ABNF.OPCODE_TEXT:
            return json.loads(data)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            return int.from_bytes(data[:2], "big") if len(data) >= 2 else 1005


# --- one session ---------------------------------------------------------------------------------------------


@dataclass
class SessionStats:
    results: int = 0
    dropped: int = 0
    timeouts: int = 0
    errors: collections.Counter = field(default_factory=collections.Counter)
    cross_talk: int = 0
    connects: int = 0
    reconnects: int = 0
    #: seconds from losing a working connection to the next hello, per reconnect
    reconnect_s: list = field(default_factory=list)
    connect_failures: int = 0
    closes: collections.Counter = field(default_factory=collections.Counter)
    workers: collections.Counter = field(default_factory=collections.Counter)
    rtt_ms: list = field(default_factory=list)
    #: monotonic times of results (bounded), for gaps and recovery times
    result_times: collections.deque = field(default_factory=lambda: collections.deque(maxlen=200_000))


class LiveSession(threading.Thread):
    """A live client that behaves like the browser page; counts what happens to every frame.

    ``frame`` is the JPEG it sends (always the same bytes); results must report ``size`` = (width, height)
    or they count as cross-talk. ``fps=None`` sends the next frame as soon as the last one settled.
    """

    RTT_KEEP = 100_000

    def __init__(self, url: str, token: str, frame: bytes, size: tuple[int, int], *, fps: float | None = 10.0,
                 inflight_timeout_s: float = INFLIGHT_TIMEOUT_S, reconnect: bool = True, name: str = ""):
        super().__init__(daemon=True, name=name or "live-session")
        self.url, self.token, self.frame, self.size = url, token, frame, size
        self.fps, self.inflight_timeout_s, self.reconnect = fps, inflight_timeout_s, reconnect
        self.stats = SessionStats()
        self.stop_event = threading.Event()
        self.hello = threading.Event()  # set on each hello (cleared while disconnected)
        self.session_id: str | None = None
        self.ws = None
        self.seq = 0
        self._lock = threading.Lock()
        self._lost_at: float | None = None

    # --- observation helpers (any thread) --------------------------------------------------------------

    def first_result_after(self, t: float) -> float | None:
        """Monotonic time of the first result received after ``t``, if any."""
        with self._lock:
            return next((x for x in self.stats.result_times if x > t), None)

    def max_gap(self, t0: float, t1: float) -> float:
        """The longest time without a result within [t0, t1] (t1 - t0 if there was none)."""
        with self._lock:
            times = [x for x in self.stats.result_times if t0 < x <= t1]
        edges = [t0, *times, t1]
        return max(b - a for a, b in zip(edges, edges[1:]))

    def results_after(self, t: float) -> int:
        with self._lock:
            return sum(1 for x in self.stats.result_times if x > t)

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        self.join(timeout)

    # --- the client ------------------------------------------------------------------------------------

    def run(self) -> None:
        backoff = BACKOFF_S[0]
        while not self.stop_event.is_set():
            close_code = self._connect_and_stream()
            if self.stop_event.is_set() or not self.reconnect or close_code in NO_RECONNECT:
                break
            if self.hello.is_set():  # that connection had worked: start a fresh backoff, time the outage
                backoff = BACKOFF_S[0]
                self._lost_at = time.monotonic()
            self.hello.clear()
            # Exponential backoff with jitter, as the browser page does.
            self.stop_event.wait(backoff * (0.5 + random.random() / 2))
            backoff = min(BACKOFF_S[1], backoff * 2)

    def _connect_and_stream(self) -> int | None:
        import websocket
        try:
            ws = websocket.create_connection(self.url, timeout=10, sslopt={"cert_reqs": ssl.CERT_NONE},
                                             subprotocols=["densecap.v1", f"token.{self.token}"])
        except Exception:  # refused, reset, 401, gateway down: all mean "try again later"
            self.stats.connect_failures += 1
            return None
        self.ws = ws
        self.stats.connects += 1
        try:
            msg = recv_message(ws, 10.0)
            if isinstance(msg, int):
                self.stats.closes[msg] += 1
                return msg
            if msg is None or msg.get("type") != "hello":
                if msg and msg.get("type") == "error":
                    self.stats.errors[msg.get("code")] += 1
                    code = recv_message(ws, 5.0)  # server_full is followed by its close code
                    if isinstance(code, int):
                        self.stats.closes[code] += 1
                        return code
                return None
            self.session_id = msg.get("session")
            if self._lost_at is not None:
                self.stats.reconnects += 1
                self.stats.reconnect_s.append(time.monotonic() - self._lost_at)
                self._lost_at = None
            self.hello.set()
            return self._stream(ws)
        except Exception:
            return None
        finally:
            try:
                ws.close(timeout=1)
            except Exception:
                pass

    def _stream(self, ws) -> int | None:
        interval = 1.0 / self.fps if self.fps else 0.0
        next_send = time.monotonic()
        while not self.stop_event.is_set():
            now = time.monotonic()
            if next_send > now:
                if self.stop_event.wait(next_send - now):
                    return 1000
            next_send = max(next_send + interval, time.monotonic()) if interval else 0.0
            self.seq += 1
            seq = self.seq
            sent = time.monotonic()
            ws.send_binary(pack_client_frame(seq, time.time() * 1000, self.frame))
            code = self._await(ws, seq, sent)
            if code is not None:
                return code
        return 1000

    def _await(self, ws, seq: int, sent: float) -> int | None:
        """Wait for frame ``seq`` to settle; returns a close code if the connection closed."""
        deadline = sent + self.inflight_timeout_s
        while True:
            msg = recv_message(ws, deadline - time.monotonic())
            if msg is None:
                self.stats.timeouts += 1
                return None
            if isinstance(msg, int):
                self.stats.closes[msg] += 1
                return msg
            kind = msg.get("type")
            if kind == "result":
                self._on_result(msg, sent if msg.get("seq") == seq else None)
            elif kind == "dropped":
                self.stats.dropped += 1
            elif kind == "error":
                self.stats.errors[msg.get("code")] += 1
            if msg.get("seq") == seq and kind in ("result", "dropped", "error"):
                return None

    def _on_result(self, msg: dict, sent: float | None) -> None:
        now = time.monotonic()
        if (msg.get("width"), msg.get("height")) != tuple(self.size):
            self.stats.cross_talk += 1
            return
        with self._lock:
            self.stats.results += 1
            self.stats.result_times.append(now)
        self.stats.workers[msg.get("worker")] += 1
        if sent is not None and len(self.stats.rtt_ms) < self.RTT_KEEP:
            self.stats.rtt_ms.append((now - sent) * 1000)


def make_sessions(url: str, token: str, n: int, *, base_size=(192, 144), **kwargs) -> list[LiveSession]:
    """``n`` sessions, each sending frames of a size no other session uses."""
    out = []
    for k in range(n):
        size = (base_size[0] + 8 * k, base_size[1])
        out.append(LiveSession(url, token, jpeg_frame(*size, shade=k * 17), size, name=f"live-{k}", **kwargs))
    return out


def probe_over_cap(url: str, token: str, n: int) -> list[dict]:
    """Open ``n`` more sessions and record each first message's code and the close code that follows."""
    import websocket
    out = []
    for _ in range(n):
        rec: dict = {}
        try:
            ws = websocket.create_connection(url, timeout=10, sslopt={"cert_reqs": ssl.CERT_NONE},
                                             subprotocols=["densecap.v1", f"token.{token}"])
        except Exception as exc:
            out.append({"connect_error": exc.__class__.__name__})
            continue
        try:
            first = recv_message(ws, 10)
            rec["first"] = first.get("code") or first.get("type") if isinstance(first, dict) else first
            rec["close"] = recv_message(ws, 10) if isinstance(first, dict) and first.get("type") == "error" else None
        finally:
            ws.close()
        out.append(rec)
    return out


# --- probes of the server --------------------------------------------------------------------------------------


class HealthProbe(threading.Thread):
    """``GET /healthz`` every ``every_s``: latency and status of each call (a timeout counts as status 0)."""

    def __init__(self, base: str, every_s: float = 0.5, timeout_s: float = 10.0):
        super().__init__(daemon=True, name="health-probe")
        self.url, self.every_s, self.timeout_s = base.rstrip("/") + "/healthz", every_s, timeout_s
        self.samples: list[tuple[float, float, int]] = []  # (monotonic time, ms, status)
        self.stop_event = threading.Event()

    def run(self) -> None:
        ctx = _insecure()
        while not self.stop_event.is_set():
            t0 = time.monotonic()
            try:
                with urllib.request.urlopen(self.url, context=ctx, timeout=self.timeout_s) as r:
                    r.read()
                    status = r.status
            except urllib.error.HTTPError as e:
                status = e.code
            except OSError:
                status = 0
            self.samples.append((t0, (time.monotonic() - t0) * 1000, status))
            self.stop_event.wait(max(0.0, self.every_s - (time.monotonic() - t0)))

    def stop(self) -> None:
        self.stop_event.set()
        self.join(self.timeout_s + 2)


def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children[ppid].append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_rss_mb(root: int) -> float:
    """Resident memory of ``root`` and its descendants, in MiB (0 when the process is gone)."""
    total_kb = 0
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total_kb += int(line.split()[1])
                        break
        except OSError:
            continue
    return total_kb / 1024


class RssSampler(threading.Thread):
    def __init__(self, watch: dict[str, int], every_s: float = 1.0):
        super().__init__(daemon=True, name="rss-sampler")
        self.watch, self.every_s = watch, every_s
        self.samples: dict[str, list[tuple[float, float]]] = {name: [] for name in watch}
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            now = time.monotonic()
            for name, pid in self.watch.items():
                self.samples[name].append((now, tree_rss_mb(pid)))
            self.stop_event.wait(self.every_s)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(5)

    def summary(self) -> dict[str, dict[str, float]]:
        out = {}
        for name, series in self.samples.items():
            values = [v for _, v in series if v > 0]
            if not values:
                continue
            half = max(1, len(values) // 2)
            out[name] = {"start_mb": round(values[0], 1), "max_mb": round(max(values), 1),
                         "end_mb": round(values[-1], 1),
                         # peak of the second half minus peak of the first: a leak raises the peaks; a model's
                         # per-batch sawtooth (allocations freed and reused) does not
                         "growth_mb": round(max(values[half:] or values) - max(values[:half]), 1),
                         # about 20 points over the run, for plots and eyes
                         "series_mb": [round(v, 1) for v in values[::max(1, len(values) // 20)]]}
        return out


# --- a run -----------------------------------------------------------------------------------------------------


def run_load(base: str, token: str, *, sessions: int, duration_s: float, fps: float | None, over_cap: int = 0,
             watch: dict[str, int] | None = None, warmup_s: float = 3.0) -> dict:
    """Run the sessions for ``duration_s`` after a warm-up; returns the figures (see ``main`` for the keys)."""
    url = base.replace("https://", "wss://").rstrip("/") + "/ws/stream"
    load_start = os.getloadavg()
    clients = make_sessions(url, token, sessions, fps=fps)
    health = HealthProbe(base)
    health.start()
    for c in clients:
        c.start()
    deadline = time.monotonic() + 60
    for c in clients:
        c.hello.wait(max(0.0, deadline - time.monotonic()))
    connected = sum(c.hello.is_set() for c in clients)
    refusals = probe_over_cap(url, token, over_cap) if over_cap else []
    time.sleep(warmup_s)
    rss = RssSampler(watch or {})
    rss.start()
    t0 = time.monotonic()
    t_before = {id(c): c.stats.results for c in clients}
    time.sleep(duration_s)
    measured = time.monotonic() - t0
    per_session = [c.stats.results - t_before[id(c)] for c in clients]
    for c in clients:
        c.stop_event.set()
    for c in clients:
        c.join(15)
    rss.stop()
    health.stop()
    during = [s for s in health.samples if s[0] >= t0 - warmup_s]
    lat = [ms for _, ms, _ in during]
    rtts = [x for c in clients for x in c.stats.rtt_ms]
    errors = collections.Counter()
    closes = collections.Counter()
    workers = collections.Counter()
    for c in clients:
        errors.update(c.stats.errors)
        closes.update(c.stats.closes)
        workers.update(c.stats.workers)
    return {
        "sessions": sessions, "connected": connected, "duration_s": round(measured, 1), "fps_per_session": fps,
        "results": sum(per_session), "results_per_s": round(sum(per_session) / measured, 1),
        "min_results_per_session": min(per_session) if per_session else 0,
        "rtt_ms_p50": _r(percentile(rtts, 50)), "rtt_ms_p99": _r(percentile(rtts, 99)),
        "timeouts": sum(c.stats.timeouts for c in clients), "dropped": sum(c.stats.dropped for c in clients),
        "errors": dict(errors), "closes": {str(k): v for k, v in closes.items()},
        "cross_talk": sum(c.stats.cross_talk for c in clients),
        "reconnects": sum(c.stats.reconnects for c in clients),
        "reconnect_s_max": _r(max((x for c in clients for x in c.stats.reconnect_s), default=None)),
        "workers": dict(workers),
        "over_cap": refusals,
        "health": {"n": len(lat), "p50_ms": _r(percentile(lat, 50)), "p99_ms": _r(percentile(lat, 99)),
                   "max_ms": _r(max(lat) if lat else None),
                   "statuses": dict(collections.Counter(str(s) for _, _, s in during))},
        "rss": rss.summary(),
        "loadavg_start": [round(x, 2) for x in load_start], "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
    }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def check(fig: dict, max_health_ms: float, max_rss_growth_mb: float) -> list[str]:
    """The bounds a run must keep; returns what was broken."""
    problems = []
    if fig["connected"] < fig["sessions"]:
        problems.append(f"only {fig['connected']} of {fig['sessions']} sessions connected")
    if fig["min_results_per_session"] == 0:
        problems.append("a session got no result at all")
    if fig["cross_talk"]:
        problems.append(f"{fig['cross_talk']} results reached the wrong session")
    if fig["health"]["max_ms"] is None or fig["health"]["max_ms"] > max_health_ms:
        problems.append(f"/healthz took {fig['health']['max_ms']} ms (bound {max_health_ms:g})")
    if fig["health"]["statuses"].get("0"):
        problems.append(f"/healthz did not answer {fig['health']['statuses']['0']} time(s)")
    for name, r in fig["rss"].items():
        if r["growth_mb"] > max_rss_growth_mb:
            problems.append(f"{name} memory grew {r['growth_mb']} MiB (bound {max_rss_growth_mb:g})")
    for rec in fig["over_cap"]:
        if rec.get("first") != "server_full" or rec.get("close") != 4013:
            problems.append(f"a session over the cap was not refused with server_full + 4013: {rec}")
    return problems


def start_local_stack(args):
    """redis-server + gateway + one stream worker with a tiny random model (scripts/bench_stream.py's Deployment)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_stream import Deployment
    from densecap_core.checkpoint import make_random_checkpoint
    ckpt = args.checkpoint or str(make_random_checkpoint(Path(tempfile.mkdtemp(prefix="soak-ckpt-")) / "random.pt"))
    d = Deployment(ckpt, args.device, args.threads, batch_size=8, batch_wait_ms=4.0)
    d.env["DENSECAP_MAX_SESSIONS"] = str(args.sessions)
    d.env["DENSECAP_MAX_FPS_PER_SESSION"] = "30"
    d.start()
    return d


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gateway", help="https://host:port of a running gateway (default: start a local stack)")
    p.add_argument("--token", default=os.environ.get("DENSECAP_TOKEN", ""), help="API token for --gateway")
    p.add_argument("--watch", action="append", default=[], metavar="NAME=PID",
                   help="sample the RSS of this process and its children (repeatable)")
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--duration", type=float, default=300.0, help="seconds measured (after a warm-up)")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--fps", type=float, default=10.0, help="frames/s each session offers (0: as fast as answered)")
    p.add_argument("--over-cap", type=int, default=0, help="extra sessions that must be refused (needs --sessions = cap)")
    p.add_argument("--max-health-ms", type=float, default=2000.0)
    p.add_argument("--max-rss-growth-mb", type=float, default=50.0,
                   help="bound on each watched process's peak RSS in the second half over the first")
    p.add_argument("--checkpoint", help="local stack: checkpoint (default: a tiny random-weight model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write the figures to this file")
    args = p.parse_args(argv)

    deployment = None
    watch = dict(w.split("=", 1) for w in args.watch)
    watch = {k: int(v) for k, v in watch.items()}
    try:
        if args.gateway:
            base, token = args.gateway, args.token
        else:
            deployment = start_local_stack(args)
            base, token = f"https://127.0.0.1:{deployment.port}", deployment.token
            watch.update({"gateway": deployment.procs[1].pid, "worker": deployment.procs[2].pid,
                          "redis": deployment.procs[0].pid})
        fig = run_load(base, token, sessions=args.sessions, duration_s=args.duration, fps=args.fps or None,
                       over_cap=args.over_cap, watch=watch, warmup_s=args.warmup)
    finally:
        if deployment:
            deployment.stop()
    problems = check(fig, args.max_health_ms, args.max_rss_growth_mb)
    fig["problems"] = problems
    print(json.dumps(fig, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=1))
    for line in problems:
        print(f"soak: {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
