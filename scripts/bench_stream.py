#!/usr/bin/env python
"""Benchmark the live path against a bare Captioner on the same frames, in one run.

    .venv/bin/python scripts/bench_stream.py                        # tiny random model, 1 session, CPU
    .venv/bin/python scripts/bench_stream.py --sessions 4 --frames 400
    .venv/bin/python scripts/bench_stream.py --checkpoint ckpt.pt --device cuda --sessions 8

1. **Bare**: the model in this process, one frame at a time (`Captioner.caption` on the JPEG bytes:
   decode + inference), as fast as it goes.
2. **Path**: a real redis-server, `python -m gateway` (gunicorn over TLS) and one
   `python -m worker.stream_worker` (same checkpoint, device, thread count) as subprocesses; S
   websocket sessions over wss each keep one frame in flight.

Bare and path alternate in blocks of ``--block`` frames (25) within each of ``--repeat`` pairs, so a change in
the machine's speed hits both alike; the sessions stay open throughout. Prints frames/s of both, their ratio, round-trip latency percentiles, and the latency the path adds:
per frame, round trip minus the worker's own decode + inference time for it. Pass ``--gateway URL
--token T`` to measure an already running deployment instead (the bare run then uses this machine).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.wire import pack_client_frame  # noqa: E402  (torch-free)


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


def load_frames(args) -> list[bytes]:
    """The frames both runs use: JPEGs from --images, else variants of the test elephant."""
    from PIL import Image, ImageOps

    if args.images:
        paths = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        images = [Image.open(p).convert("RGB") for p in paths[:32]]
    else:
        base = Image.open(ROOT / "tests" / "data" / "elephant.jpg").convert("RGB")
        images = [base, ImageOps.mirror(base), base.rotate(3), ImageOps.autocontrast(base)]
    frames = []
    for im in images:
        scale = args.size / max(im.size)
        im = im.resize((round(im.width * scale), round(im.height * scale)))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=80)
        frames.append(buf.getvalue())
    return frames


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float, what: str, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what}: a process exited with {p.returncode}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{what}: not ready after {timeout} s")


class Deployment:
    """redis-server + gateway + one stream worker, as subprocesses in their own process groups."""

    def __init__(self, checkpoint: str, device: str, threads: int, batch_size: int, batch_wait_ms: float):
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-stream-"))
        self.port, self.redis_port = free_port(), free_port()
        self.procs: list[subprocess.Popen] = []
        self.env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads),
                        DENSECAP_REDIS_URL=f"redis://127.0.0.1:{self.redis_port}/0",
                        DENSECAP_STATE_DIR=str(self.tmp / "state"), DENSECAP_PORT=str(self.port),
                        DENSECAP_HOST="127.0.0.1", DENSECAP_CHECKPOINT=checkpoint, DENSECAP_DEVICE=device,
                        DENSECAP_BATCH_SIZE=str(batch_size), DENSECAP_BATCH_WAIT_MS=str(batch_wait_ms),
                        DENSECAP_MAX_FPS_PER_SESSION="1000", DENSECAP_LOG_LEVEL="WARNING")

    def _spawn(self, cmd: list[str], name: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "wb")
        p = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        self.procs.append(p)
        return p

    def start(self) -> None:
        if shutil.which("redis-server") is None:
            raise SystemExit("bench_stream: redis-server is not installed (scripts/setup installs it)")
        self._spawn(["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--dir", str(self.tmp)], "redis")
        gw = self._spawn([sys.executable, "-m", "gateway"], "gateway")
        ctx = ssl._create_unverified_context()
        wait_until(lambda: urllib.request.urlopen(f"https://127.0.0.1:{self.port}/livez", context=ctx,
                                                  timeout=2).status == 200, 60, "gateway", [gw])
        self._spawn([sys.executable, "-m", "worker.stream_worker", "--name", "bench"], "worker")

        def worker_ready() -> bool:
            try:
                with urllib.request.urlopen(f"https://127.0.0.1:{self.port}/healthz", context=ctx, timeout=2) as r:
                    return json.load(r)["stream_workers"] >= 1
            except urllib.error.HTTPError:
                return False

        wait_until(worker_ready, 180, "stream worker", self.procs)

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.port}/ws/stream"

    @property
    def token(self) -> str:
        return (self.tmp / "state" / "token").read_text().strip()

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        shutil.rmtree(self.tmp, ignore_errors=True)


class BareRunner:
    """The bare model in this process: ``Captioner.caption`` on the JPEG bytes (decode + inference)."""

    def __init__(self, args, frames: list[bytes]):
        import torch
        from densecap_core.inference import Captioner

        torch.set_num_threads(args.threads)
        self.frames = frames
        self.cap = Captioner(args.checkpoint, device=args.device, batch_size=1)
        for f in frames[:2]:  # warm-up, as the worker does
            self.cap.caption([f])

    def run(self, n: int, offset: int = 0) -> dict:
        lat = []
        t0 = time.perf_counter()
        for i in range(offset, offset + n):
            t = time.perf_counter()
            self.cap.caption([self.frames[i % len(self.frames)]])
            lat.append((time.perf_counter() - t) * 1000)
        return {"seconds": time.perf_counter() - t0, "latency_ms": lat}


def use_numpy_client_mask() -> None:
    """Mask this client's frames with numpy, as a browser masks natively, with websocket-client's random keys.

    websocket-client XORs through Python big integers: about 0.5 ms per 68 KB frame on our machines, a cost
    of this Python client that the page in a browser does not pay. ``--client-mask python`` keeps it. The XOR
    is the gateway's own (gateway/wsmask.py): masking and unmasking are the same operation.
    """
    from websocket._abnf import ABNF

    from gateway.wsmask import NumpyXorMasker

    def mask(mask_key, data) -> bytes:
        key = mask_key.encode("latin-1") if isinstance(mask_key, str) else bytes(mask_key)
        payload = data.encode("latin-1") if isinstance(data, str) else data or b""
        return bytes(NumpyXorMasker(key).process(payload))

    sample = bytes(range(256)) * 3 + b"xyz"
    if mask(b"\x01\x82\x33\xc4", sample) != ABNF.mask(b"\x01\x82\x33\xc4", sample):
        raise SystemExit("bench_stream: the numpy client mask disagrees with websocket-client's")
    ABNF.mask = staticmethod(mask)


class PathSession:
    """One websocket session over wss, opened (and warmed up) once and used for every path block."""

    def __init__(self, url: str, token: str, frames: list[bytes], k: int):
        import websocket

        self.frames, self.k, self.seq = frames, k, 100
        self.ws = websocket.create_connection(url, sslopt={"cert_reqs": ssl.CERT_NONE}, timeout=60,
                                              subprotocols=["densecap.v1", f"token.{token}"])
        json.loads(self.ws.recv())  # hello
        for seq in range(2):  # warm-up frames, not counted
            self.ws.send_binary(pack_client_frame(seq, 0, frames[seq % len(frames)]))
            self.ws.recv()

    def run(self, n: int, in_flight: int, out: dict, lock: threading.Lock) -> None:
        """Send ``n`` frames keeping ``in_flight`` outstanding; append per-frame figures to ``out``."""
        sent: dict[int, float] = {}
        first = self.seq

        def send(i: int) -> None:
            sent[first + i] = time.perf_counter()
            self.ws.send_binary(pack_client_frame(first + i, 0, self.frames[(i + self.k) % len(self.frames)]))

        for i in range(min(in_flight, n)):
            send(i)
        next_i, received = len(sent), 0
        while received < n:
            msg = json.loads(self.ws.recv())
            t_back = time.perf_counter()  # before the next frame goes out: its send is not this frame's
            if msg.get("type") not in ("result", "dropped", "error"):
                continue  # a status message: not an answer to a frame
            received += 1
            t_sent = sent.pop(msg.get("seq"), None)
            if next_i < n:
                send(next_i)
                next_i += 1
            if msg.get("type") != "result" or t_sent is None:
                with lock:
                    out["errors"].append(str(msg)[:200])
                continue
            rtt = (t_back - t_sent) * 1000
            tm = msg["timings"]
            model = tm.get("decode_ms", 0) + tm.get("inference_ms", 0)
            server = tm.get("server_ms", float("nan"))
            with lock:
                out["latency_ms"].append(rtt)
                out["added_ms"].append(rtt - model)
                out["batches"].append(tm.get("batch_size", 1))
                parts = out["parts"]
                parts["queue"].append(tm.get("queue_ms", float("nan")))
                parts["model"].append(model)
                parts["server_other"].append(server - model - tm.get("queue_ms", 0))
                parts["client_wire"].append(rtt - server)
        self.seq += n

    def close(self) -> None:
        self.ws.close()


def _empty_path_figures() -> dict:
    # Where the added latency goes, per frame: waiting in Redis for a worker (queue), the rest of the server's
    # time (gateway receive -> gateway send, minus queue and model) and the client side plus the wire both ways
    # (round trip minus server_ms); model = the worker's decode + inference.
    return {"latency_ms": [], "added_ms": [], "batches": [], "errors": [],
            "parts": {"queue": [], "server_other": [], "client_wire": [], "model": []}}


def run_path(args, sessions: list[PathSession], n: int) -> dict:
    """Each of the S sessions sends ``n // S`` frames, keeping ``--in-flight`` outstanding (the page: 1 or 2)."""
    per_session = max(1, n // len(sessions))
    out, lock = _empty_path_figures(), threading.Lock()
    start = threading.Barrier(len(sessions) + 1)

    def session(s: PathSession) -> None:
        start.wait()
        s.run(per_session, args.in_flight, out, lock)

    threads = [threading.Thread(target=session, args=(s,)) for s in sessions]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    out["seconds"] = time.perf_counter() - t0
    return out


def interleaved_pair(args, bare: BareRunner, sessions: list[PathSession]) -> tuple[dict, dict]:
    """``--frames`` through each side, alternating blocks of ``--block`` frames (the whole run when 0), so a
    change in the machine's speed (seen here: the same model 49-66 ms from one minute to the next) hits both."""
    block = args.block or args.frames
    b = {"seconds": 0.0, "frames": 0, "latency_ms": []}
    p = {"seconds": 0.0, "frames": 0, **_empty_path_figures()}
    done = 0
    while done < args.frames:
        n = min(block, args.frames - done)
        rb = bare.run(n, done)
        b["seconds"] += rb["seconds"]
        b["frames"] += n
        b["latency_ms"] += rb["latency_ms"]
        rp = run_path(args, sessions, n)
        p["seconds"] += rp["seconds"]
        p["frames"] += len(rp["latency_ms"])
        for key in ("latency_ms", "added_ms", "batches", "errors"):
            p[key] += rp[key]
        for key, values in rp["parts"].items():
            p["parts"][key] += values
        done += n
    if p["errors"]:
        print(f"path: {len(p['errors'])} frames without a result, e.g. {p['errors'][0]}", file=sys.stderr)
    b["fps"] = b["frames"] / b["seconds"]
    p["fps"] = p["frames"] / p["seconds"]
    p["mean_batch"] = statistics.fmean(p["batches"]) if p["batches"] else float("nan")
    return b, p


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="checkpoint file (default: a tiny random-weight model made here)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")),
                   help="torch threads for the bare run and the worker (default: OMP_NUM_THREADS or 1)")
    p.add_argument("--frames", type=int, default=200)
    p.add_argument("--sessions", type=int, default=1)
    p.add_argument("--in-flight", type=int, default=1, choices=(1, 2),
                   help="frames each session keeps outstanding (the browser page: 1 or 2; default 1, the strictest)")
    p.add_argument("--repeat", type=int, default=3,
                   help="bare/path pairs to run; figures are medians (default 3)")
    p.add_argument("--block", type=int, default=25,
                   help="within a pair, alternate bare and path every this many frames (default 25; 0: one "
                        "whole run each), so the machine's changes of speed hit both alike")
    p.add_argument("--client-mask", choices=("numpy", "python"), default="numpy",
                   help="how the benchmark's websocket client masks its frames: numpy (default; a browser masks "
                        "natively) or websocket-client's own pure-Python XOR (~0.5 ms per 68 KB frame)")
    p.add_argument("--size", type=int, default=640, help="long side of the frames in pixels")
    p.add_argument("--images", help="folder of images to use as frames (default: the test elephant)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batch-wait-ms", type=float, default=2.0)
    p.add_argument("--gateway", help="wss://host:port/ws/stream of a running deployment (skips starting one)")
    p.add_argument("--token", help="API token for --gateway")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)

    tmp_ckpt = None
    if not args.checkpoint:
        from densecap_core.checkpoint import make_random_checkpoint
        tmp_ckpt = Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
        args.checkpoint = str(make_random_checkpoint(tmp_ckpt / "random.pt"))
    frames = load_frames(args)
    print(f"{len(frames)} distinct frames, {statistics.fmean(map(len, frames)) / 1024:.0f} KB each, long side "
          f"{args.size}; {args.frames} frames per run; device {args.device}, {args.threads} thread(s)")

    bares, paths = [], []
    deployment = None
    try:
        if args.gateway:
            url, token = args.gateway, args.token or ""
        else:
            deployment = Deployment(args.checkpoint, args.device, args.threads, args.batch_size, args.batch_wait_ms)
            deployment.start()
            url, token = deployment.url, deployment.token
        if args.client_mask == "numpy":
            use_numpy_client_mask()
        bare = BareRunner(args, frames)
        sessions = [PathSession(url, token, frames, k) for k in range(args.sessions)]
        try:
            for _ in range(max(1, args.repeat)):
                b, p = interleaved_pair(args, bare, sessions)
                bares.append(b)
                paths.append(p)
        finally:
            for session in sessions:
                session.close()
    finally:
        if deployment:
            deployment.stop()
        if tmp_ckpt:
            shutil.rmtree(tmp_ckpt, ignore_errors=True)
    ratios = [p["fps"] / b["fps"] for b, p in zip(bares, paths)]
    bare = {"fps": statistics.median(b["fps"] for b in bares), "latency_ms": [x for b in bares for x in b["latency_ms"]]}
    path = {"fps": statistics.median(p["fps"] for p in paths), "latency_ms": [x for p in paths for x in p["latency_ms"]],
            "added_ms": [x for p in paths for x in p["added_ms"]],
            "parts": {k: [x for p in paths for x in p["parts"][k]] for k in paths[0]["parts"]},
            "mean_batch": statistics.fmean(p["mean_batch"] for p in paths)}

    fig = {
        "bare_fps": bare["fps"], "path_fps": path["fps"], "ratio": statistics.median(ratios),
        "ratios": [round(r, 3) for r in ratios], "repeat": len(ratios), "in_flight": args.in_flight,
        "sessions": args.sessions, "mean_batch": path["mean_batch"], "client_mask": args.client_mask,
        "bare_ms_p50": percentile(bare["latency_ms"], 50), "bare_ms_p99": percentile(bare["latency_ms"], 99),
        "path_rtt_ms_p50": percentile(path["latency_ms"], 50), "path_rtt_ms_p99": percentile(path["latency_ms"], 99),
        "added_ms_p50": percentile(path["added_ms"], 50), "added_ms_p99": percentile(path["added_ms"], 99),
        **{f"{k}_ms_p50": percentile(v, 50) for k, v in path["parts"].items()},
    }
    print(f"bare Captioner : {fig['bare_fps']:8.1f} frames/s   latency p50 {fig['bare_ms_p50']:.1f} ms, "
          f"p99 {fig['bare_ms_p99']:.1f} ms")
    print(f"whole path     : {fig['path_fps']:8.1f} frames/s   round trip p50 {fig['path_rtt_ms_p50']:.1f} ms, "
          f"p99 {fig['path_rtt_ms_p99']:.1f} ms  ({args.sessions} session(s), mean batch {fig['mean_batch']:.2f})")
    print(f"ratio path/bare: {fig['ratio']:.3f}  (median of {len(ratios)} alternating pairs: "
          f"{', '.join(f'{r:.3f}' for r in ratios)}; {args.in_flight} frame(s) in flight per session)")
    print(f"added latency  : p50 {fig['added_ms_p50']:.2f} ms, p99 {fig['added_ms_p99']:.2f} ms "
          "(round trip minus the worker's decode + inference for that frame)")
    print(f"  of which (p50): waiting for a worker {fig['queue_ms_p50']:.2f} ms, rest of the server "
          f"{fig['server_other_ms_p50']:.2f} ms, client and wire both ways {fig['client_wire_ms_p50']:.2f} ms")
    print(f"model time     : p50 {fig['bare_ms_p50']:.2f} ms bare, {fig['model_ms_p50']:.2f} ms in the worker "
          "(decode + inference; a slower worker lowers the ratio without adding latency)")
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
