"""Real processes for the live-path tests: ``python -m gateway`` (gunicorn over TLS) and
``python -m worker.stream_worker``, started as the deployment starts them, on a real redis-server.

Each process runs in its own process group so cleanup can end it and its children (gunicorn workers)
without touching anything else. Logs go to files in the stack's directory and are printed when a
start fails.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import websocket
from PIL import Image

from conftest import child_env, free_port, python_exe, wait_for_port, ROOT
from gateway.tlssock import SerializedTLSSocket

_INSECURE = ssl.create_default_context()
_INSECURE.check_hostname = False
_INSECURE.verify_mode = ssl.CERT_NONE


#: Stacks not yet closed: a failing test's report shows their process logs (tests/conftest.py).
OPEN_STACKS: list["LiveStack"] = []


class LiveStack:
    """A gateway (and any number of stream workers) against one redis-server."""

    def __init__(self, tmp: Path, redis_server, checkpoint: Path | None = None, **env: str):
        self.dir = Path(tmp)
        self.redis_server = redis_server
        self.checkpoint = checkpoint
        self.port = free_port()
        self.state_dir = self.dir / "state"
        self.env = {
            "DENSECAP_REDIS_URL": redis_server.url,
            "DENSECAP_STATE_DIR": str(self.state_dir),
            "DENSECAP_PORT": str(self.port),
            "DENSECAP_HOST": "127.0.0.1",
            "DENSECAP_DEVICE": "cpu",
            **({"DENSECAP_CHECKPOINT": str(checkpoint)} if checkpoint else {}),
            **{k: str(v) for k, v in env.items()},
        }
        self.gateway: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self._logs: list[Path] = []
        OPEN_STACKS.append(self)

    # --- processes ------------------------------------------------------------------------------

    def _spawn(self, args: list[str], log_name: str, **env: str) -> subprocess.Popen:
        log_path = self.dir / log_name
        self._logs.append(log_path)
        with open(log_path, "ab") as log:
            return subprocess.Popen([python_exe(), *args], cwd=ROOT, env=child_env(**{**self.env, **env}),
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def start_gateway(self, timeout: float = 30.0, **env: str) -> subprocess.Popen:
        self.gateway = self._spawn(["-m", "gateway"], "gateway.log", **env)
        try:
            wait_for_port(self.port, timeout, proc=self.gateway)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    self.get("/livez")
                    return self.gateway
                except OSError:
                    time.sleep(0.1)
            raise TimeoutError("gateway did not answer /livez")
        except Exception:
            print(self.logs())
            raise

    def start_worker(self, timeout: float = 60.0, name: str | None = None, **env: str) -> subprocess.Popen:
        """Start a stream worker and wait until its heartbeat shows it is ready to serve."""
        name = name or f"test-worker-{len(self.workers)}"
        proc = self._spawn(["-m", "worker.stream_worker", "--name", name], f"{name}.log", **env)
        self.workers.append(proc)
        client = self.redis_server.client()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                print(self.logs())
                raise RuntimeError(f"stream worker exited with {proc.returncode} while starting")
            try:
                if client.zscore("dc:workers", name) is not None:
                    return proc
            except Exception:  # Redis may be restarting in a test; keep waiting
                pass
            time.sleep(0.1)
        print(self.logs())
        raise TimeoutError(f"stream worker {name} sent no heartbeat within {timeout} s")

    @staticmethod
    def stop_process(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if proc is None:
            return None
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        # Children (gunicorn workers) share the group; make sure none outlives the test.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return proc.returncode

    def close(self) -> None:
        for w in self.workers:
            self.stop_process(w)
        self.stop_process(self.gateway)
        if self in OPEN_STACKS:
            OPEN_STACKS.remove(self)

    def logs(self) -> str:
        out = []
        for p in self._logs:
            if p.exists():
                out.append(f"----- {p.name} -----\n{p.read_text(errors='replace')[-4000:]}")
        return "\n".join(out)

    # --- clients --------------------------------------------------------------------------------

    @property
    def token(self) -> str:
        return (self.state_dir / "token").read_text().strip()

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def get(self, path: str, headers: dict | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(self.base + path, headers=headers or {})
        try:
            with urllib.request.urlopen(req, context=_INSECURE, timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def get_json(self, path: str) -> tuple[int, dict]:
        status, body = self.get(path)
        return status, json.loads(body)

    def connect(self, token: str | None = "", origin: str | None = None, timeout: float = 10.0,
                subprotocols: list[str] | None = None, threadsafe: bool = False) -> websocket.WebSocket:
        """A websocket to /ws/stream; ``token=""`` means the stack's token, ``None`` means none.

        ``threadsafe=True`` is for a test that receives on one thread while it sends on another: the TLS
        socket is then a ``SerializedTLSSocket`` (concurrent calls on a bare ``SSLSocket`` can corrupt it).
        """
        token = self.token if token == "" else token
        protos = subprotocols or (["densecap.v1"] + ([f"token.{token}"] if token else []))
        kwargs = {"origin": origin} if origin else {}
        if threadsafe:
            raw = _INSECURE.wrap_socket(socket.create_connection(("127.0.0.1", self.port), timeout=timeout))
            kwargs["socket"] = SerializedTLSSocket(raw)
        ws = websocket.create_connection(f"wss://127.0.0.1:{self.port}/ws/stream", timeout=timeout,
                                         sslopt={"cert_reqs": ssl.CERT_NONE}, subprotocols=protos, **kwargs)
        return ws


@contextlib.contextmanager
def running_stack(tmp: Path, checkpoint: Path | None, worker_timeout: float = 60.0, **env: str):
    """A redis-server, a gateway and one stream worker, all stopped on exit (for module-scoped fixtures)."""
    from conftest import RedisServer

    redis_server = RedisServer(tmp)
    stack = LiveStack(tmp, redis_server, checkpoint, **env)
    try:
        stack.start_gateway()
        stack.start_worker(timeout=worker_timeout)
        yield stack
    finally:
        stack.close()
        redis_server.kill()


def recv_json(ws: websocket.WebSocket, timeout: float = 10.0) -> dict:
    ws.settimeout(timeout)
    return json.loads(ws.recv())


def recv_until(ws: websocket.WebSocket, pred, timeout: float = 10.0) -> tuple[dict, list[dict]]:
    """Receive until a message satisfies ``pred``; returns it and everything received before it."""
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no matching message within {timeout} s; got {seen[-5:]}")
        try:
            msg = recv_json(ws, left)
        except websocket.WebSocketTimeoutException:
            raise TimeoutError(f"no matching message within {timeout} s; got {seen[-5:]}") from None
        if pred(msg):
            return msg, seen
        seen.append(msg)


def jpeg(width: int, height: int, color=(90, 140, 200), noise: bool = False, quality: int = 85) -> bytes:
    """A JPEG of one colour (a few KB) or of random noise (large: JPEG cannot compress noise)."""
    im = Image.frombytes("RGB", (width, height), os.urandom(width * height * 3)) if noise \
        else Image.new("RGB", (width, height), color)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory):
    """A tiny random-weight checkpoint (its captions are random words), made once per test module."""
    from densecap_core.checkpoint import make_random_checkpoint
    return make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "random.pt")
