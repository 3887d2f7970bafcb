"""Stream worker behaviour with real processes: a slow model drops frames instead of queueing them,
micro-batches span sessions, a corrupt frame fails alone, SIGTERM stops cleanly, and the worker and
the gateway both recover when Redis restarts."""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest

from conftest import RedisServer
from gateway.wire import pack_client_frame
from livestack import LiveStack, jpeg, random_checkpoint, recv_json, recv_until  # noqa: F401 (fixture)


def send_frame(ws, seq: int, image: bytes) -> None:
    ws.send_binary(pack_client_frame(seq, time.time() * 1000, image))


@pytest.fixture
def redis_and_stack(tmp_path, random_checkpoint):  # noqa: F811
    redis_server = RedisServer(tmp_path)
    stacks: list[LiveStack] = []

    def make(**env) -> LiveStack:
        s = LiveStack(tmp_path / f"stack{len(stacks)}", redis_server, random_checkpoint, **env)
        s.dir.mkdir()
        stacks.append(s)
        return s

    yield redis_server, make
    for s in stacks:
        s.close()
    redis_server.kill()


def test_slow_worker_drops_frames_instead_of_queueing(redis_and_stack, elephant_path):
    redis_server, make = redis_and_stack
    # Each batch takes >= 1.2 s; frames older than 0.8 s when picked up are dropped as stale.
    stack = make(DENSECAP_TEST_DELAY_MS="1200", DENSECAP_MAX_FRAME_AGE_S="0.8", DENSECAP_BATCH_SIZE="4")
    stack.start_gateway()
    stack.start_worker()
    image = elephant_path.read_bytes()
    ws = stack.connect(threadsafe=True)  # a reader thread receives while this one sends
    recv_json(ws)
    messages: list[dict] = []
    stop = threading.Event()

    ws.settimeout(3.0)  # for both threads: the reader's waits and this thread's sends

    def reader():
        while not stop.is_set():
            try:
                messages.append(json.loads(ws.recv()))
            except Exception:
                continue

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    # A client ignoring flow control: 10 frames/s for 4 s, never waiting for results.
    n = 40
    for seq in range(n):
        send_frame(ws, seq, image)
        time.sleep(0.1)
    time.sleep(2.5)  # let the last batch finish
    stop.set()
    t.join(5)  # the reader ends once its last wait (3 s) is over
    assert not t.is_alive()
    ws.close()

    results = [m for m in messages if m["type"] == "result"]
    dropped = [m for m in messages if m["type"] == "dropped"]
    assert 1 <= len(results) <= 6, f"{len(results)} results from a worker that can do < 1 per second"
    assert {m["reason"] for m in dropped} >= {"replaced"}
    # Every frame is accounted for once: answered or dropped (none silently queued or lost).
    accounted = sorted([m["seq"] for m in results] + [m["seq"] for m in dropped])
    assert accounted == sorted(set(accounted)) and len(accounted) >= n - 2, (len(accounted), n)
    # No backlog: what a result answers is recent, not a frame from seconds ago.
    for m in results:
        assert m["timings"]["queue_ms"] < 800 + 100
        assert m["timings"]["server_ms"] < 800 + 1200 + 1000
    r = redis_server.client()
    assert r.llen("dc:ready") <= 1


def test_stale_frames_are_reported_and_batches_span_sessions(redis_and_stack, elephant_path):
    redis_server, make = redis_and_stack
    stack = make(DENSECAP_TEST_DELAY_MS="600", DENSECAP_MAX_FRAME_AGE_S="0.4", DENSECAP_BATCH_SIZE="8",
                 DENSECAP_BATCH_WAIT_MS="20")
    stack.start_gateway()
    stack.start_worker()
    image = jpeg(320, 240)
    sockets = [stack.connect() for _ in range(4)]
    for ws in sockets:
        recv_json(ws)
    seen: list[dict] = []
    for rnd in range(3):
        for ws in sockets:
            send_frame(ws, rnd, image)
        for ws in sockets:
            msg, _ = recv_until(ws, lambda m: m.get("seq") == rnd and m["type"] in ("result", "dropped"), 15)
            seen.append(msg)
    for ws in sockets:
        ws.close()
    sizes = [m["timings"]["batch_size"] for m in seen if m["type"] == "result"]
    assert sizes and max(sizes) >= 2, f"no micro-batch across sessions: {sizes}"
    # Frames that arrive while the worker sleeps 600 ms wait longer than 400 ms: they come back as stale.
    stale = [m for m in seen if m["type"] == "dropped"]
    assert all(m["reason"] == "stale" for m in stale)


def test_corrupt_frame_fails_alone_and_sigterm_stops_cleanly(redis_and_stack, elephant_path):
    redis_server, make = redis_and_stack
    stack = make(DENSECAP_BATCH_WAIT_MS="30")
    stack.start_gateway()
    worker = stack.start_worker(name="w-sigterm")
    good, bad = stack.connect(), stack.connect()
    recv_json(good), recv_json(bad)
    whole = elephant_path.read_bytes()
    truncated = whole[: len(whole) // 3]  # a valid header (passes the gateway's size check), then nothing
    for _ in range(3):
        send_frame(bad, 5, truncated)
        send_frame(good, 5, whole)
        err = recv_json(bad)
        assert (err["type"], err["code"], err["seq"]) == ("error", "bad_image", 5), err
        ok = recv_json(good)
        assert (ok["type"], ok["seq"]) == ("result", 5), ok
    good.close(), bad.close()

    r = redis_server.client()
    assert r.zscore("dc:workers", "w-sigterm") is not None
    t0 = time.monotonic()
    assert LiveStack.stop_process(worker, signal.SIGTERM, timeout=15) == 0
    assert time.monotonic() - t0 < 10
    assert r.zscore("dc:workers", "w-sigterm") is None
    status, body = stack.get_json("/healthz")
    assert status == 503 and body["status"] == "no_stream_workers"


def test_worker_and_gateway_recover_when_redis_restarts(redis_and_stack, elephant_path):
    redis_server, make = redis_and_stack
    stack = make()
    stack.start_gateway()
    stack.start_worker(name="w-restart")
    image = elephant_path.read_bytes()
    ws = stack.connect()
    recv_json(ws)
    send_frame(ws, 1, image)
    assert recv_json(ws)["type"] == "result"

    redis_server.kill()
    send_frame(ws, 2, image)
    msg = recv_json(ws, timeout=10)
    assert (msg["type"], msg["code"]) == ("error", "unavailable")
    assert stack.get_json("/healthz")[0] == 503
    time.sleep(1.0)
    t_back = time.monotonic()
    redis_server.start()  # same port, empty data (no persistence): heartbeats and scripts are gone too

    # The same open session gets results again once the worker and the result listener are back.
    deadline = time.monotonic() + 30
    seq = 100
    got = None
    while time.monotonic() < deadline and got is None:
        seq += 1
        send_frame(ws, seq, image)
        try:
            msg, _ = recv_until(ws, lambda m: m["type"] == "result", timeout=1.5)
            got = msg
        except TimeoutError:
            pass
    ws.close()
    print(f"first result {time.monotonic() - t_back:.2f} s after Redis came back")
    assert got is not None, "no result within 30 s of Redis coming back\n" + stack.logs()
    status, body = stack.get_json("/healthz")
    assert status == 200 and body["stream_workers"] == 1
    assert stack.workers[0].poll() is None and stack.gateway.poll() is None
