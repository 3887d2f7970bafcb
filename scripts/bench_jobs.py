#!/usr/bin/env python3
"""Bulk-job overhead: the same folder through ``densecap submit`` (gateway, Redis, RQ, job worker) and through
a bare ``Captioner`` loop, in one run on one machine. Prints images/s of both and their ratio.

    .venv/bin/python scripts/bench_jobs.py                       # 256 synthetic 640x480 JPEGs, tiny random model
    .venv/bin/python scripts/bench_jobs.py --config resnet18 --images 32
    .venv/bin/python scripts/bench_jobs.py --dir photos/ --checkpoint model.pt --device cuda

It starts its own redis-server, ``python -m gateway`` (TLS) and ``python -m worker.job_worker`` on free
ports and ends them when done. Both paths are warmed up first (one batch each), and both use the same
batch size. Reported for the job path: end to end (the ``densecap submit`` command: hashing, uploads,
captioning, results.json and viewer images) and server side (first upload to last result), and the CPU
each part of the path used per image (redis, gateway with its gunicorn workers, job workers, the submit client).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import statistics
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TOKEN = "bench-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port}")


def synthetic_folder(root: Path, n: int, size: tuple[int, int]) -> None:
    """``n`` distinct JPEGs cut from the test photo (scaled up to ``size``), so every image is different.

    The crops repeat every 120 images, so each image also carries its index as a small grey-level code in its
    top-left corner: equal bytes would be uploaded and captioned once (the job path deduplicates by hash).
    """
    from PIL import Image, ImageDraw
    photo = Image.open(ROOT / "tests" / "data" / "elephant.jpg").convert("RGB")
    w, h = photo.size
    for i in range(n):
        box = (i % 40, (3 * i) % 30, w - (7 * i) % 40, h - (5 * i) % 30)
        image = photo.crop(box).resize(size)
        draw = ImageDraw.Draw(image)
        for bit in range(12):
            shade = 255 if (i >> bit) & 1 else 0
            draw.rectangle((bit * 8, 0, bit * 8 + 7, 7), fill=(shade, shade, shade))
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=90)
        (root / f"img{i:04d}.jpg").write_bytes(buf.getvalue())


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and every live process of its group (gunicorn's workers), from
    /proc (the services are started in their own sessions, so their group id is their pid)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended meanwhile
        if int(fields[2]) == pid or stat.parent.name == str(pid):  # fields[2]: process group id
            total += sum(int(v) for v in fields[11:13])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def bare_loop(files: list[Path], checkpoint: str, device: str, batch_size: int, threads: int) -> float:
    """Images/s of the model alone: read bytes, caption in batches (decode included, as the worker does)."""
    import torch
    from densecap_core.inference import Captioner
    torch.set_num_threads(threads)
    captioner = Captioner(checkpoint, device=device, batch_size=batch_size)
    captioner.caption([files[0].read_bytes()] * batch_size, on_error="record")  # warm-up
    t0 = time.perf_counter()
    for start in range(0, len(files), batch_size):
        batch = files[start:start + batch_size]
        captioner.caption([f.read_bytes() for f in batch], [f.name for f in batch], on_error="record")
    return len(files) / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, help="folder of images (default: a synthetic one)")
    p.add_argument("--images", type=int, default=256,
                   help="synthetic images to make (default 256: a bulk folder; the start and finish of "
                        "`densecap submit` cost about 0.3 s whatever the folder's size)")
    p.add_argument("--size", default="640x480", help="synthetic image size")
    p.add_argument("--checkpoint", help="model checkpoint (default: a random one of --config)")
    p.add_argument("--config", default="tiny", help="config of the random checkpoint")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--chunk-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=1, help="job worker processes")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads per model (both paths); 2 threads on a busy 2-core machine measure "
                        "OpenMP contention more than the job path")
    p.add_argument("--repeat", type=int, default=3,
                   help="alternate the two paths this many times and report medians (the machine may be shared)")
    p.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-jobs-"))
    procs: list[subprocess.Popen] = []
    try:
        folder = args.dir
        if folder is None:
            folder = tmp / "images"
            folder.mkdir()
            synthetic_folder(folder, args.images, tuple(int(v) for v in args.size.split("x")))
        files = sorted(f for f in folder.rglob("*") if f.is_file() and not f.name.startswith("."))
        checkpoint = args.checkpoint
        if checkpoint is None:
            from densecap_core.checkpoint import make_random_checkpoint
            checkpoint = str(make_random_checkpoint(tmp / "model.pt", config=args.config))

        redis_port, gw_port = free_port(), free_port()
        log = open(tmp / "services.log", "ab")
        procs.append(subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                                       "--save", "", "--appendonly", "no"], stdout=log, stderr=log))
        wait_port(redis_port, procs[-1])
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads),
               "DENSECAP_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "DENSECAP_PORT": str(gw_port),
               "DENSECAP_HOST": "127.0.0.1", "DENSECAP_STATE_DIR": str(tmp / "state"),
               "DENSECAP_API_TOKENS": TOKEN, "DENSECAP_CHECKPOINT": checkpoint, "DENSECAP_DEVICE": args.device,
               "DENSECAP_BATCH_SIZE": str(args.batch_size), "DENSECAP_CHUNK_SIZE": str(args.chunk_size)}
        procs.append(subprocess.Popen([sys.executable, "-m", "gateway"], env=env, stdout=log, stderr=log,
                                      start_new_session=True))
        wait_port(gw_port, procs[-1])
        for i in range(args.workers):
            procs.append(subprocess.Popen([sys.executable, "-m", "worker.job_worker", "--name", f"bench-{i}",
                                           "--nice", "0", "--log-level", "WARNING"], env=env, stdout=log,
                                          stderr=log, start_new_session=True))
        wait_workers(f"redis://127.0.0.1:{redis_port}/0", args.workers)

        submit = [sys.executable, "-m", "densecap_core.cli", "submit", "--server", f"https://127.0.0.1:{gw_port}",
                  "--token", TOKEN, "--ca-cert", str(tmp / "state" / "tls" / "cert.pem"), "--quiet"]
        warm = tmp / "warm"
        warm.mkdir()
        for f in files[:args.batch_size]:
            shutil.copy(f, warm / f.name)
        subprocess.run(submit + [str(warm), "--output", str(tmp / "out-warm")], env=env, check=True,
                       capture_output=True)
        bares, walls, servers, busy = [], [], [], []
        names = ["redis", "gateway"] + [f"worker{i}" for i in range(args.workers)]
        cpu: dict[str, list[float]] = {name: [] for name in names + ["submit"]}
        for i in range(max(1, args.repeat)):
            bares.append(bare_loop(files, checkpoint, args.device, args.batch_size, args.threads))
            out = tmp / f"out{i}"  # a new output folder: a new job, every image uploaded and captioned again
            before = [cpu_seconds(proc.pid) for proc in procs]
            children = os.times()
            t0 = time.perf_counter()
            run = subprocess.run(submit + [str(folder), "--output", str(out)], env=env, capture_output=True,
                                 text=True)
            walls.append(len(files) / (time.perf_counter() - t0))
            after, done = [cpu_seconds(proc.pid) for proc in procs], os.times()
            for name, b, a in zip(names, before, after):
                cpu[name].append((a - b) * 1000 / len(files))
            cpu["submit"].append((done.children_user + done.children_system - children.children_user
                                  - children.children_system) * 1000 / len(files))
            if run.returncode != 0:
                print(run.stderr, file=sys.stderr)
                return 1
            servers.append(server_side_rate(env, out))
            busy.append(model_share(out, len(files) / servers[-1]))
        bare, end_to_end, server, share = (statistics.median(v) for v in (bares, walls, servers, busy))
        figures = {"images": len(files), "config": args.config if not args.checkpoint else args.checkpoint,
                   "device": args.device, "batch_size": args.batch_size, "chunk_size": args.chunk_size,
                   "workers": args.workers, "threads": args.threads, "repeat": args.repeat, "bare_images_per_s": round(bare, 2),
                   "submit_images_per_s": round(end_to_end, 2), "server_images_per_s": round(server, 2),
                   "ratio_submit_to_bare": round(end_to_end / bare, 3),
                   "ratio_server_to_bare": round(server / bare, 3), "worker_model_share": round(share, 3)}
        print(f"{len(files)} images, {figures['config']} on {args.device}, batch {args.batch_size}, "
              f"chunk {args.chunk_size}, {args.workers} worker(s); medians of {args.repeat} alternating runs")
        print(f"  bare Captioner loop      {bare:8.2f} images/s")
        print(f"  densecap submit (e2e)    {end_to_end:8.2f} images/s   ratio {end_to_end / bare:.3f}")
        print(f"  job path, server side    {server:8.2f} images/s   ratio {server / bare:.3f}")
        print(f"  model time (decode + forward, as the worker timed it) / server-side wall time: {share:.3f}")
        per_image = {name: statistics.median(v) for name, v in cpu.items()}
        figures["cpu_ms_per_image"] = {k: round(v, 2) for k, v in per_image.items()}
        print("  CPU per image (ms, user + system): " + ", ".join(f"{k} {v:.1f}" for k, v in per_image.items()))
        if args.json:
            print(json.dumps(figures))
        return 0
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM) if proc.args[0] != "redis-server" else proc.terminate()
                    proc.wait(10)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def wait_workers(redis_url: str, n: int, timeout: float = 180) -> None:
    import redis
    from rq import Worker
    connection = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + timeout
    while len(Worker.all(connection=connection)) < n:
        if time.monotonic() > deadline:
            raise TimeoutError("job workers did not start")
        time.sleep(0.2)


def model_share(out: Path, span_s: float) -> float:
    """The worker's decode + model time summed over the results, over the job's server-side wall time:
    near 1 means the worker was busy all along (the rest of the gap to the bare loop is CPU contention)."""
    total_ms = 0.0
    for line in (out / "results.jsonl").read_text().splitlines():
        timings = json.loads(line).get("timings", {})
        total_ms += timings.get("model_ms", 0.0) + timings.get("decode_ms", 0.0)
    return total_ms / 1000.0 / span_s


def server_side_rate(env: dict, out: Path) -> float:
    """Images per second from the job's creation (after hashing, before the uploads) to its last result."""
    import redis
    from densecap_core.jobs import JobStore
    job_id = json.loads((out / "job.json").read_text())["id"]
    status = JobStore(redis.Redis.from_url(env["DENSECAP_REDIS_URL"])).status(job_id)
    span = status["updated"] - status["created"]
    return status["counts"]["done"] / span if span > 0 else float("nan")


if __name__ == "__main__":
    sys.exit(main())
