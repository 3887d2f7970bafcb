"""Fault injection against the real system (Jepsen-style, bounded in time): processes are SIGKILLed, hung,
restarted, and Redis is restarted under load, while real clients stream and submit. Every recovery time is
measured, printed and asserted against the bound stated beside it (docs/reliability.md has the figures).

One system for the module (tests/faultstack.py): a redis-server with a password and AOF, as deployed; the
gateway under gunicorn over TLS; stream and job workers with a tiny random-weight model on the CPU. The tests
run in file order and each starts the workers it needs, so each also runs alone.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, child_env, crops
from densecap_core import protocol
from faultstack import (OTHER_TOKEN, REDIS_PASSWORD, TOKEN, SystemStack, deployed_redis, job_results_exactly_once,
                        load_soak, read_jsonl, secrets_in, wait_for)
from livestack import random_checkpoint  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow

SOAK = load_soak()
INFLIGHT_S = SOAK.INFLIGHT_TIMEOUT_S  # the client gives a frame up after this long (1.5 s, as the browser)
FRAME_TTL_S = 2.0  # DENSECAP_FRAME_TTL_S default: a frame slot and its ticket flag live this long
#: Slack on every bound for a loaded 2-core machine (process scheduling, TLS, one model batch).
SLACK_S = 3.0
#: Job worker flags of these tests: a chunk with no heartbeat for 4 s is retried within 4 + 1 + 1 s.
FAST_REAP = ("--batch-size", "1", "--execution-ttl", "4", "--heartbeat-s", "1", "--reap-interval", "1")
REAP_BOUND_S = 4 + 1 + 1
IMAGE_DELAY_MS = "600"  # per image in the job workers: a chunk of 4 runs ~2.5 s, long enough to kill it inside


@pytest.fixture(scope="module")
def system(tmp_path_factory, random_checkpoint):  # noqa: F811
    tmp = tmp_path_factory.mktemp("faults")
    (tmp / "redis").mkdir()
    (tmp / "stack").mkdir()
    redis_server = deployed_redis(tmp / "redis")
    stack = SystemStack(tmp / "stack", redis_server, random_checkpoint, DENSECAP_CHUNK_SIZE="4",
                        DENSECAP_BATCH_WAIT_MS="5")
    try:
        stack.start_gateway()
        yield stack
    finally:
        stack.close()
        redis_server.kill()




def start_sessions(system, n: int, fps: float = 6.0, warm_results: int = 3):
    sessions = system.sessions(n, fps=fps)
    for s in sessions:
        s.start()
    wait_for(lambda: all(s.stats.results >= warm_results for s in sessions), 90, f"{warm_results} results per session")
    return sessions


def worst_gap_after(sessions, t_fault: float, window_s: float) -> list[float]:
    """Wait ``window_s`` after a fault, then each session's longest time without a result since the fault."""
    time.sleep(max(0.0, t_fault + window_s - time.monotonic()))
    now = time.monotonic()
    return [round(s.max_gap(t_fault, now), 2) for s in sessions]


def stop_all(sessions) -> None:
    for s in sessions:
        s.stop_event.set()
    for s in sessions:
        s.join(15)


def stream_worker_count(system) -> int | None:
    return system.get_json("/healthz")[1].get("stream_workers")


# --- stream workers -------------------------------------------------------------------------------------------


def test_stream_worker_killed_or_hung_while_sessions_stream(system):
    """SIGKILL a worker holding frames, then hang (SIGSTOP) another: sessions go on with the survivor.

    Bound: a frame the dead worker held is given up by the client after INFLIGHT_S; its next frame gets a ticket
    at once (the worker cleared the ticket flag before taking it). A hung worker's blocked pop may still be handed
    one ticket, whose flag then lives FRAME_TTL_S: that session's next frame waits for it. So every session has
    a result within INFLIGHT_S + FRAME_TTL_S (+ slack) of the fault.
    """
    # sw-slow sleeps 400 ms per batch after taking its frames, so a kill almost surely lands while it holds some.
    system.start_stream_workers("sw-fast", "sw-hang")
    system.start_stream_workers("sw-slow", DENSECAP_TEST_DELAY_MS="400")
    sessions = start_sessions(system, 4)
    r = system.redis_server.client()
    try:
        wait_for(lambda: sum(s.stats.workers["sw-slow"] for s in sessions) >= 2, 30, "sw-slow to serve frames")
        time.sleep(0.2)  # mid-batch: 400 ms of sleep after the take
        bound = INFLIGHT_S + FRAME_TTL_S + SLACK_S
        t_kill = time.monotonic()
        system.kill_worker("sw-slow", signal.SIGKILL)
        gaps = worst_gap_after(sessions, t_kill, bound + 2)
        print(f"SIGKILL of a worker holding frames: longest wait for a result per session {gaps} s "
              f"(bound {bound:.1f} s)")
        assert max(gaps) < bound
        # Every ticket flag still carries its TTL: none can strand a session. PTTL is -1 for a key without a
        # TTL; -2 means the flag was cleared or expired between SCAN and PTTL, which is fine.
        for key in r.scan_iter("dc:pending:*"):
            assert r.pttl(key) != -1, key

        t_hang = time.monotonic()
        system.kill_worker("sw-hang", signal.SIGSTOP)
        try:
            gone = wait_for(lambda: stream_worker_count(system) == 1 and time.monotonic(), 20,
                            "/healthz to count the hung worker out")
            gaps = worst_gap_after(sessions, t_hang, bound + 2)
            print(f"SIGSTOP of a worker: longest wait for a result per session {gaps} s (bound {bound:.1f} s); "
                  f"/healthz counted it out after {gone - t_hang:.2f} s (heartbeat window {protocol.WORKER_ALIVE_S} s)")
            assert max(gaps) < bound
            assert gone - t_hang < protocol.WORKER_ALIVE_S + SLACK_S
        finally:
            system.kill_worker("sw-hang", signal.SIGKILL)
        # No session is left waiting: each went on sending, and only frames near the faults timed out.
        for s in sessions:
            assert s.stats.cross_talk == 0 and s.is_alive()
            assert s.stats.timeouts <= 6, (s.name, s.stats.timeouts)
            assert s.stats.workers["sw-fast"] > 0
    finally:
        stop_all(sessions)
    # Once the sessions stop, no frame slot or ticket flag outlives its TTL.
    wait_for(lambda: not list(r.scan_iter("dc:frame:*")) and not list(r.scan_iter("dc:pending:*")),
             FRAME_TTL_S + SLACK_S, "frame slots and ticket flags to expire")


# --- job workers ----------------------------------------------------------------------------------------------


def running_chunks(system, job_id: str) -> dict[str, str]:
    """chunk id -> name of the worker running it, for the job's chunks that are running now."""
    from rq.job import Job, JobStatus
    r = system.redis_server.client()
    out = {}
    for chunk_id in r.smembers(protocol.job_chunks_key(job_id)):
        job = Job.fetch(chunk_id.decode(), connection=r)
        if job.get_status() == JobStatus.STARTED and job.worker_name:
            out[job.id] = job.worker_name
    return out


def test_job_worker_killed_twice_mid_chunk(system):
    """Two SIGKILLs inside the same chunk (the second hits the worker running its retry): the job still ends
    with every image exactly once: one result each, none computed twice, the chunk retried twice.

    Bound per kill: the chunk is back at the head of the queue within execution TTL + reap interval + 1 s
    (REAP_BOUND_S, docs/jobs-api.md) and its next result follows one image later.
    (tests/test_jobs_system.py kills once, with the replacement started after the kill.)
    """
    from client.jobs_client import UploadFile
    from rq.job import Job
    system.start_job_workers("jw-a", "jw-b", "jw-c", args=FAST_REAP, DENSECAP_TEST_DELAY_MS=IMAGE_DELAY_MS)
    client = system.jobs_client()
    job = client.create_job("double kill")["id"]
    images = crops(8, seed=1, size=(240, 160))
    names = [f"k{i}.jpg" for i in range(8)]
    for start in (0, 4):  # two requests: two chunks of four
        client.upload(job, [UploadFile(names[i], images[i]) for i in range(start, start + 4)])
    client.seal(job)

    r = system.redis_server.client()

    def chunk_done(chunk_id: str) -> int:
        shas = Job.fetch(chunk_id, connection=r).args[1]
        return sum(r.hexists(protocol.job_results_key(job), sha) for sha in shas)

    # First kill: a worker inside a chunk that already stored a result.
    victim_chunk, victim = wait_for(
        lambda: next(((c, w) for c, w in running_chunks(system, job).items() if chunk_done(c) >= 1), None),
        60, "a running chunk with a result")
    system.kill_worker(victim)
    t1, done1 = time.monotonic(), chunk_done(victim_chunk)
    assert done1 < 4, "the kill must land inside the chunk"
    # Second kill: the worker that took the chunk up again, once it stored one more result.
    retaken = wait_for(lambda: (w := running_chunks(system, job).get(victim_chunk)) not in (None, victim) and w,
                       60, "the killed chunk to be retried")
    recovered1 = time.monotonic() - t1
    wait_for(lambda: chunk_done(victim_chunk) > done1, 60, "a result of the retried chunk")
    assert running_chunks(system, job).get(victim_chunk) == retaken and chunk_done(victim_chunk) < 4, \
        "the second kill must land inside the retry"
    system.kill_worker(retaken)
    t2 = time.monotonic()
    wait_for(lambda: running_chunks(system, job).get(victim_chunk) not in (None, victim, retaken)
             or chunk_done(victim_chunk) == 4, 60, "the second retry")
    recovered2 = time.monotonic() - t2
    status = wait_for(lambda: (s := client.status(job))["state"] == "finished" and s, 120, "the job to finish")
    print(f"job worker SIGKILL x2 in one chunk: retried after {recovered1:.2f} s and {recovered2:.2f} s "
          f"(bound {REAP_BOUND_S} s each); job finished {time.monotonic() - t1:.1f} s after the first kill")
    assert recovered1 < REAP_BOUND_S + SLACK_S and recovered2 < REAP_BOUND_S + SLACK_S

    status = job_results_exactly_once(client, job, names)
    assert status["counts"] == {**status["counts"], "images": 8, "done": 8, "failed": 0, "results": 8}
    assert status["computed"] == 8  # no image captioned twice
    chunk = Job.fetch(victim_chunk, connection=system.redis_server.client())
    assert chunk.meta["max_retries"] - chunk.retries_left == 2  # retried once per kill


# --- Redis ----------------------------------------------------------------------------------------------------


def test_redis_restart_under_load(system):
    """Redis restarted (SIGTERM, as `docker compose restart redis`; AOF on) while sessions stream and a bulk
    job runs: no service restarts, live sessions resume, the job ends with every image exactly once.

    Bounds, from Redis being back: workers and the gateway's result listener retry with backoff capped at
    2 s; a frame in flight during the outage is given up after INFLIGHT_S; ticket flags persisted in the AOF
    expire within FRAME_TTL_S. So sessions resume within 2 + INFLIGHT_S + FRAME_TTL_S (+ slack).
    """
    from client.jobs_client import UploadFile
    system.ensure_stream_worker("sw-redis")
    system.ensure_job_worker("jw-redis", args=FAST_REAP, DENSECAP_TEST_DELAY_MS=IMAGE_DELAY_MS)
    pids = {name: p.pid for name, p in {**system.stream_workers, **system.job_workers}.items() if p.poll() is None}
    pids["gateway"] = system.gateway.pid
    sessions = start_sessions(system, 3)
    health = SOAK.HealthProbe(system.base, every_s=0.25)
    health.start()
    client = system.jobs_client(retry_for_s=60)
    job = client.create_job("redis restart")["id"]
    names = [f"r{i}.jpg" for i in range(8)]
    images = crops(8, seed=2, size=(240, 160))
    for start in (0, 4):
        client.upload(job, [UploadFile(names[i], images[i]) for i in range(start, start + 4)])
    client.seal(job)
    try:
        wait_for(lambda: client.status(job)["counts"]["done"] >= 1, 60, "the job to start")
        t_down = time.monotonic()
        system.redis_server.kill(signal.SIGTERM)  # AOF is flushed on SIGTERM
        down = system.get_json("/healthz")
        assert down[0] == 503 and down[1]["status"] == "redis_unreachable", down
        time.sleep(1.0)
        system.redis_server.start()
        t_up, wall_up = time.monotonic(), time.time()
        bound = 2.0 + INFLIGHT_S + FRAME_TTL_S + SLACK_S
        gaps = worst_gap_after(sessions, t_up, bound + 2)
        healthy = next(t for t, _, status in health.samples if t > t_up and status == 200)
        print(f"Redis down {t_up - t_down:.1f} s: after it was back, longest wait per session {gaps} s "
              f"(bound {bound:.1f} s), /healthz 200 again after {healthy - t_up:.2f} s")
        assert max(gaps) < bound
        # No process restarted: every one is the same and still running.
        for name, pid in pids.items():
            proc = system.gateway if name == "gateway" else {**system.stream_workers, **system.job_workers}[name]
            assert proc.pid == pid and proc.poll() is None, f"{name} exited with {proc.poll()}\n{system.logs()}"
        status = wait_for(lambda: (s := client.status(job))["state"] == "finished" and s, 120, "the job to finish")
        print(f"bulk job finished {status['updated'] - wall_up:.1f} s after Redis was back")
    finally:
        health.stop()
        stop_all(sessions)
    status = job_results_exactly_once(client, job, names)
    assert status["counts"]["done"] == 8 and status["counts"]["failed"] == 0
    assert max(ms for t, ms, _ in health.samples) < 2000, "/healthz must answer promptly even while Redis is down"
    for s in sessions:
        assert s.stats.cross_talk == 0
    # The job worker whose RQ loop was restarted still stops cleanly on SIGTERM.
    for name in system.alive(system.job_workers):
        assert system.stop_process(system.job_workers[name], signal.SIGTERM, timeout=20) == 0, system.logs()


# --- gateway --------------------------------------------------------------------------------------------------


def test_gateway_crash_and_restart_clients_reconnect(system, tmp_path):
    """SIGKILL the gateway (master and workers) while `densecap submit` follows a job and live sessions stream,
    then start it again: submit finishes with every result, the live clients reconnect by themselves.

    Bounds, from the gateway answering again: `densecap submit` (client/jobs_client.py) retries connection errors
    with backoff capped at 5 s; the live clients (the browser's schedule: 0.5 s doubling to 10 s, with jitter)
    reconnect within their current backoff step, at most 10 s.
    """
    system.ensure_stream_worker("sw-gw")
    system.ensure_job_worker("jw-gw", args=FAST_REAP, DENSECAP_TEST_DELAY_MS="300")
    folder, out = tmp_path / "photos", tmp_path / "out"
    folder.mkdir()
    names = [f"g{i}.jpg" for i in range(8)]
    for name, data in zip(names, crops(8, seed=4, size=(240, 160))):
        (folder / name).write_bytes(data)
    sessions = start_sessions(system, 2)
    submit = subprocess.Popen(system.submit_cmd(folder, out, "--parallel", "1"), cwd=ROOT, env=child_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(lambda: (out / "results.jsonl").is_file() and read_jsonl(out / "results.jsonl"), 90,
                 "the first result in results.jsonl", interval=0.1)
        t_down = time.monotonic()
        system.stop_process(system.gateway, signal.SIGKILL)
        time.sleep(1.0)
        system.start_gateway()
        t_up = time.monotonic()
        stdout, stderr = submit.communicate(timeout=120)
        t_done = time.monotonic()
        assert submit.returncode == 0, stderr + system.logs()
        wait_for(lambda: all(s.first_result_after(t_up) for s in sessions), 30, "every session to stream again")
        back = [round(s.first_result_after(t_up) - t_up, 2) for s in sessions]
        print(f"gateway down {t_up - t_down:.1f} s (SIGKILL, restart): densecap submit finished "
              f"{t_done - t_up:.1f} s after it answered; live sessions streamed again after {back} s "
              f"(reconnects {[s.stats.reconnects for s in sessions]})")
        assert max(back) < 10.0 + SLACK_S
        assert all(s.stats.reconnects == 1 for s in sessions)
    finally:
        stop_all(sessions)
        if submit.poll() is None:
            system.stop_process(submit, signal.SIGKILL)
    doc = json.loads((out / "results.json").read_text())
    assert sorted(r["img_name"] for r in doc["results"]) == names and doc["errors"] == []
    assert sorted(r["name"] for r in read_jsonl(out / "results.jsonl")) == names  # each line once


# --- secrets --------------------------------------------------------------------------------------------------


def test_no_token_or_redis_password_in_any_log_or_error(system, tmp_path):
    """Tokens and the Redis password reach no log and no error message, whatever clients do with them.

    Runs after the faults above, so the logs hold outages, kills and reconnects too. Here clients also put a
    valid token in query strings, send near-miss tokens (a valid one plus a character), and processes start
    with a wrong Redis password or with the password inside the Redis URL.
    """
    import websocket
    seen: list[str] = []  # response bodies and process output, checked with the logs
    near_miss = TOKEN + "x"
    for path, headers in [(f"/healthz?token={TOKEN}", {}), (f"/auth/check?token={near_miss}", {}),
                          ("/auth/check", {"Authorization": f"Bearer {near_miss}"}),
                          (f"/api/v1/jobs?token={TOKEN}", {}), ("/api/v1/jobs", {"Authorization": f"Bearer {near_miss}"}),
                          ("/api/v1/jobs/0123456789abcdef0123456789abcdef", {"Authorization": f"Bearer {OTHER_TOKEN}"}),
                          ("/metrics", {})]:
        status, body = system.get(path, headers)
        seen.append(f"{path.split('?')[0]} {status} {body.decode(errors='replace')}")
    for url_suffix, protos in [(f"?token={TOKEN}", ["densecap.v1"]), ("", ["densecap.v1", f"token.{near_miss}"])]:
        try:
            ws = websocket.create_connection(system.ws_url + url_suffix, sslopt={"cert_reqs": 0}, subprotocols=protos,
                                             timeout=10)
            seen.append(ws.recv())
            ws.close()
        except websocket.WebSocketBadStatusException as exc:
            seen.append(f"{exc.status_code} {exc.resp_body!r}")
    # A job worker given a wrong password refuses to start, saying why.
    env = child_env(**{**system.env, "DENSECAP_REDIS_PASSWORD": "wrong-" + REDIS_PASSWORD})
    bad = subprocess.run([sys.executable, "-m", "worker.job_worker", "--name", "jw-badpw"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "cannot reach Redis" in bad.stdout + bad.stderr
    seen.append(bad.stdout + bad.stderr)
    # The password inside the Redis URL (a common way to configure it) is redacted where the URL is shown.
    inline = SystemStack(tmp_path / "inline", system.redis_server, system.checkpoint,
                         DENSECAP_REDIS_URL=f"redis://:{REDIS_PASSWORD}@127.0.0.1:{system.redis_server.port}/0",
                         DENSECAP_REDIS_PASSWORD="")
    (tmp_path / "inline").mkdir()
    try:
        inline.start_gateway()
        status, body = inline.get_json("/healthz")
        assert body["redis"] == "ok", body  # the URL's password is used...
        seen.append(json.dumps(body))
    finally:
        inline.close()
    texts = {**system.all_logs(), **inline.all_logs(), "responses and output": "\n".join(seen)}
    leaks = {name: secrets_in(text, [TOKEN, OTHER_TOKEN, REDIS_PASSWORD]) for name, text in texts.items()}
    leaks = {name: lines[:3] for name, lines in leaks.items() if lines}
    assert not leaks, f"secrets found: {leaks}"
    assert sum(len(t) for t in texts.values()) > 10_000, "the logs must hold something to check"
