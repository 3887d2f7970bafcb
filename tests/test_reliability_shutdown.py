"""SIGTERM to everything, and what a kill leaves behind, with the real launcher (``scripts/run``: redis-server
with a password and AOF, gateway, stream and job workers, as a user runs it).

1. ``densecap submit``'s output folder after a kill at the worst moments (a results.jsonl line cut in half, a
   viewer image cut short, no results.json yet): running the same command again must finish with every result
   and every file whole.
2. SIGTERM to the launcher and to a running ``densecap submit`` while a live session streams: everything stops
   within the launcher's stop timeouts, no process is left (pids and process groups), the session is closed
   with 1001, and no file in the output folder is half written.
3. Secrets: no token or Redis password in any log under the run directory; the token appears on the launcher's
   terminal only where it is printed on purpose; the launcher's Redis refuses clients without the password.
(tests/test_scripts_run.py covers SIGINT and a service that dies.)
"""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
import redis
from PIL import Image

from conftest import ELEPHANT, ROOT, child_env, free_port, python_exe
from faultstack import load_soak, read_jsonl, secrets_in, wait_for
from test_scripts_run import Launcher, descendants, kill_all, proc_table, survivors

pytestmark = pytest.mark.slow
SOAK = load_soak()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from densecap_core.checkpoint import make_random_checkpoint
    return make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "random.pt")


def photos(folder, n: int, seed: int = 0, size=(200, 150)) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    photo = Image.open(ELEPHANT).convert("RGB")
    names = []
    for i in range(n):
        x, y = (13 * i + seed) % (photo.width - size[0]), (9 * i + seed) % (photo.height - size[1])
        name = f"sub{i % 2}/p{i:02d}.jpg"
        (folder / name).parent.mkdir(exist_ok=True)
        photo.crop((x, y, x + size[0], y + size[1])).save(folder / name, quality=85)
        names.append(name)
    return names


def assert_output_whole(out, names: list[str], finished: bool) -> None:
    """No half-written file: every results.jsonl line but possibly a torn last one parses, job.json parses,
    results.json (if there) parses, every viewer image decodes."""
    if (out / "job.json").exists():
        json.loads((out / "job.json").read_text())
    lines = (out / "results.jsonl").read_text().split("\n") if (out / "results.jsonl").exists() else []
    for line in lines[:-1]:
        json.loads(line)
    if (out / "results.json").exists():
        doc = json.loads((out / "results.json").read_text())
        if finished:
            assert sorted(r["img_name"] for r in doc["results"]) == sorted(names) and doc["errors"] == []
    for name in names:
        if (out / name).exists():
            with Image.open(out / name) as im:
                im.load()  # raises on a truncated file


@pytest.fixture(scope="module")
def launched(tmp_path_factory, checkpoint):
    tmp = tmp_path_factory.mktemp("launched")
    port = free_port()
    run_dir, state_dir = tmp / "run", tmp / "state"
    launcher = Launcher("--no-setup", "--checkpoint", str(checkpoint), "--port", str(port), "--host", "127.0.0.1",
                        "--run-dir", str(run_dir), "--state-dir", str(state_dir), "--ready-timeout", "90")
    try:
        launcher.wait_for("url:", timeout=120)
        token = launcher.wait_for("token:", timeout=5)
        pids = descendants(launcher.proc.pid)
        groups = {proc_table()[p][1] for p in pids if p in proc_table()}
        yield {"launcher": launcher, "port": port, "token": token, "run_dir": run_dir, "state_dir": state_dir,
               "pids": pids, "groups": groups, "tmp": tmp}
    finally:
        if launcher.proc.poll() is None:
            launcher.proc.kill()
        kill_all(descendants(launcher.proc.pid) | pids, groups)
        launcher.proc.wait(10)


def submit_cmd(launched, folder, out) -> list[str]:
    return [python_exe(), "-m", "densecap_core.cli", "submit", str(folder), "--server",
            f"https://127.0.0.1:{launched['port']}", "--token", launched["token"], "--output", str(out),
            "--ca-cert", str(launched["state_dir"] / "tls" / "cert.pem"), "--quiet"]


def test_submit_output_cut_by_a_kill_is_repaired_by_the_next_run(launched):
    folder, out = launched["tmp"] / "photos", launched["tmp"] / "out"
    names = photos(folder, 6)
    first = subprocess.run(submit_cmd(launched, folder, out), cwd=ROOT, env=child_env(), capture_output=True,
                           text=True, timeout=180)
    assert first.returncode == 0, first.stderr
    assert_output_whole(out, names, finished=True)
    # What a kill in the middle of writing leaves: half of the last results.jsonl line, a viewer image still in
    # its temporary file (save_whole, below), no results.json yet.
    jsonl = (out / "results.jsonl").read_bytes().rstrip(b"\n").split(b"\n")
    torn = json.loads(jsonl[-1])["name"]
    (out / "results.jsonl").write_bytes(b"\n".join(jsonl[:-1]) + b"\n" + jsonl[-1][: len(jsonl[-1]) // 2])
    cut = out / names[0]
    cut.with_name(f".{cut.stem}.partial{cut.suffix}").write_bytes(cut.read_bytes()[:300])
    cut.unlink()
    (out / "results.json").unlink()

    again = subprocess.run(submit_cmd(launched, folder, out), cwd=ROOT, env=child_env(), capture_output=True,
                           text=True, timeout=180)
    assert again.returncode == 0, again.stderr
    doc = json.loads((out / "results.json").read_text())
    assert doc["errors"] == [], f"after a torn line ({torn}): {doc['errors']}"
    assert sorted(r["img_name"] for r in doc["results"]) == sorted(names)
    assert_output_whole(out, names, finished=True)
    assert {r["name"] for r in read_jsonl_tolerant(out / "results.jsonl")} == set(names)


def test_viewer_images_are_never_half_written(tmp_path):
    """A save killed midway (here: raising after half the bytes) leaves nothing under the image's name."""
    from client.submit import save_whole

    class DiesMidway:
        def save(self, path, **kwargs):
            with open(path, "wb") as f:
                f.write(b"\xff\xd8half a jpeg")
            raise KeyboardInterrupt("killed")

    target = tmp_path / "a.jpg"
    with pytest.raises(KeyboardInterrupt):
        save_whole(DiesMidway(), target)
    assert not target.exists()
    save_whole(Image.new("RGB", (8, 8)), target)
    with Image.open(target) as im:
        im.load()


def read_jsonl_tolerant(path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def test_sigterm_stops_everything_leaving_nothing_running_or_half_written(launched):
    launcher, port, token = launched["launcher"], launched["port"], launched["token"]
    run_dir = launched["run_dir"]
    password = (run_dir / "redis.password").read_text().strip()
    # The launcher's Redis refuses a client without the password.
    redis_port = next(int(line.split("127.0.0.1:")[1].split()[0]) for line in launcher.output
                      if "redis-server on 127.0.0.1:" in line)
    with pytest.raises((redis.ResponseError, redis.AuthenticationError), match="NOAUTH|authenticat"):
        redis.Redis(port=redis_port, socket_timeout=5).set("x", 1)

    session = SOAK.make_sessions(f"wss://127.0.0.1:{port}/ws/stream", token, 1, fps=5, reconnect=False)[0]
    session.start()
    wait_for(lambda: session.stats.results >= 2, 60, "live results")
    folder, out = launched["tmp"] / "many", launched["tmp"] / "out-many"
    names = photos(folder, 40, seed=5)
    submit = subprocess.Popen(submit_cmd(launched, folder, out), cwd=ROOT, env=child_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(lambda: (out / "results.jsonl").exists() and len(read_jsonl_tolerant(out / "results.jsonl")) >= 2,
             120, "results arriving", interval=0.1)
    pids = descendants(launcher.proc.pid) | launched["pids"]
    table = proc_table()
    groups = {table[p][1] for p in pids if p in table} | launched["groups"]

    t0 = time.monotonic()
    launcher.proc.send_signal(signal.SIGTERM)
    submit.send_signal(signal.SIGTERM)
    assert launcher.proc.wait(60) == 0, launcher.rest()
    stopped_s = time.monotonic() - t0
    submit.wait(10)
    session.join(10)
    deadline = time.monotonic() + 5
    while survivors(pids, groups) and time.monotonic() < deadline:
        time.sleep(0.1)
    print(f"SIGTERM: launcher and all services gone after {stopped_s:.1f} s (bound 10 + 20 + 15 s); live session "
          f"closes {dict(session.stats.closes)}; submit exit {submit.returncode} with "
          f"{len(read_jsonl_tolerant(out / 'results.jsonl'))} of {len(names)} results written")
    assert not survivors(pids, groups), f"left running: {survivors(pids, groups)}"
    assert stopped_s < 10 + 20 + 15
    assert session.stats.closes.get(1001) == 1 or not session.is_alive()
    assert_output_whole(out, names, finished=False)

    # Secrets: none in the services' logs; the token only where the launcher prints it for the user.
    logs = {p.name: p.read_text(errors="replace") for p in (run_dir / "logs").glob("*.log")}
    assert len(logs) >= 4, sorted(logs)
    leaks = {name: secrets_in(text, [token, password])[:3] for name, text in logs.items()}
    assert not any(leaks.values()), leaks
    printed = [line for line in launcher.rest().splitlines() if token in line]
    assert all(line.strip().startswith(("token:", "live camera:")) for line in printed), printed
    assert not secrets_in(launcher.rest(), [password])
