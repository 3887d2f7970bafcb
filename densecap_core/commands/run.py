"""``densecap run`` (what ``scripts/run`` starts): the whole system on this machine as plain processes, no Docker.

    scripts/run                                  # set up if needed, then everything on https://localhost:8443/
    scripts/run --no-setup --port 9443 --workers 2 --checkpoint runs/x/best.pt

What it starts, each in its own process group, logs in ``RUN_DIR/logs/<name>.log``:

1. ``redis-server`` on 127.0.0.1 (a free port, or ``--redis-port``), with a password generated once into
   ``RUN_DIR/redis.password`` (mode 0600; handed to Redis on stdin, never in argv) and its data in
   ``RUN_DIR/redis/`` (AOF, fsync every second: queued bulk jobs survive a restart). ``--redis-url`` uses a Redis
   you run instead (password from ``DENSECAP_REDIS_PASSWORD[_FILE]``).
2. ``--workers`` stream workers and ``--job-workers`` job workers;
3. the gateway (gunicorn over TLS; certificate and token made into the state directory on its first start).

These are the same entrypoints, ``python -m MODULE``, as docker-compose.yml's services (a test compares them);
settings reach them as ``DENSECAP_*`` variables. Once the gateway answers and the workers are registered it
prints the URL and the API token, then watches: Ctrl-C, SIGTERM or SIGHUP stops everything (gateway first, Redis
last, each group given time to finish what it holds; a second Ctrl-C kills at once). A service that exits on
its own stops the rest, and the end of its log is printed.

Exit status: 0 stopped on request, 1 a service failed, 2 a problem to fix first (port taken, ...). Torch-free:
the model is loaded by the worker processes.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from densecap_core.settings import Settings

#: ``python -m`` modules of the services; docker-compose.yml and deploy/k8s run the same ones.
GATEWAY_MODULE = "gateway"
STREAM_WORKER_MODULE = "worker.stream_worker"
JOB_WORKER_MODULE = "worker.job_worker"

#: Seconds each kind of service gets to stop after SIGTERM before its process group is killed.
STOP_TIMEOUT_S = {"gateway": 10.0, "worker": 20.0, "redis": 15.0}
POLL_S = 0.2
LOG_TAIL_CHARS = 3000


class RunError(Exception):
    """A problem the user can fix before anything starts: printed as one line, exit status 2."""


class ServiceDied(Exception):
    def __init__(self, child: "Child"):
        super().__init__(f"{child.name} exited with status {child.proc.returncode}")
        self.child = child


class StopRequested(Exception):
    pass


@dataclass
class Child:
    name: str
    kind: str  # "redis", "worker" or "gateway": decides the stop order and timeout
    proc: subprocess.Popen
    log: Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    s = Settings.from_env()
    p.add_argument("--port", type=int, default=s.port, help=f"gateway HTTPS port (default: DENSECAP_PORT or {s.port})")
    p.add_argument("--host", default=s.host,
                   help=f"gateway bind address (default: DENSECAP_HOST or {s.host}; 127.0.0.1 keeps it to this machine)")
    p.add_argument("--workers", type=int, default=1, help="stream workers (live frames; default 1)")
    p.add_argument("--job-workers", type=int, default=1, help="job workers (bulk folders; default 1)")
    p.add_argument("--checkpoint", type=Path,
                   help="model checkpoint for the workers (default: DENSECAP_CHECKPOINT, else the embedded model)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: DENSECAP_DEVICE, else auto)")
    redis_group = p.add_mutually_exclusive_group()
    redis_group.add_argument("--redis-port", type=int, help="port for the redis-server started here (default: a free one)")
    redis_group.add_argument("--redis-url", help="use this Redis instead of starting one (password from "
                                                 "DENSECAP_REDIS_PASSWORD or DENSECAP_REDIS_PASSWORD_FILE)")
    p.add_argument("--run-dir", type=Path, default=Path("var/run"),
                   help="Redis data, its password, logs and the pid list (default: var/run)")
    p.add_argument("--state-dir", type=Path, default=s.state_dir,
                   help=f"gateway certificate and token (default: DENSECAP_STATE_DIR or {s.state_dir})")
    p.add_argument("--ready-timeout", type=float, default=300.0,
                   help="seconds to wait for the gateway and workers before warning (default 300)")
    p.add_argument("--no-setup", action="store_true", help="(read by scripts/run: skip scripts/setup)")


def run(args: argparse.Namespace) -> int:
    stack = LocalStack(args)
    try:
        stack.check()
    except RunError as exc:
        print(f"run: {exc}", file=sys.stderr)
        stack.release()
        return 2
    return stack.serve()


def service_commands(workers: int, job_workers: int, python: str = sys.executable) -> list[tuple[str, str, list[str]]]:
    """``(name, kind, argv)`` of the Python services in start order: workers first (their model takes longest)."""
    out = [(f"stream-worker-{i}", "worker", [python, "-m", STREAM_WORKER_MODULE]) for i in range(1, workers + 1)]
    out += [(f"job-worker-{i}", "worker", [python, "-m", JOB_WORKER_MODULE]) for i in range(1, job_workers + 1)]
    out.append(("gateway", "gateway", [python, "-m", GATEWAY_MODULE]))
    return out


# --- helpers ---------------------------------------------------------------------------------------------


def port_is_free(host: str, port: int) -> bool:
    """True when a listener could bind ``host:port`` now (SO_REUSEADDR, as gunicorn and Redis bind)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def local_address(host: str) -> str:
    """Where this machine reaches a listener bound to ``host``."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def redis_config_string(value: str) -> str:
    """A value quoted for a Redis config line."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the launcher dies without cleaning up (Linux only)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def log_tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


# --- the stack -------------------------------------------------------------------------------------------


class LocalStack:
    """Redis, workers and gateway as child process groups of this process."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.run_dir = args.run_dir.resolve()
        self.state_dir = args.state_dir.resolve()
        self.settings = Settings.from_env()
        self.children: list[Child] = []
        self.signals = 0
        self.redis_port = args.redis_port
        self._lock_fd: int | None = None

    # checks that need nothing started

    def check(self) -> None:
        a = self.args
        if not 1 <= a.port <= 65535:
            raise RunError(f"--port {a.port} is not a TCP port (1-65535)")
        if a.workers < 0 or a.job_workers < 0:
            raise RunError("--workers and --job-workers must be 0 or more")
        if a.checkpoint is not None and not a.checkpoint.is_file():
            raise RunError(f"--checkpoint {a.checkpoint} is not a file")
        if not port_is_free(a.host, a.port):
            raise RunError(f"port {a.port} on {a.host} is already in use (another gateway or scripts/run?): "
                           f"pick another with --port N, or stop what listens there (ss -ltnp 'sport = :{a.port}')")
        if a.redis_url is None:
            if shutil.which("redis-server") is None:
                raise RunError("redis-server is not installed: run scripts/setup (it installs it), or point "
                               "--redis-url at a Redis you run")
            if self.redis_port is not None and not port_is_free("127.0.0.1", self.redis_port):
                raise RunError(f"--redis-port {self.redis_port} is already in use: pick another, or leave "
                               "--redis-port out to get a free one")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._lock_run_dir()

    def _lock_run_dir(self) -> None:
        # Two launchers on one run dir would run two Redis servers on one AOF file.
        path = self.run_dir / "lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunError(f"another scripts/run (pid {other}) is using {self.run_dir}: stop it first, or give "
                           "this one its own --run-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # the whole life

    def serve(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        status = 0
        try:
            self._start_all()
            self._wait_ready()
            self._print_banner()
            self._watch()
        except StopRequested:
            pass
        except ServiceDied as exc:
            status = 1
            print(f"run: {exc}; stopping the others. End of {exc.child.log}:\n{log_tail(exc.child.log)}",
                  file=sys.stderr, flush=True)
        except RunError as exc:
            status = 2
            print(f"run: {exc}", file=sys.stderr, flush=True)
        finally:
            self._stop_all()
            (self.run_dir / "processes.json").unlink(missing_ok=True)
            self.release()
        return status

    def _on_signal(self, signum, _frame) -> None:
        self.signals += 1
        if self.signals == 1:
            print(f"\nrun: {signal.Signals(signum).name}: stopping (again to kill at once)", file=sys.stderr,
                  flush=True)

    def _check_alive(self) -> None:
        if self.signals:
            raise StopRequested()
        for child in self.children:
            if child.proc.poll() is not None:
                raise ServiceDied(child)

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            self._check_alive()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(POLL_S, left))

    # starting

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "DENSECAP_STATE_DIR": str(self.state_dir),
            "DENSECAP_HOST": self.args.host,
            "DENSECAP_PORT": str(self.args.port),
            "PYTHONUNBUFFERED": "1",
        })
        if self.args.redis_url:
            env["DENSECAP_REDIS_URL"] = self.args.redis_url
        else:
            env["DENSECAP_REDIS_URL"] = f"redis://127.0.0.1:{self.redis_port}/0"
            env.pop("DENSECAP_REDIS_PASSWORD", None)  # ours is in the file, which the variable would override
            env["DENSECAP_REDIS_PASSWORD_FILE"] = str(self.run_dir / "redis.password")
        if self.args.checkpoint is not None:
            env["DENSECAP_CHECKPOINT"] = str(self.args.checkpoint.resolve())
        if self.args.device:
            env["DENSECAP_DEVICE"] = self.args.device
        return env

    def _spawn(self, name: str, kind: str, cmd: list[str], stdin_text: str | None = None) -> Child:
        logs = self.run_dir / "logs"
        logs.mkdir(exist_ok=True)
        log = logs / f"{name}.log"
        with open(log, "ab") as f:
            f.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {name}: {' '.join(cmd)}\n".encode())
            f.flush()
            proc = subprocess.Popen(cmd, env=self._child_env(), stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.PIPE if stdin_text is not None else subprocess.DEVNULL,
                                    start_new_session=True, preexec_fn=_die_with_parent)
        if stdin_text is not None:
            proc.stdin.write(stdin_text.encode())
            proc.stdin.close()
        child = Child(name, kind, proc, log)
        self.children.append(child)
        self._write_pids()
        return child

    def _write_pids(self) -> None:
        pids = {"launcher": os.getpid(), **{c.name: c.proc.pid for c in self.children}}
        (self.run_dir / "processes.json").write_text(json.dumps(pids, indent=1) + "\n")

    def _start_all(self) -> None:
        if self.args.redis_url is None:
            self._start_redis()
        else:
            self._wait_redis()
        a = self.args
        if a.workers or a.job_workers:
            print(f"run: starting {a.workers} stream worker(s) and {a.job_workers} job worker(s) "
                  "(each loads the model: seconds on a GPU, longer on a busy CPU)", flush=True)
        for name, kind, argv in service_commands(a.workers, a.job_workers):
            self._spawn(name, kind, argv)

    def _redis_password(self) -> str:
        path = self.run_dir / "redis.password"
        if not path.is_file():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
        return path.read_text().strip()

    def _start_redis(self) -> None:
        if self.redis_port is None:
            self.redis_port = free_port()
        data = self.run_dir / "redis"
        data.mkdir(exist_ok=True)
        config = "\n".join([
            "bind 127.0.0.1",
            f"port {self.redis_port}",
            "protected-mode yes",
            f"dir {redis_config_string(str(data))}",
            "appendonly yes",
            "appendfsync everysec",
            f"requirepass {redis_config_string(self._redis_password())}",
        ]) + "\n"
        self._spawn("redis", "redis", ["redis-server", "-"], stdin_text=config)
        print(f"run: redis-server on 127.0.0.1:{self.redis_port} (data in {data}, password in "
              f"{self.run_dir / 'redis.password'})", flush=True)
        self._wait_redis()

    def _redis_client(self):
        import redis
        if self.args.redis_url:
            return redis.Redis.from_url(**Settings.from_env(redis_url=self.args.redis_url).redis_kwargs(),
                                        socket_timeout=2)
        return redis.Redis(host="127.0.0.1", port=self.redis_port, password=self._redis_password(), socket_timeout=2)

    def _wait_redis(self, timeout: float = 15.0) -> None:
        import redis
        client = self._redis_client()
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                return
            except redis.AuthenticationError as exc:
                raise RunError(f"Redis refused the password ({exc}): check DENSECAP_REDIS_PASSWORD[_FILE]") from None
            except redis.RedisError as exc:
                if time.monotonic() > deadline:
                    where = self.args.redis_url or f"127.0.0.1:{self.redis_port}"
                    raise RunError(f"Redis at {where} does not answer ({exc.__class__.__name__})") from None
            self._sleep(0.1)

    # waiting and watching

    def _gateway_get(self, path: str) -> tuple[int, dict]:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # our own self-signed certificate, on our own machine
        url = f"https://{url_host(local_address(self.args.host))}:{self.args.port}{path}"
        try:
            with urllib.request.urlopen(url, context=ctx, timeout=3) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def _job_workers_registered(self, client) -> int:
        from rq import Queue, Worker
        return len(Worker.all(queue=Queue(self.settings.jobs_queue, connection=client)))

    def _wait_ready(self) -> None:
        """Until the gateway answers and the workers have registered (a warning, not a failure, after the timeout)."""
        import redis
        client = self._redis_client()
        deadline = time.monotonic() + self.args.ready_timeout
        waiting = "the gateway"
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                _status, body = self._gateway_get("/healthz")
                streams = int(body.get("stream_workers", 0))
                jobs = self._job_workers_registered(client)
            except (OSError, ValueError, redis.RedisError):  # not up yet
                self._sleep(0.25)
                continue
            if streams >= self.args.workers and jobs >= self.args.job_workers:
                return
            waiting = f"workers ({streams}/{self.args.workers} stream, {jobs}/{self.args.job_workers} job)"
            self._sleep(0.25)
        print(f"run: still waiting for {waiting} after {self.args.ready_timeout:.0f} s; going on. Logs: "
              f"{self.run_dir / 'logs'}", file=sys.stderr, flush=True)

    def _token_line(self) -> str:
        if self.settings.api_tokens:
            return "(yours: DENSECAP_API_TOKENS)"
        path = self.state_dir / "token"  # written by the gateway on its first start (gateway/auth.py)
        return path.read_text().strip() if path.is_file() else f"(not found in {path})"

    def _print_banner(self) -> None:
        a = self.args
        host = "localhost" if a.host in ("0.0.0.0", "::", "") else a.host
        base = f"https://{url_host(host)}:{a.port}"
        token = self._token_line()
        cert = self.settings.cert_file or str(self.state_dir / "tls" / "cert.pem")
        lines = [
            "",
            f"DenseCap Live is running: {a.workers} stream worker(s), {a.job_workers} job worker(s).",
            f"  url:         {base}/",
            f"  token:       {token}",
            f"  live camera: {base}/live/#token={token}" if not token.startswith("(") else f"  live camera: {base}/live/",
            f"  bulk jobs:   {base}/jobs/   or   densecap submit DIR --server {base} --token TOKEN --ca-cert {cert}",
            f"  certificate: {cert} (self-signed unless DENSECAP_CERT_FILE is set: the browser warns once)",
            f"  logs:        {self.run_dir / 'logs'}/",
        ]
        if a.host in ("0.0.0.0", "::"):
            lines.insert(3, f"  on the LAN:  https://{socket.gethostname()}:{a.port}/")
        lines.append("Ctrl-C stops everything.")
        print("\n".join(lines), flush=True)

    def _watch(self) -> None:
        while True:
            self._sleep(1.0)

    # stopping

    def _stop_all(self) -> None:
        """Stop the gateway first (no new work), then the workers, then Redis; kill whatever outlives its time."""
        for kind in ("gateway", "worker", "redis"):
            group = [c for c in self.children if c.kind == kind]
            for child in group:
                self._signal_group(child, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT_S[kind]
            for child in group:
                while child.proc.poll() is None and time.monotonic() < deadline and self.signals < 2:
                    time.sleep(0.05)
                if child.proc.poll() is None:
                    print(f"run: {child.name} did not stop in time; killing it", file=sys.stderr, flush=True)
                    self._signal_group(child, signal.SIGKILL)
                    child.proc.wait()
        # A group can outlive its leader (gunicorn's workers, say): sweep every group once more.
        for child in self.children:
            self._signal_group(child, signal.SIGKILL)
        if self.children:
            print("run: stopped", file=sys.stderr, flush=True)

    @staticmethod
    def _signal_group(child: Child, sig: int) -> None:
        try:
            os.killpg(child.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
