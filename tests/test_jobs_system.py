"""Bulk jobs end to end, with real parts only: redis-server, the gateway as ``python -m gateway`` (gunicorn over
TLS), job workers as ``python -m worker.job_worker`` and ``densecap submit`` as a subprocess.

Each scenario that needs its own configuration (chunk size, backlog, a slow worker) gets its own gateway
and RQ queue on the shared redis-server; every process runs in its own process group and is ended at
teardown. The model is a tiny random-weight checkpoint on the CPU.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis
from PIL import Image

from client.jobs_client import ApiError, JobsClient, UploadFile
from conftest import ROOT, RedisServer, crops, child_env, free_port, python_exe, wait_for_port
from densecap_core import protocol

TOKEN = "test-token-0123456789"
pytestmark = pytest.mark.slow


class JobStack:
    """A gateway and job workers on one queue of a shared redis-server."""

    def __init__(self, tmp: Path, redis_url: str, checkpoint: Path, queue: str, **env):
        self.dir = tmp
        self.port = free_port()
        self.queue = queue
        self.redis = redis.Redis.from_url(redis_url)
        self.env = {"DENSECAP_REDIS_URL": redis_url, "DENSECAP_PORT": str(self.port),
                    "DENSECAP_HOST": "127.0.0.1", "DENSECAP_STATE_DIR": str(tmp / "state"),
                    "DENSECAP_API_TOKENS": TOKEN, "DENSECAP_JOBS_QUEUE": queue, "DENSECAP_DEVICE": "cpu",
                    "DENSECAP_CHECKPOINT": str(checkpoint), "OMP_NUM_THREADS": "1",
                    **{k: str(v) for k, v in env.items()}}
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def spawn(self, args: list[str], log_name: str, **env) -> subprocess.Popen:
        log = self.dir / log_name
        self.logs.append(log)
        with open(log, "ab") as f:
            proc = subprocess.Popen([python_exe(), *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                    env=child_env(**{**self.env, **env}), start_new_session=True)
        self.procs.append(proc)
        return proc

    def start_gateway(self) -> None:
        proc = self.spawn(["-m", "gateway"], "gateway.log")
        try:
            wait_for_port(self.port, 30, proc=proc)
        except Exception:
            print(self.log_text())
            raise

    def start_worker(self, name: str, *args: str, wait: bool = True, **env) -> subprocess.Popen:
        proc = self.spawn(["-m", "worker.job_worker", "--name", name, "--log-level", "WARNING", *args],
                          f"{name}.log", **env)
        if wait:
            self.wait_for(lambda: self.worker_registered(name), 90, f"job worker {name} to start", proc)
        return proc

    def worker_registered(self, name: str) -> bool:
        from rq import Queue, Worker
        return any(w.name == name for w in Worker.all(queue=Queue(self.queue, connection=self.redis)))

    def wait_for(self, predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if proc is not None and proc.poll() is not None:
                print(self.log_text())
                raise RuntimeError(f"process exited with {proc.returncode} while waiting for {what}")
            time.sleep(0.05)
        print(self.log_text())
        raise TimeoutError(f"timed out after {timeout} s waiting for {what}")

    @staticmethod
    def kill(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        try:  # gunicorn's workers share the group: none may outlive the test
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def close(self) -> None:
        for proc in reversed(self.procs):
            self.kill(proc)

    def log_text(self) -> str:
        return "\n".join(f"----- {p.name} -----\n{p.read_text(errors='replace')[-3000:]}"
                         for p in self.logs if p.exists())

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def cert(self) -> Path:
        return self.dir / "state" / "tls" / "cert.pem"

    def client(self, token: str = TOKEN) -> JobsClient:
        return JobsClient(self.server, token, verify=str(self.cert), retry_for_s=10)

    def submit_cmd(self, folder: Path, out: Path, *extra: str, token: str = TOKEN) -> list[str]:
        return [python_exe(), "-m", "densecap_core.cli", "submit", str(folder), "--server", self.server,
                "--token", token, "--output", str(out), "--ca-cert", str(self.cert), "--quiet", *extra]

    def submit(self, folder: Path, out: Path, *extra: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.submit_cmd(folder, out, *extra, **kw), cwd=ROOT, env=child_env(),
                              capture_output=True, text=True, timeout=timeout)

    def status(self, job_id: str) -> dict:
        return self.client().status(job_id)

    def wait_finished(self, job_id: str, timeout: float = 120) -> dict:
        return self.wait_for(lambda: (s := self.status(job_id))["state"] in ("finished", "canceled") and s,
                             timeout, f"job {job_id} to finish")


# --- fixtures and data ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server.url
    server.kill()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from densecap_core.checkpoint import make_random_checkpoint
    return make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "random.pt")


@pytest.fixture
def make_stack(tmp_path, redis_url, checkpoint):
    stacks = []

    def make(queue: str, **env) -> JobStack:
        stack = JobStack(tmp_path / queue, redis_url, checkpoint, queue, **env)
        (tmp_path / queue).mkdir()
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.close()


MAX_UPLOAD = 1_000_000
MAX_PIXELS = 2_000_000


@pytest.fixture(scope="module")
def main_stack(tmp_path_factory, redis_url, checkpoint):
    """Gateway + one normal worker, shared by the tests that only need a working system."""
    tmp = tmp_path_factory.mktemp("main")
    # Batches of one: the worker then runs exactly the computation a direct Captioner call does (batch
    # composition, which depends on upload order, changes float rounding and so near-tie captions).
    stack = JobStack(tmp, redis_url, checkpoint, "main", DENSECAP_MAX_UPLOAD_BYTES=MAX_UPLOAD,
                     DENSECAP_MAX_IMAGE_PIXELS=MAX_PIXELS, DENSECAP_BATCH_SIZE=1)
    try:
        stack.start_worker("main-w1", wait=False)
        stack.start_gateway()
        stack.wait_for(lambda: stack.worker_registered("main-w1"), 90, "job worker main-w1", stack.procs[0])
        yield stack
    finally:
        stack.close()




def write_folder(root: Path) -> dict[str, str]:
    """A folder with good and bad files; returns name -> what the result must be ('ok' or an error hint)."""
    good = crops(5)
    files = {"a.jpg": good[0], "b.jpg": good[1], "nested/c.jpg": good[2], "nested/deeper/d.jpg": good[3],
             "nested/copy-of-a.jpg": good[0], "e.png": None}
    expect = {name: "ok" for name in files}
    png = io.BytesIO()
    Image.open(io.BytesIO(good[4])).save(png, "PNG")
    files["e.png"] = png.getvalue()
    files["corrupt.jpg"] = good[1][: len(good[1]) // 3]
    expect["corrupt.jpg"] = "not a readable image"
    files["notes.txt"] = b"a text file, not an image\n"
    expect["notes.txt"] = "not a readable image"
    files["huge.jpg"] = os.urandom(MAX_UPLOAD + 10)
    expect["huge.jpg"] = "over the per-image limit"
    big = io.BytesIO()
    Image.new("L", (2000, 1500)).save(big, "PNG")  # 3 MP in a few KB: refused from its header
    files["nested/too-many-pixels.png"] = big.getvalue()
    expect["nested/too-many-pixels.png"] = "over the limit"
    files[".hidden.jpg"] = good[2]
    files[".git/ignored.jpg"] = good[2]
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return expect


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def job_of(out: Path) -> str:
    return json.loads((out / "job.json").read_text())["id"]


# --- scenarios -----------------------------------------------------------------------------------------------


def test_submit_folder_matches_direct_captioner_and_resumes(main_stack, tmp_path, checkpoint):
    folder, out = tmp_path / "photos", tmp_path / "out"
    expect = write_folder(folder)
    run = main_stack.submit(folder, out, "--draw")
    assert run.returncode == 0, run.stderr + main_stack.log_text()
    assert "view with: densecap view" in run.stderr

    doc = json.loads((out / "results.json").read_text())
    ok = {r["img_name"]: r for r in doc["results"]}
    errors = {e["img_name"]: e["error"] for e in doc["errors"]}
    assert set(ok) == {n for n, e in expect.items() if e == "ok"}
    assert set(errors) == {n for n, e in expect.items() if e != "ok"}
    for name, hint in expect.items():
        if hint != "ok":
            assert hint in errors[name], (name, errors[name])
    assert doc["opt"]["config"] == "tiny" and doc["opt"]["job_id"] == job_of(out)

    # Same boxes, scores and captions as the model called directly on the same bytes.
    import torch
    from densecap_core.inference import Captioner
    captioner = Captioner(str(checkpoint), device="cpu", max_pixels=MAX_PIXELS, batch_size=1)
    names = sorted(ok)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker runs (OMP_NUM_THREADS=1)
    try:
        direct = captioner.caption([(folder / n).read_bytes() for n in names], names)
    finally:
        torch.set_num_threads(threads)
    lines = read_jsonl(out / "results.jsonl")
    by_name = {r["name"]: r for r in lines}
    for name, res in zip(names, direct):
        got, raw = ok[name], by_name[name]
        assert got["captions"] == [r.caption for r in res.regions] == [r["caption"] for r in raw["regions"]]
        assert got["scores"] == pytest.approx([r.score for r in res.regions], abs=2e-3)
        # results.jsonl: pixels of the submitted image, exactly what the model said (same computation);
        # results.json: pixels of the saved viewer image
        assert raw["regions"] == [r.to_dict() for r in res.regions], name
        saved = Image.open(out / name)
        assert max(saved.size) == captioner.image_size and got["original_size"] == [res.width, res.height]
        scale = saved.width / res.width
        assert [v for box in got["boxes"] for v in box] == pytest.approx(
            [v * scale for r in res.regions for v in r.box], abs=0.05)
        assert (out / "drawn" / name).is_file()

    assert sorted(r["name"] for r in lines) == sorted(expect)  # one line per file, dotfiles skipped
    status = main_stack.status(job_of(out))
    unique = len({(folder / n).read_bytes() for n in expect})
    assert status["state"] == "finished" and status["counts"]["images"] == len(expect)
    assert status["computed"] == unique  # copy-of-a.jpg shares a.jpg's result
    stored_before = status["stored"]

    # Re-running the same command: nothing is uploaded or captioned again, outputs unchanged.
    again = main_stack.submit(folder, out, "--draw")
    assert again.returncode == 0, again.stderr
    status = main_stack.status(job_of(out))
    assert status["computed"] == unique and status["stored"] == stored_before
    assert len(read_jsonl(out / "results.jsonl")) == len(lines)

    # --no-wait prints the job id of a new job, which finishes on its own.
    nowait = main_stack.submit(folder, tmp_path / "out2", "--no-wait")
    assert nowait.returncode == 0, nowait.stderr
    job_id = nowait.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{32}", job_id)
    assert main_stack.wait_finished(job_id, 60)["counts"]["done"] == len(expect)


def test_live_frames_go_first(main_stack):
    """While live frames wait and a stream worker is alive, a chunk holds off between batches."""
    r = main_stack.redis
    client = main_stack.client()

    def run_chunk(seed: int) -> dict:
        job = client.create_job()["id"]
        client.upload(job, [UploadFile(f"{i}.jpg", data) for i, data in enumerate(crops(2, seed=seed))])
        client.seal(job)
        main_stack.wait_finished(job, 60)
        from rq.job import Job
        chunk_id = r.smembers(protocol.job_chunks_key(job)).pop().decode()
        # The job counts as finished once the chunk has stored its images' results, a moment before RQ
        # stores the chunk function's return value: wait for that too.
        deadline = time.monotonic() + 30
        while (value := Job.fetch(chunk_id, connection=r).return_value()) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert value is not None, f"chunk {chunk_id} stored no return value"
        return value

    r.zadd(protocol.WORKERS_ZSET, {"fake-stream-worker": time.time()})
    r.lpush(protocol.READY_LIST, "fake-session")
    try:
        held = run_chunk(seed=11)
    finally:
        r.zrem(protocol.WORKERS_ZSET, "fake-stream-worker")
        r.lrem(protocol.READY_LIST, 0, "fake-session")
    assert held["live_wait_s"] >= 0.9  # the default --live-yield-max-s is 0.5 s per batch; two batches of one
    assert run_chunk(seed=12)["live_wait_s"] < 0.1


def test_worker_killed_mid_chunk_loses_and_duplicates_nothing(make_stack):
    stack = make_stack("kill", DENSECAP_CHUNK_SIZE=4)
    flags = ["--batch-size", "1", "--execution-ttl", "4", "--heartbeat-s", "1", "--reap-interval", "1"]
    stack.start_gateway()
    slow = stack.start_worker("kill-a", *flags, DENSECAP_TEST_DELAY_MS=800)
    client = stack.client()
    job = client.create_job()["id"]
    images = crops(8, seed=3)
    for start in (0, 4):  # two requests: two chunks of four
        client.upload(job, [UploadFile(f"img{i}.jpg", images[i]) for i in range(start, start + 4)])
    client.seal(job)

    stack.wait_for(lambda: stack.status(job)["counts"]["done"] >= 1, 60, "the first result")
    stack.kill(slow, signal.SIGKILL)
    killed_at = time.monotonic()
    done_at_kill = stack.status(job)["counts"]["done"]
    assert 1 <= done_at_kill < 4, "the kill must land inside the first chunk"

    stack.start_worker("kill-b", *flags)
    status = stack.wait_finished(job, 90)
    recovered_s = time.monotonic() - killed_at
    print(f"killed after {done_at_kill} result(s); job finished {recovered_s:.1f} s after the kill")
    counts = status["counts"]
    assert status["state"] == "finished" and counts["done"] == 8 and counts["failed"] == 0
    assert counts["results"] == 8 and status["computed"] == 8  # every image captioned exactly once
    records = client.results(job, 0, 100)["results"]
    assert sorted(r["name"] for r in records) == [f"img{i}.jpg" for i in range(8)]

    from rq.job import Job
    chunks = [Job.fetch(c.decode(), connection=stack.redis) for c in stack.redis.smembers(protocol.job_chunks_key(job))]
    retried = [c for c in chunks if c.retries_left < c.meta["max_retries"]]
    assert len(chunks) == 2 and len(retried) == 1 and retried[0].retries_left == retried[0].meta["max_retries"] - 1
    assert retried[0].return_value()["skipped"] == done_at_kill  # the retry resumed, it did not redo
    # Detection bound: execution TTL (4 s) + reap interval (1 s) + 1 s, plus starting kill-b and the work.
    assert recovered_s < 60, recovered_s


def test_resume_after_an_interrupted_submit(make_stack, tmp_path):
    # A backlog of one byte: after the first request the gateway answers 429 until workers catch up.
    stack = make_stack("resume", DENSECAP_CHUNK_SIZE=2, DENSECAP_JOB_BACKLOG_BYTES=1)
    stack.start_gateway()
    folder, out = tmp_path / "photos", tmp_path / "out"
    folder.mkdir()
    for i, data in enumerate(crops(6, seed=5)):
        (folder / f"p{i}.jpg").write_bytes(data)

    first = subprocess.Popen(stack.submit_cmd(folder, out, "--parallel", "1"), cwd=ROOT, env=child_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stack.wait_for(lambda: (out / "job.json").is_file() and stack.status(job_of(out))["stored"] == 2,
                       60, "the first upload", first)
        time.sleep(1.0)  # the client is now waiting on 429s
        assert stack.status(job_of(out))["stored"] == 2
    finally:
        stack.kill(first, signal.SIGKILL)
    job_id = job_of(out)

    stack.start_worker("resume-w")
    second = stack.submit(folder, out)
    assert second.returncode == 0, second.stderr + stack.log_text()
    assert job_of(out) == job_id  # the same job was resumed
    status = stack.status(job_id)
    assert status["state"] == "finished" and status["counts"]["done"] == 6
    assert status["stored"] == 6 and status["computed"] == 6  # nothing uploaded or captioned twice
    assert sorted(r["name"] for r in read_jsonl(out / "results.jsonl")) == [f"p{i}.jpg" for i in range(6)]
    assert len(json.loads((out / "results.json").read_text())["results"]) == 6

    # A new job for a folder whose results are all local: nothing to send at all.
    third = stack.submit(folder, out, "--new-job")
    assert third.returncode == 0, third.stderr
    new_job = stack.status(job_of(out))
    assert job_of(out) != job_id and new_job["counts"]["images"] == 0 and new_job["stored"] == 0


def test_cancel_stops_queued_and_running_chunks(make_stack, tmp_path):
    stack = make_stack("cancel", DENSECAP_CHUNK_SIZE=3)
    stack.start_gateway()
    stack.start_worker("cancel-w", "--batch-size", "1", DENSECAP_TEST_DELAY_MS=2000)
    client = stack.client()
    job = client.create_job()["id"]
    images = crops(9, seed=9)
    for start in (0, 3, 6):
        client.upload(job, [UploadFile(f"c{i}.jpg", images[i]) for i in range(start, start + 3)])
    client.seal(job)
    stack.wait_for(lambda: stack.status(job)["counts"]["done"] >= 1, 60, "the first result")

    from rq import Queue
    from rq.job import Job, JobStatus
    chunks = [Job.fetch(c.decode(), connection=stack.redis) for c in stack.redis.smembers(protocol.job_chunks_key(job))]
    running = [c for c in chunks if c.get_status() == JobStatus.STARTED]
    status = client.cancel(job)
    assert status["state"] == "canceled" and status["chunks_removed"] == 2 and len(running) == 1
    assert Queue("cancel", connection=stack.redis).count == 0
    # The running chunk stops at its next batch instead of captioning its last images.
    stack.wait_for(lambda: running[0].get_status(refresh=True) == JobStatus.FINISHED, 30, "the running chunk")
    assert running[0].return_value()["canceled"] is True
    done = stack.status(job)["counts"]["done"]
    assert 1 <= done < 3
    time.sleep(1.0)
    assert stack.status(job)["counts"]["done"] == done
    with pytest.raises(ApiError) as info:
        client.upload(job, [UploadFile("late.jpg", images[0])])
    assert info.value.status == 409 and "canceled" in info.value.message

    # The CLI cancels the job recorded in its output folder.
    folder, out = tmp_path / "photos", tmp_path / "out"
    folder.mkdir()
    out.mkdir()
    (folder / "x.jpg").write_bytes(images[0])
    other = client.create_job()["id"]
    (out / "job.json").write_text(json.dumps({"id": other, "server": stack.server}))
    run = stack.submit(folder, out, "--cancel")
    assert run.returncode == 0, run.stderr
    assert stack.status(other)["state"] == "canceled"


def test_clear_errors(main_stack, tmp_path):
    import requests
    base, cert = main_stack.server + "/api/v1/jobs", str(main_stack.cert)
    auth = {"Authorization": f"Bearer {TOKEN}"}

    def call(method, url, **kw):
        response = requests.request(method, url, verify=cert, timeout=10, **kw)
        body = response.json() if response.headers.get("Content-Type", "").startswith("application/json") else {}
        return response.status_code, body.get("error", {})

    assert call("POST", base)[0] == 401
    status, err = call("GET", base, headers={"Authorization": "Bearer wrong"})
    assert status == 401 and "token" in err["message"]
    status, err = call("GET", base + "/0123456789abcdef0123456789abcdef", headers=auth)
    assert status == 404 and err["code"] == "unknown_job"
    status, err = call("GET", base + "/not-a-job", headers=auth)
    assert status == 404 and "32 hexadecimal" in err["message"]

    job = main_stack.client().create_job()["id"]
    url = f"{base}/{job}"
    status, err = call("POST", url + "/manifest", headers={**auth, "Content-Type": "application/json"}, data="{oops")
    assert status == 400 and "JSON" in err["message"]
    status, err = call("POST", url + "/manifest", headers=auth, json={"items": [{"name": "a.jpg", "sha256": "x", "size": 1}]})
    assert status == 400 and "sha256" in err["message"]
    photo = crops(1)[0]
    # (A backslash never arrives: multipart quoting turns "a\\b" into "ab"; the validator is unit-tested.)
    for bad in ("../escape.jpg", "/etc/x.jpg", "a/../../b.jpg", "sub/./x.jpg"):
        status, err = call("POST", url + "/images", headers=auth, files=[("file", (bad, photo))])
        assert status == 400 and err["code"] == "bad_item", bad
    assert main_stack.status(job)["counts"]["images"] == 0  # nothing was stored
    status, err = call("POST", url + "/images", headers=auth, data=b"raw bytes")
    assert status == 415
    status, err = call("GET", url + "/results?cursor=minus-one", headers=auth)
    assert status == 400 and "cursor" in err["message"]
    status, err = call("GET", url + "/results?format=xml", headers=auth)
    assert status == 400

    page = requests.get(main_stack.server + "/jobs/", verify=cert, timeout=10)
    assert page.status_code == 200 and "upload" in page.text and "Content-Security-Policy" in page.headers

    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(photo)
    bad_token = main_stack.submit(folder, tmp_path / "o1", token="wrong")
    assert bad_token.returncode == 1 and "token" in bad_token.stderr
    no_ca = subprocess.run([c for c in main_stack.submit_cmd(folder, tmp_path / "o2") if c != str(main_stack.cert)
                            and c != "--ca-cert"], cwd=ROOT, env=child_env(), capture_output=True, text=True,
                           timeout=60)
    assert no_ca.returncode == 1 and "--ca-cert" in no_ca.stderr


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.browser
def test_jobs_page_uploads_a_folder_and_watches_it(main_stack, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip("needs /usr/bin/chromium (scripts/setup installs it)")
    from playwright.sync_api import expect, sync_playwright
    folder = tmp_path / "pick"
    folder.mkdir()
    paths = []
    for i, data in enumerate(crops(3, seed=21)):
        paths.append(folder / f"web{i}.jpg")
        paths[-1].write_bytes(data)
    paths.append(folder / "readme.txt")
    paths[-1].write_text("not an image")

    problems: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync"])
        try:
            tab = browser.new_context(ignore_https_errors=True).new_page()
            tab.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            tab.on("pageerror", lambda e: problems.append(str(e)))
            tab.goto(f"{main_stack.server}/jobs/#token={TOKEN}")
            assert "#token" not in tab.url  # the token leaves the address bar
            tab.set_input_files("#files", [str(p) for p in paths])
            tab.click("#start")
            # Locator assertions: the page's CSP forbids the eval a string predicate would need.
            expect(tab.locator("#job-state")).to_have_text("finished", timeout=60_000)
            expect(tab.locator("#results tr")).to_have_count(4, timeout=10_000)
            job_id = tab.text_content("#job-id")
            assert tab.text_content("#caption-text").startswith("4 / 4 (1 error)")
            assert "not a readable image" in tab.text_content("#results")
        finally:
            browser.close()
    assert not problems, problems
    status = main_stack.status(job_id)
    assert status["counts"]["done"] == 4 and status["counts"]["failed"] == 1 and status["state"] == "finished"
