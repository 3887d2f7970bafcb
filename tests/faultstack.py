"""The whole system as deployed, for fault-injection tests: a password-protected redis-server with AOF
(``appendonly yes``, as docker-compose.yml and scripts/run run it), the gateway (gunicorn over TLS), stream
workers and job workers, each a real process in its own process group.

Built on ``livestack.LiveStack`` (the live-path tests' process helpers) and adds job workers, fixed API tokens
and the Redis password. The live clients are ``scripts/soak.py``'s ``LiveSession`` (the browser's flow control:
one frame in flight, in-flight timeout, reconnect with backoff), loaded from there so the load test, the soak
script and these tests share one client.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, RedisServer
from livestack import LiveStack

TOKEN = "reliability-token-7c1f0e9a55d24b8e"
OTHER_TOKEN = "reliability-other-token-0b4e61d2c3"
REDIS_PASSWORD = "reliability-redis-pw-93f1c2aa7be04d"


def load_soak():
    """``scripts/soak.py`` as a module (it is a script, not a package)."""
    if "soak" in sys.modules:
        return sys.modules["soak"]
    spec = importlib.util.spec_from_file_location("soak", ROOT / "scripts" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module
    spec.loader.exec_module(module)
    return module


def deployed_redis(tmp: Path) -> RedisServer:
    """A redis-server with a password and AOF persistence, as in deployment."""
    return RedisServer(tmp, password=REDIS_PASSWORD, appendonly=True)


class SystemStack(LiveStack):
    """Gateway, stream workers and job workers against one password-protected redis-server."""

    def __init__(self, tmp: Path, redis_server: RedisServer, checkpoint: Path, **env: str):
        env.setdefault("DENSECAP_API_TOKENS", f"{TOKEN} {OTHER_TOKEN}")
        env.setdefault("DENSECAP_REDIS_PASSWORD", redis_server.password)
        super().__init__(tmp, redis_server, checkpoint, **env)
        self.job_workers: dict[str, subprocess.Popen] = {}
        self.stream_workers: dict[str, subprocess.Popen] = {}

    @property
    def token(self) -> str:
        return TOKEN

    @property
    def ws_url(self) -> str:
        return f"wss://127.0.0.1:{self.port}/ws/stream"

    @property
    def cert(self) -> Path:
        return self.state_dir / "tls" / "cert.pem"

    # --- workers, started in parallel (each loads torch and a model: seconds) -------------------------------

    def start_stream_workers(self, *names: str, timeout: float = 120.0, **env: str) -> None:
        procs = {n: self._spawn(["-m", "worker.stream_worker", "--name", n], f"{n}.log", **env) for n in names}
        self.workers.extend(procs.values())
        self.stream_workers.update(procs)
        r = self.redis_server.client()
        self._wait_all(procs, lambda n: r.zscore("dc:workers", n) is not None, timeout, "heartbeat")

    def start_job_workers(self, *names: str, args: tuple[str, ...] = (), timeout: float = 120.0, **env: str) -> None:
        procs = {n: self._spawn(["-m", "worker.job_worker", "--name", n, "--log-level", "INFO", *args],
                                f"{n}.log", **env) for n in names}
        self.workers.extend(procs.values())
        self.job_workers.update(procs)
        self._wait_all(procs, self.job_worker_registered, timeout, "RQ registration")

    def job_worker_registered(self, name: str) -> bool:
        return self.redis_server.client().exists(f"rq:worker:{name}") == 1

    def _wait_all(self, procs: dict, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        waiting = set(procs)
        while waiting and time.monotonic() < deadline:
            for name in list(waiting):
                if procs[name].poll() is not None:
                    print(self.logs())
                    raise RuntimeError(f"{name} exited with {procs[name].returncode} while starting")
                try:
                    if ready(name):
                        waiting.discard(name)
                except Exception:  # Redis may be restarting in a test; keep waiting
                    pass
            time.sleep(0.1)
        if waiting:
            print(self.logs())
            raise TimeoutError(f"no {what} from {sorted(waiting)} within {timeout} s")

    def kill_worker(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.stream_workers.get(name) or self.job_workers[name]
        os.killpg(proc.pid, sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            proc.wait(30)

    def alive(self, procs: dict[str, subprocess.Popen]) -> list[str]:
        return [n for n, p in procs.items() if p.poll() is None]

    def ensure_stream_worker(self, name: str, **env: str) -> None:
        """At least one stream worker running (tests of this module may have killed the others)."""
        if not self.alive(self.stream_workers):
            self.start_stream_workers(name, **env)

    def ensure_job_worker(self, name: str, args: tuple[str, ...] = (), **env: str) -> None:
        if not self.alive(self.job_workers):
            self.start_job_workers(name, args=args, **env)

    # --- clients -----------------------------------------------------------------------------------------------

    def jobs_client(self, token: str = TOKEN, retry_for_s: float = 30.0):
        from client.jobs_client import JobsClient
        return JobsClient(self.base, token, verify=str(self.cert), retry_for_s=retry_for_s)

    def sessions(self, n: int, **kwargs):
        """``n`` live sessions (not started) of scripts/soak.py, each with frames of its own size."""
        return load_soak().make_sessions(self.ws_url, self.token, n, **kwargs)

    def submit_cmd(self, folder: Path, out: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "densecap_core.cli", "submit", str(folder), "--server", self.base,
                "--token", TOKEN, "--output", str(out), "--ca-cert", str(self.cert), "--quiet", *extra]

    def all_logs(self) -> dict[str, str]:
        return {p.name: p.read_text(errors="replace") for p in self._logs if p.exists()}


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def job_results_exactly_once(client, job_id: str, names: list[str]) -> dict:
    """The job's status after checking that its results log names every image exactly once."""
    records, cursor = [], 0
    while True:
        page = client.results(job_id, cursor, 2000)
        records += page["results"]
        if page["next_cursor"] == cursor:
            break
        cursor = page["next_cursor"]
    got = sorted(r["name"] for r in records)
    assert got == sorted(names), f"results log: {len(got)} entries for {len(names)} images; duplicates or gaps"
    assert all("error" not in r for r in records), [r for r in records if "error" in r][:3]
    return client.status(job_id)


def secrets_in(text: str, secrets: list[str]) -> list[str]:
    """Lines of ``text`` containing any of ``secrets`` (or a long-enough piece of one)."""
    pieces = [s for s in secrets if s] + [s[len(s) // 2:] for s in secrets if len(s) >= 24]
    pattern = re.compile("|".join(re.escape(p) for p in pieces))
    return [line for line in text.splitlines() if pattern.search(line)]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
