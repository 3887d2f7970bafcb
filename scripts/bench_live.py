#!/usr/bin/env python
"""Capacity of the live path itself: the whole path with a benchmark-only ZERO-COST model.

    nice -n 10 .venv/bin/python scripts/bench_live.py                                  # 16 sessions, 2 workers
    nice -n 10 .venv/bin/python scripts/bench_live.py --sessions 1,4,16,64 --stream-workers 1,2 \\
        --json docs/img/live_capacity.json --plot docs/img/live_capacity.png             # docs/benchmarks.md

What runs, all on this machine: a real redis-server, ``python -m gateway`` (gunicorn gthread over TLS,
``--gateway-workers`` processes) and N stream workers whose "model" is ``worker.testing.zero_cost_predictor``
(each frame is decoded - the pixel check then the pixels, ``--decoder torchvision`` by default - and gets a
result with no regions). Load: S websocket sessions over wss, each keeping one frame in flight (what
docs/protocol.md asks of clients), spread over ``--client-procs`` processes on the same cores.

The zero-cost workers are started by this script only (``--serve-zero-cost-worker``); the production worker
has no setting that selects that model. They are named ``BENCHMARK-zero-cost:...`` in the heartbeat set and in
the ``worker`` field of every result, and this script refuses results from any other worker.

Per point (sessions x stream workers) it reports: frames/s (results received in the measured window),
round trip p50/p99, added latency p50/p99 (round trip minus the worker's decode of that frame), fairness
(min/max of the per-session result rates), mean batch, the CPU each part used per frame (from /proc), and
the load average.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_stream import free_port, percentile, wait_until  # noqa: E402
from gateway.wire import pack_client_frame  # noqa: E402  (torch-free)

ZERO_COST_PREFIX = "BENCHMARK-zero-cost"  # worker.testing.ZERO_COST_WORKER_PREFIX, without importing torch here
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: A frame without any reply within this time counts as lost and the session sends its next frame.
REPLY_TIMEOUT_S = 5.0
#: py-spy sampling flags (--profile): only samples holding the GIL show where Python time goes.
PYSPY_MODE = os.environ.get("BENCH_PYSPY_MODE", "--gil").split()


# --- frames ------------------------------------------------------------------------------------


def make_frames(width: int = 640, height: int = 480, target_kb: float = 45.0, n: int = 4) -> list[bytes]:
    """``n`` distinct JPEGs of the test elephant at ``width x height``, quality picked to be near ``target_kb``."""
    from PIL import Image, ImageOps

    base = Image.open(ROOT / "tests" / "data" / "elephant.jpg").convert("RGB")
    base = ImageOps.fit(base, (width, height))
    variants = [base, ImageOps.mirror(base), base.rotate(2), ImageOps.autocontrast(base), base.rotate(-2),
                ImageOps.mirror(base.rotate(1))][:n]

    def encode(im, q):
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=q)
        return buf.getvalue()

    q = min(range(30, 96, 2), key=lambda q: abs(len(encode(base, q)) - target_kb * 1024))
    return [encode(im, q) for im in variants]


# --- processes ---------------------------------------------------------------------------------


class Deployment:
    """redis-server + gateway + zero-cost stream workers, each in its own process group."""

    def __init__(self, gateway_workers: int, decoder: str, batch_size: int, batch_wait_ms: float,
                 max_sessions: int):
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-live-"))
        self.port, self.redis_port = free_port(), free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.decoder = decoder
        self.env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
                        DENSECAP_REDIS_URL=f"redis://127.0.0.1:{self.redis_port}/0",
                        DENSECAP_STATE_DIR=str(self.tmp / "state"), DENSECAP_PORT=str(self.port),
                        DENSECAP_HOST="127.0.0.1", DENSECAP_GATEWAY_WORKERS=str(gateway_workers),
                        # every gunicorn process must be able to hold all sessions (the kernel picks who accepts)
                        DENSECAP_MAX_SESSIONS=str(max_sessions * gateway_workers),
                        DENSECAP_BATCH_SIZE=str(batch_size), DENSECAP_BATCH_WAIT_MS=str(batch_wait_ms),
                        DENSECAP_MAX_FPS_PER_SESSION="100000", DENSECAP_LOG_LEVEL="WARNING")

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "wb")
        p = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        self.procs[name] = p
        return p

    def start(self) -> None:
        if shutil.which("redis-server") is None:
            raise SystemExit("bench_live: redis-server is not installed (scripts/setup installs it)")
        self._spawn("redis", ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", str(self.tmp)])
        gw = self._spawn("gateway", [sys.executable, "-m", "gateway"])
        wait_until(lambda: self.http("/livez")[0] == 200, 60, "gateway", [gw])

    def http(self, path: str) -> tuple[int, bytes]:
        ctx = ssl._create_unverified_context()
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{self.port}{path}", context=ctx, timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def workers(self) -> list[str]:
        return [n for n in self.procs if n.startswith("worker")]

    def set_stream_workers(self, n: int) -> None:
        """Start or stop zero-cost workers until ``n`` are running and heartbeating."""
        while len(self.workers()) > n:
            name = self.workers()[-1]
            self._stop(self.procs.pop(name))
        while len(self.workers()) < n:
            name = f"worker{len(self.workers())}"
            self._spawn(name, [sys.executable, str(Path(__file__).resolve()), "--serve-zero-cost-worker",
                               "--name", f"{ZERO_COST_PREFIX}:{name}", "--decoder", self.decoder])
        wait_until(lambda: json.loads(self.http("/healthz")[1])["stream_workers"] == n, 120,
                   f"{n} stream worker(s)", list(self.procs.values()))

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.port}/ws/stream"

    @property
    def token(self) -> str:
        return (self.tmp / "state" / "token").read_text().strip()

    def pids(self, name: str) -> list[int]:
        """Processes of one part (its process group), the group leader first."""
        leader = self.procs[name].pid
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[2]) == leader:
                            found.append(int(entry))
                except OSError:
                    pass
        return sorted(found, key=lambda pid: pid != leader)

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds used so far by each part (a part = its process group: gunicorn counts its workers)."""
        groups = {p.pid: name for name, p in self.procs.items()}
        out = {name: 0.0 for name in self.procs}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            pgrp = int(fields[2])
            if pgrp in groups:
                out[groups[pgrp]] += (int(fields[11]) + int(fields[12])) / CLK_TCK
        return out

    @staticmethod
    def _stop(p: subprocess.Popen) -> None:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)

    def stop(self) -> None:
        for p in reversed(list(self.procs.values())):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(list(self.procs.values())):
            self._stop(p)
        shutil.rmtree(self.tmp, ignore_errors=True)


def serve_zero_cost_worker(name: str, decoder: str) -> int:
    """The zero-cost worker process (benchmark only): a production ``StreamWorker`` with the zero-cost model."""
    import logging

    import torch

    from densecap_core.settings import Settings
    from worker.stream_worker import StreamWorker
    from worker.testing import ZERO_COST_WORKER_PREFIX, zero_cost_predictor

    if not name.startswith(ZERO_COST_WORKER_PREFIX):
        raise SystemExit(f"a zero-cost worker's name must start with {ZERO_COST_WORKER_PREFIX!r}")
    torch.set_num_threads(1)
    logging.basicConfig(level="WARNING", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("densecap").warning("%s: BENCHMARK-ONLY zero-cost model (decode only, no regions)", name)
    settings = Settings.from_env()
    predict = zero_cost_predictor(settings.max_stream_pixels, decoder)
    # Warm up before the first heartbeat, as build_predictor does for a real model: the first decode imports
    # torchvision.io (seconds on a busy machine), which would otherwise stall the first batch past every timeout.
    from worker.stream_worker import Frame
    predict([Frame("warm-up", {"seq": 0}, make_frames(n=1)[0])])
    worker = StreamWorker(settings, predict, name=name)
    signal.signal(signal.SIGTERM, worker.request_stop)
    signal.signal(signal.SIGINT, worker.request_stop)
    worker.run()
    return 0


# --- load --------------------------------------------------------------------------------------


def _client_process(url: str, token: str, frames: list[bytes], sids: list[int], t_start: float, t_end: float,
                    out) -> None:
    """One load process: a thread per session, one frame in flight each; sends its records through ``out``."""
    import websocket

    records: dict[int, dict] = {}

    def session(k: int) -> None:
        rec = records[k] = {"rtt": [], "added": [], "decode": [], "batch": [], "results": 0, "other": 0,
                            "errors": [], "lost": []}
        try:
            # A reply should come within REPLY_TIMEOUT_S; the timeout also fires between the server's
            # pings (every 25 s), which a blocking recv would otherwise answer and go on waiting through.
            ws = websocket.create_connection(url, sslopt={"cert_reqs": ssl.CERT_NONE}, timeout=REPLY_TIMEOUT_S,
                                             subprotocols=["densecap.v1", f"token.{token}"])
        except Exception as exc:  # reported, not raised: the run goes on with the other sessions
            rec["errors"].append(f"connect: {exc!r}")
            return
        try:
            hello = json.loads(ws.recv())
            if hello.get("type") != "hello":
                rec["errors"].append(f"no hello: {hello}")
                return
            seq = 0
            while True:
                t = time.time()
                if t >= t_end:
                    break
                seq += 1
                t0 = time.perf_counter()
                ws.send_binary(pack_client_frame(seq, t * 1000, frames[(seq + k) % len(frames)]))
                try:
                    while True:
                        msg = json.loads(ws.recv())
                        if msg.get("seq") == seq:
                            break
                except websocket.WebSocketTimeoutException:
                    rec["lost"].append(seq)  # no reply at all: at most once allows it, the benchmark counts it
                    continue
                rtt = (time.perf_counter() - t0) * 1000
                done = time.time()
                if t < t_start or done > t_end:
                    continue  # warm-up, or finished after the window closed
                if msg.get("type") != "result":
                    rec["other"] += 1
                    if len(rec["errors"]) < 3:
                        rec["errors"].append(str(msg)[:200])
                    continue
                if not str(msg.get("worker", "")).startswith(ZERO_COST_PREFIX):
                    raise RuntimeError(f"a result from a worker that is not a zero-cost one: {msg.get('worker')}")
                tm = msg["timings"]
                rec["results"] += 1
                rec["rtt"].append(rtt)
                rec["decode"].append(tm.get("decode_ms", 0.0))
                rec["added"].append(rtt - tm.get("decode_ms", 0.0) - tm.get("inference_ms", 0.0))
                rec["batch"].append(tm.get("batch_size", 1))
        except Exception as exc:
            rec["errors"].append(repr(exc)[:200])
        finally:
            ws.close()

    threads = [threading.Thread(target=session, args=(k,)) for k in sids]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    t = os.times()
    out.send({"records": records, "cpu_s": t.user + t.system})
    out.close()


def start_profilers(dep: Deployment, out_dir: str, tag: str, seconds: float) -> list[subprocess.Popen]:
    """py-spy (``pip install py-spy``) on every gateway worker process and stream worker for the window:
    collapsed stacks in ``out_dir/<tag>-<part>-<pid>.txt`` (count the frames you care about with grep)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    targets = [("gateway", pid) for pid in dep.pids("gateway")[1:]]  # gunicorn's workers, not its master
    targets += [(name, dep.pids(name)[0]) for name in dep.workers()]
    return [subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))), "--rate",
                              "250", *PYSPY_MODE, "--format", "raw", "--output",
                              str(Path(out_dir) / f"{tag}-{name}-{pid}.txt")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for name, pid in targets]


def run_point(dep: Deployment, frames: list[bytes], sessions: int, warmup_s: float, seconds: float,
              client_procs: int, profile_dir: str | None = None) -> dict:
    """One measurement: ``sessions`` sessions for ``warmup_s`` + ``seconds``; figures of the measured window."""
    ctx = mp.get_context("fork")
    procs, pipes = [], []
    t_start = time.time() + 1.0 + warmup_s  # 1 s to connect
    t_end = t_start + seconds
    nproc = max(1, min(client_procs, sessions))
    for i in range(nproc):
        recv_end, send_end = ctx.Pipe(duplex=False)
        sids = list(range(i, sessions, nproc))
        p = ctx.Process(target=_client_process, args=(dep.url, dep.token, frames, sids, t_start, t_end, send_end))
        p.start()
        send_end.close()
        procs.append(p)
        pipes.append(recv_end)
    while time.time() < t_start:
        time.sleep(0.01)
    cpu0, load0 = dep.cpu_seconds(), os.getloadavg()
    spies = start_profilers(dep, profile_dir, f"s{sessions}-w{len(dep.workers())}", seconds) if profile_dir else []
    while time.time() < t_end:
        time.sleep(0.01)
    cpu1 = dep.cpu_seconds()
    for spy in spies:
        spy.wait(30)
    records, client_cpu = {}, 0.0
    for p, pipe in zip(procs, pipes):
        got = pipe.recv()
        records.update(got["records"])
        client_cpu += got["cpu_s"]
        p.join(30)
    recs = list(records.values())
    errors = [e for r in recs for e in r["errors"]]
    rtt = [x for r in recs for x in r["rtt"]]
    added = [x for r in recs for x in r["added"]]
    total = sum(r["results"] for r in recs)
    rates = [r["results"] / seconds for r in recs]
    cpu_ms = {}
    for name in cpu1:
        part = "worker" if name.startswith("worker") else name
        cpu_ms[part] = cpu_ms.get(part, 0.0) + (cpu1[name] - cpu0.get(name, cpu1[name]))
    cpu_ms["client"] = client_cpu  # whole client life incl. warm-up: an upper bound
    per_frame = {k: round(1000 * v / max(1, total), 3) for k, v in cpu_ms.items()}
    return {
        "sessions": sessions, "stream_workers": len(dep.workers()), "decoder": dep.decoder,
        "fps": round(total / seconds, 1), "results": total, "not_results": sum(r["other"] for r in recs),
        "lost": sum(len(r["lost"]) for r in recs), "lost_seqs": [r["lost"][:3] for r in recs if r["lost"]][:8],
        "rtt_ms_p50": round(percentile(rtt, 50), 3), "rtt_ms_p99": round(percentile(rtt, 99), 3),
        "added_ms_p50": round(percentile(added, 50), 3), "added_ms_p99": round(percentile(added, 99), 3),
        "decode_ms_p50": round(percentile([x for r in recs for x in r["decode"]], 50), 3),
        "mean_batch": round(statistics.fmean([x for r in recs for x in r["batch"]]), 2) if rtt else None,
        "session_fps_min": round(min(rates), 1), "session_fps_max": round(max(rates), 1),
        "fairness_min_over_max": round(min(rates) / max(rates), 3) if max(rates) > 0 else None,
        "cpu_ms_per_frame": per_frame, "loadavg_1m_before": round(load0[0], 2),
        "errors": errors[:5],
    }


# --- report ------------------------------------------------------------------------------------


def plot(points: list[dict], path: str, baseline: list[dict] | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for n in sorted({p["stream_workers"] for p in points}):
        pts = sorted((p for p in points if p["stream_workers"] == n), key=lambda p: p["sessions"])
        s = [p["sessions"] for p in pts]
        ax1.plot(s, [p["fps"] for p in pts], "o-", label=f"{n} stream worker(s)")
        ax2.plot(s, [p["rtt_ms_p50"] for p in pts], "o-", label=f"p50, {n} worker(s)")
        ax2.plot(s, [p["rtt_ms_p99"] for p in pts], "s--", label=f"p99, {n} worker(s)")
    for n in sorted({p["stream_workers"] for p in baseline or []}):
        pts = sorted((p for p in baseline if p["stream_workers"] == n), key=lambda p: p["sessions"])
        ax1.plot([p["sessions"] for p in pts], [p["fps"] for p in pts], "x:", color="grey", alpha=0.8,
                 label=f"before the fixes, {n} worker(s)")
    ax1.axhline(700, color="grey", ls=":", lw=1, label="bar: 700 frames/s")
    ticks = sorted({p["sessions"] for p in points})
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("concurrent sessions (1 frame in flight each)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_ylim(bottom=0)
    ax1.set_ylabel("frames/s (results)")
    ax1.set_title("Live path capacity, zero-cost model")
    ax2.set_ylabel("round trip ms")
    ax2.set_yscale("log")
    from matplotlib.ticker import FuncFormatter
    ax2.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax2.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    lo = min(p["rtt_ms_p50"] for p in points)
    hi = max(p["rtt_ms_p99"] for p in points)
    ax2.set_yticks([t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000) if lo / 2 <= t <= hi * 2])
    ax2.set_title("Round-trip latency (decode included)")
    loads = [p["loadavg_1m_before"] for p in points]
    fig.suptitle(f"640x480 JPEG frames (~{points[0].get('frame_kb', 45):g} KB), TLS, {os.cpu_count()}-core machine, "
                 f"load client included; decoder {points[0]['decoder']}; load average {min(loads):g}-{max(loads):g}",
                 fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", default="16", help="comma-separated session counts (default 16)")
    p.add_argument("--stream-workers", default="2", help="comma-separated stream worker counts (default 2)")
    p.add_argument("--gateway-workers", type=int, default=2, help="gunicorn processes (default 2)")
    p.add_argument("--decoder", choices=("torchvision", "pillow"), default="torchvision")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batch-wait-ms", type=float, default=4.0, help="DENSECAP_BATCH_WAIT_MS (default: the setting's)")
    p.add_argument("--seconds", type=float, default=8.0, help="measured window per point (default 8)")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before it (default 2)")
    p.add_argument("--client-procs", type=int, default=2, help="load-client processes (default 2)")
    p.add_argument("--frame-kb", type=float, default=45.0, help="JPEG size to aim for (default 45 KB)")
    p.add_argument("--json", help="write the points to this file")
    p.add_argument("--plot", help="write a PNG plot of throughput and latency against sessions")
    p.add_argument("--from-json", help="do not measure: plot the points of an earlier --json run")
    p.add_argument("--baseline-json", help="also draw these points (an earlier run) as 'before the fixes'")
    p.add_argument("--profile", metavar="DIR", help="run py-spy on the gateway and stream workers during each "
                   "measured window; collapsed stacks go to DIR")
    p.add_argument("--serve-zero-cost-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--name", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_zero_cost_worker:
        return serve_zero_cost_worker(args.name, args.decoder)

    # A SIGTERM (timeout, Ctrl-C in a wrapper) must still stop the deployment: run the finally below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    baseline = json.loads(Path(args.baseline_json).read_text())["points"] if args.baseline_json else None
    if args.from_json:
        if not args.plot:
            p.error("--from-json needs --plot")
        plot(json.loads(Path(args.from_json).read_text())["points"], args.plot, baseline)
        return 0
    sessions = [int(x) for x in args.sessions.split(",")]
    worker_counts = [int(x) for x in args.stream_workers.split(",")]
    frames = make_frames(target_kb=args.frame_kb)
    print(f"{len(frames)} frames 640x480, {statistics.fmean(map(len, frames)) / 1024:.1f} KB each; "
          f"{args.gateway_workers} gateway process(es), decoder {args.decoder}, batch {args.batch_size} / "
          f"{args.batch_wait_ms:g} ms; load average {os.getloadavg()[0]:.2f}", flush=True)
    points = []
    dep = Deployment(args.gateway_workers, args.decoder, args.batch_size, args.batch_wait_ms, max(sessions))
    try:
        dep.start()
        for n in worker_counts:
            dep.set_stream_workers(n)
            for s in sessions:
                pt = run_point(dep, frames, s, args.warmup, args.seconds, args.client_procs, args.profile)
                pt.update(gateway_workers=args.gateway_workers, frame_kb=round(statistics.fmean(map(len, frames)) / 1024, 1))
                points.append(pt)
                cpu = " ".join(f"{k} {v:.2f}" for k, v in pt["cpu_ms_per_frame"].items())
                print(f"workers {n} sessions {s:>3}: {pt['fps']:7.1f} frames/s  rtt p50 {pt['rtt_ms_p50']:6.2f} "
                      f"p99 {pt['rtt_ms_p99']:6.2f} ms  added p50 {pt['added_ms_p50']:5.2f} p99 "
                      f"{pt['added_ms_p99']:6.2f} ms  session fps {pt['session_fps_min']}-{pt['session_fps_max']}  "
                      f"batch {pt['mean_batch']}  lost {pt['lost']}  cpu ms/frame: {cpu}  load {pt['loadavg_1m_before']}", flush=True)
                if pt["lost"]:
                    print(f"  lost (no reply in {REPLY_TIMEOUT_S:g} s), first seqs per session: {pt['lost_seqs']}", flush=True)
                if pt["errors"]:
                    print(f"  errors: {pt['errors']}", flush=True)
    finally:
        dep.stop()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"command": "scripts/bench_live.py " + " ".join(argv or sys.argv[1:]),
                                               "points": points}, indent=1))
    if args.plot:
        plot(points, args.plot, baseline)
    failed = [e for p in points for e in p["errors"]]
    if failed:
        print(f"bench_live: {len(failed)} session error(s), e.g. {failed[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
