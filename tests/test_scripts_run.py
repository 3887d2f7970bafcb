"""``scripts/run`` end to end, as a user runs it: real redis-server, gunicorn over TLS, stream and job workers.

The main test starts ``scripts/run --no-setup`` with a tiny random checkpoint, reads the URL and token it
prints, streams one frame over wss, submits a one-image folder with ``densecap submit``, then sends SIGINT (what
Ctrl-C sends) and checks that every process it started, found through /proc as its descendants and their process
groups, is gone. The other tests check the refusals that must happen before anything starts, and that a service
dying takes the rest down with it.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
import websocket

from conftest import ROOT, child_env, free_port, python_exe
from gateway.wire import pack_client_frame

pytestmark = pytest.mark.slow
RUN = ROOT / "scripts" / "run"


# --- process helpers ------------------------------------------------------------------------------------------


def proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, pgid) of every live (non-zombie) process, from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
        if fields[0] == "Z":
            continue
        table[int(entry.name)] = (int(fields[1]), int(fields[2]))
    return table


def descendants(root: int) -> set[int]:
    table = proc_table()
    found, frontier = set(), {root}
    while frontier:
        children = {pid for pid, (ppid, _) in table.items() if ppid in frontier} - found
        found |= children
        frontier = children
    return found


def survivors(pids: set[int], groups: set[int]) -> dict[int, tuple[int, int]]:
    return {pid: v for pid, v in proc_table().items() if pid in pids or v[1] in groups}


def kill_all(pids: set[int], groups: set[int]) -> None:
    for g in groups:
        try:
            os.killpg(g, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class Launcher:
    """``scripts/run`` as a child process whose output is read line by line without blocking."""

    def __init__(self, *args: str, **env: str):
        full_env = child_env(DENSECAP_DEVICE="cpu", **env)
        for key in ("DENSECAP_API_TOKENS", "DENSECAP_REDIS_URL", "DENSECAP_REDIS_PASSWORD", "DENSECAP_PORT"):
            full_env.pop(key, None)
        self.proc = subprocess.Popen([str(RUN), *args], cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, prefix: str, timeout: float) -> str:
        """The first output line that starts with ``prefix`` (after stripping), else TimeoutError with the output."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"no line starting {prefix!r} within {timeout} s:\n{''.join(self.output)}") from None
            if line is None:
                raise RuntimeError(f"scripts/run exited ({self.proc.wait()}) before {prefix!r}:\n{''.join(self.output)}")
            self.output.append(line)
            if line.strip().startswith(prefix):
                return line.strip()[len(prefix):].strip()

    def rest(self) -> str:
        while True:
            try:
                line = self.lines.get(timeout=5)
            except queue.Empty:
                break
            if line is None:
                break
            self.output.append(line)
        return "".join(self.output)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from densecap_core.checkpoint import make_random_checkpoint
    return make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "random.pt")


def jpeg_of(path: Path, size=(320, 240)) -> bytes:
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.open(path).convert("RGB").resize(size).save(buf, "JPEG", quality=85)
    return buf.getvalue()


# --- tests ------------------------------------------------------------------------------------------------------


def test_run_serves_a_frame_and_a_job_then_stops_everything_on_sigint(tmp_path, checkpoint, elephant_path):
    t_start = time.monotonic()
    port = free_port()
    run_dir, state_dir = tmp_path / "run", tmp_path / "state"
    launcher = Launcher("--no-setup", "--checkpoint", str(checkpoint), "--port", str(port), "--host", "127.0.0.1",
                        "--run-dir", str(run_dir), "--state-dir", str(state_dir), "--ready-timeout", "60")
    pids: set[int] = set()
    groups: set[int] = set()
    try:
        url = launcher.wait_for("url:", timeout=75)
        token = launcher.wait_for("token:", timeout=5)
        assert url == f"https://127.0.0.1:{port}/"
        assert token == (state_dir / "token").read_text().strip()
        assert launcher.proc.pid in {v for v in json.loads((run_dir / "processes.json").read_text()).values()}

        pids = descendants(launcher.proc.pid)
        table = proc_table()
        groups = {table[p][1] for p in pids if p in table}
        # redis-server, 2 workers, gunicorn master + its worker, each service in a group of its own
        assert len(pids) >= 5 and len(groups) >= 4, (pids, groups)
        assert launcher.proc.pid not in groups

        # One live frame over wss.
        ws = websocket.create_connection(f"wss://127.0.0.1:{port}/ws/stream", timeout=30,
                                         sslopt={"cert_reqs": ssl.CERT_NONE},
                                         subprotocols=["densecap.v1", f"token.{token}"])
        try:
            assert json.loads(ws.recv())["type"] == "hello"
            ws.send_binary(pack_client_frame(1, time.time() * 1000, jpeg_of(elephant_path)))
            while True:
                msg = json.loads(ws.recv())
                if msg.get("type") in ("result", "error", "dropped"):
                    break
            assert msg["type"] == "result" and msg["seq"] == 1, msg
            assert (msg["width"], msg["height"]) == (320, 240) and isinstance(msg["regions"], list)
        finally:
            ws.close()

        # A bulk job with one image, through the gateway's REST API and the job worker.
        folder = tmp_path / "photos"
        folder.mkdir()
        shutil.copy(elephant_path, folder / "elephant.jpg")
        out = tmp_path / "out"
        submit = subprocess.run(
            [python_exe(), "-m", "densecap_core.cli", "submit", str(folder), "--server", f"https://127.0.0.1:{port}",
             "--token", token, "--ca-cert", str(state_dir / "tls" / "cert.pem"), "--output", str(out), "--quiet"],
            cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=60)
        assert submit.returncode == 0, submit.stdout + submit.stderr
        results = json.loads((out / "results.json").read_text())
        assert [r["img_name"] for r in results["results"]] == ["elephant.jpg"]

        # A second launcher on the same run folder is refused (two Redis servers on one AOF file).
        second = subprocess.run([str(RUN), "--no-setup", "--port", str(free_port()), "--host", "127.0.0.1",
                                 "--run-dir", str(run_dir)], cwd=ROOT, env=child_env(), capture_output=True,
                                text=True, timeout=30)
        assert second.returncode == 2 and "another scripts/run" in second.stderr

        # Ctrl-C: everything stops, nothing is left behind.
        launcher.proc.send_signal(signal.SIGINT)
        assert launcher.proc.wait(45) == 0, launcher.rest()
        deadline = time.monotonic() + 5
        while survivors(pids, groups) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not survivors(pids, groups), f"left running: {survivors(pids, groups)}\n{launcher.rest()}"
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, "the gateway port still answers"
        assert not (run_dir / "processes.json").exists()
        assert time.monotonic() - t_start < 90
    finally:
        if launcher.proc.poll() is None:
            launcher.proc.kill()
        kill_all(pids | descendants(launcher.proc.pid), groups)
        launcher.proc.wait(10)


def test_a_taken_port_is_refused_before_anything_starts(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run([str(RUN), "--no-setup", "--port", str(port), "--host", "127.0.0.1",
                              "--run-dir", str(tmp_path / "run")], cwd=ROOT, env=child_env(), capture_output=True,
                             text=True, timeout=30)
        assert out.returncode == 2
        assert f"port {port}" in out.stderr and "--port" in out.stderr
        assert not (tmp_path / "run").exists(), "nothing may start when a check fails"

        out = subprocess.run([str(RUN), "--no-setup", "--port", str(free_port()), "--host", "127.0.0.1",
                              "--redis-port", str(port), "--run-dir", str(tmp_path / "run")], cwd=ROOT,
                             env=child_env(), capture_output=True, text=True, timeout=30)
        assert out.returncode == 2 and f"--redis-port {port} is already in use" in out.stderr

    out = subprocess.run([str(RUN), "--no-setup", "--checkpoint", str(tmp_path / "missing.pt")], cwd=ROOT,
                         env=child_env(), capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "is not a file" in out.stderr


def test_a_service_that_dies_stops_the_others(tmp_path):
    bad = tmp_path / "not-a-checkpoint.pt"
    bad.write_bytes(b"this is not a checkpoint")
    launcher = Launcher("--no-setup", "--checkpoint", str(bad), "--port", str(free_port()), "--host", "127.0.0.1",
                        "--run-dir", str(tmp_path / "run"), "--state-dir", str(tmp_path / "state"),
                        "--job-workers", "0")
    seen: set[int] = set()
    groups: set[int] = set()
    try:
        launcher.wait_for("run: redis-server on", timeout=30)
        deadline = time.monotonic() + 60
        while launcher.proc.poll() is None and time.monotonic() < deadline:
            now = descendants(launcher.proc.pid)
            table = proc_table()
            seen |= now
            groups |= {table[p][1] for p in now if p in table}
            time.sleep(0.2)
        assert launcher.proc.wait(30) == 1
        output = launcher.rest()
        assert "stream-worker-1 exited with status" in output and "cannot load the model" in output
        assert seen and not survivors(seen, groups), survivors(seen, groups)
    finally:
        if launcher.proc.poll() is None:
            launcher.proc.kill()
        kill_all(seen | descendants(launcher.proc.pid), groups)
        launcher.proc.wait(10)
