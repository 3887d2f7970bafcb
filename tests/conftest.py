"""Shared fixtures: real processes on free ports (redis-server, and helpers to start project services)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ELEPHANT = ROOT.parent / "shared" / "data" / "elephant.jpg"
if not ELEPHANT.exists():
    ELEPHANT = ROOT / "tests" / "data" / "elephant.jpg"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout} s")


class RedisServer:
    """A real ``redis-server`` on a free port that a test may kill and restart (same port, same data dir)."""

    def __init__(self, tmp: Path, password: str = "", appendonly: bool = False):
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed (scripts/setup installs it)")
        self.port = free_port()
        self.dir = tmp
        self.password = password
        self.appendonly = appendonly
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
               "--save", "", "--appendonly", "yes" if self.appendonly else "no", "--loglevel", "warning"]
        if self.password:
            cmd += ["--requirepass", self.password]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, proc=self.proc)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)

    def restart(self) -> None:
        self.kill(signal.SIGTERM)
        self.start()

    def client(self):
        import redis
        return redis.Redis.from_url(self.url, password=self.password or None)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test's report carries the logs of the gateway and workers it ran (tests/livestack.py):
    a failure on CI, under load, is otherwise only a client-side traceback."""
    outcome = yield
    report = outcome.get_result()
    livestack = sys.modules.get("livestack")
    if report.when == "call" and report.failed and livestack is not None:
        logs = "\n".join(stack.logs() for stack in livestack.OPEN_STACKS)
        if logs.strip():
            report.sections.append(("densecap process logs (tests/livestack.py)", logs))


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    yield server
    server.kill()


@pytest.fixture(scope="session")
def elephant_path() -> Path:
    return ELEPHANT


def crops(n: int, size=(360, 240), seed: int = 0, quality: int = 90) -> list[bytes]:
    """``n`` different JPEGs of one size cut from the test photo (same size: batching adds no padding)."""
    import io

    from PIL import Image

    photo = Image.open(ELEPHANT).convert("RGB")
    out = []
    for i in range(n):
        x, y = (7 * i + seed) % (photo.width - size[0]), (5 * i + 3 * seed) % (photo.height - size[1])
        buf = io.BytesIO()
        photo.crop((x, y, x + size[0], y + size[1])).save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def python_exe() -> str:
    """The interpreter running the tests (the .venv one), for starting project processes."""
    return sys.executable


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def synth_h5(root: Path, num_images: int, seed: int, *, val_fraction: float = 0.0) -> dict[str, Path]:
    """A small synthetic dataset (160 px scenes) preprocessed to HDF5 at 128 px: paths of the .h5, its .json and
    the scenes' regions_meta.json. Shared by the evaluation and probe tests."""
    from densecap_core.data.preprocess import PreprocessOptions, preprocess
    from densecap_core.data.synth import SynthOptions, write_dataset

    write_dataset(root / "synth", SynthOptions(num_images=num_images, seed=seed, image_size=160,
                                               val_fraction=val_fraction, test_fraction=0.0), progress=False)
    preprocess(root / "synth" / "region_descriptions.json", root / "synth" / "densecap_splits.json",
               [root / "synth" / "images"], root / "d.h5", root / "d.json",
               image_json=root / "synth" / "image_data.json",
               options=PreprocessOptions(image_size=128, min_token_instances=1, num_workers=1), progress=False)
    return {"root": root, "h5": root / "d.h5", "json": root / "d.json", "meta": root / "synth" / "regions_meta.json"}
