#!/usr/bin/env python
"""Measure what ``gateway.tlssock.SerializedTLSSocket`` fixes and what it costs, in one run.

    .venv/bin/python scripts/bench_tls_duplex.py                    # 20 connections x 3 s per mode
    .venv/bin/python scripts/bench_tls_duplex.py --connections 40 --seconds 2 --message-bytes 100

Each connection is a TLS pair over loopback (a self-signed certificate from ``gateway.tls``), used the way a
websocket library uses it: on each side one thread only receives while another only sends, at the same time.
Both directions carry numbered messages of ``--message-bytes``, and each receiver checks every byte.

Each connection runs in a child process (the bare race can corrupt the heap: glibc then aborts the process,
"corrupted size vs. prev_size", which counts as a failure). Modes alternate connection by connection, so a
change in the machine's speed hits both alike:

- **bare**: the ``ssl.SSLSocket`` itself on both sides (what simple-websocket and websocket-client do);
- **serialized**: both sides wrapped in ``SerializedTLSSocket``.

Prints, per mode, the connections that failed (an SSL error, a lost connection or a corrupt byte, with the
first errors seen), and the bytes per second both directions carried together over the connections that ran
their full time; then the throughput ratio, when both modes have such connections.
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.tls import loopback_contexts, make_self_signed  # noqa: E402
from gateway.tlssock import SerializedTLSSocket  # noqa: E402


class Side:
    """One end: a sender thread and a receiver thread on one socket, checking what arrives."""

    def __init__(self, sock, name: str, message_bytes: int, stop: threading.Event):
        self.sock, self.name, self.size, self.stop = sock, name, message_bytes, stop
        self.errors: list[str] = []
        self.sent = self.received = 0

    def message(self, n: int) -> bytes:
        return bytes([n % 251]) * self.size

    def send_loop(self) -> None:
        n = 0
        try:
            while not self.stop.is_set():
                self.sock.sendall(self.message(n))
                self.sent += self.size
                n += 1
        except Exception as exc:  # noqa: BLE001 - any failure is what this measures
            if not self.stop.is_set():
                self.errors.append(f"{self.name} send: {exc!r}")

    def recv_loop(self) -> None:
        buf = b""
        n = 0
        try:
            while not self.stop.is_set():
                data = self.sock.recv(65536)
                if not data:
                    if not self.stop.is_set():
                        self.errors.append(f"{self.name} recv: connection lost")
                    return
                buf += data
                self.received += len(data)
                while len(buf) >= self.size:
                    if buf[:self.size] != self.message(n):
                        if not self.stop.is_set():  # after shutdown() the SSLSocket hands out raw bytes
                            self.errors.append(f"{self.name} recv: message {n} corrupt")
                        return
                    buf, n = buf[self.size:], n + 1
        except Exception as exc:  # noqa: BLE001
            if not self.stop.is_set():
                self.errors.append(f"{self.name} recv: {exc!r}")

    def start(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self.send_loop, daemon=True),
                   threading.Thread(target=self.recv_loop, daemon=True)]
        for t in threads:
            t.start()
        return threads


def one_connection(server_ctx, client_ctx, serialized: bool, seconds: float, size: int) -> tuple[list[str], int]:
    """Run one duplex connection for ``seconds``; returns its errors and the bytes both directions carried."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: dict = {}

    def accept():
        conn, _ = listener.accept()
        accepted["sock"] = server_ctx.wrap_socket(conn, server_side=True)

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    client = client_ctx.wrap_socket(socket.create_connection(listener.getsockname()), server_hostname="localhost")
    t.join(10)
    server = accepted["sock"]
    for s in (client, server):
        s.settimeout(10)
    if serialized:
        client, server = SerializedTLSSocket(client), SerializedTLSSocket(server)
    stop = threading.Event()
    sides = [Side(client, "client", size, stop), Side(server, "server", size, stop)]
    threads = [th for side in sides for th in side.start()]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not any(side.errors for side in sides):
        time.sleep(0.05)
    stop.set()
    for s in (client, server):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()
    for th in threads:
        th.join(5)
    listener.close()
    return [e for side in sides for e in side.errors], sum(side.received for side in sides)


def run_child(args, mode: str, cert_dir: str) -> tuple[list[str], int, float]:
    """One connection in a child process: a bare socket's race can corrupt the heap and abort the process."""
    cmd = [sys.executable, __file__, "--child", mode, "--cert-dir", cert_dir, "--seconds", str(args.seconds),
           "--message-bytes", str(args.message_bytes)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.seconds + 60)
    if proc.returncode != 0:
        why = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        tail = proc.stderr.strip().splitlines()[-1:] or [""]
        return [f"the process died ({why}): {tail[0]}"], 0, time.perf_counter() - t0
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out["errors"], out["bytes"], out["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=20, help="connections per mode (default 20)")
    ap.add_argument("--seconds", type=float, default=3.0, help="how long each connection runs (default 3)")
    ap.add_argument("--message-bytes", type=int, default=100,
                    help="size of each message; small ones interleave reads and writes most (default 100)")
    ap.add_argument("--child", choices=("bare", "serialized"), help=argparse.SUPPRESS)
    ap.add_argument("--cert-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        server_ctx, client_ctx = loopback_contexts(Path(args.cert_dir) / "cert.pem", Path(args.cert_dir) / "key.pem")
        t0 = time.perf_counter()
        errors, nbytes = one_connection(server_ctx, client_ctx, args.child == "serialized", args.seconds,
                                        args.message_bytes)
        print(json.dumps({"errors": errors, "bytes": nbytes, "seconds": time.perf_counter() - t0}))
        return

    with tempfile.TemporaryDirectory() as tmp:
        make_self_signed(Path(tmp) / "cert.pem", Path(tmp) / "key.pem", names=["localhost"])
        report(args, tmp)


def report(args, cert_dir: str) -> None:

    modes = ("bare", "serialized")
    failed, carried, elapsed = Counter(), Counter(), Counter()
    examples: dict[str, list[str]] = {m: [] for m in modes}
    for i in range(args.connections):
        for mode in modes:
            errors, nbytes, seconds = run_child(args, mode, cert_dir)
            if errors:
                failed[mode] += 1
                examples[mode].extend(errors[:2])
            else:  # throughput only over connections that ran their full time
                elapsed[mode] += seconds
                carried[mode] += nbytes
        print(f"\r{i + 1}/{args.connections} connections per mode", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)

    print(f"{args.connections} connections per mode, {args.seconds:g} s each, {args.message_bytes}-byte messages "
          "both ways, one reading and one writing thread per side")
    print(f"{'mode':<12}{'failed':>10}{'MB/s (both ways, connections that lasted)':>44}")
    rate = {m: carried[m] / elapsed[m] / 1e6 for m in modes if elapsed[m]}
    for mode in modes:
        shown = f"{rate[mode]:.1f}" if mode in rate else "none lasted"
        print(f"{mode:<12}{failed[mode]:>6}/{args.connections:<3}{shown:>44}")
    if len(rate) == 2:
        print(f"throughput serialized / bare: {rate['serialized'] / rate['bare']:.2f}")
    for mode in modes:
        for e in sorted(set(examples[mode]))[:4]:
            print(f"  {mode}: {e}")


if __name__ == "__main__":
    main()
