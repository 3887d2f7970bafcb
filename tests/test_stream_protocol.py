"""The live-frame Redis contract (densecap_core/protocol.py) against a real redis-server, and the
gateway's wire helpers. Fast: no gateway or model processes."""

from __future__ import annotations

import time

import pytest

from densecap_core import protocol
from gateway import wire
from gateway.stream import TokenBucket, origin_allowed


def test_newest_frame_wins_with_one_ticket_per_session(redis_server):
    r = redis_server.client()
    ingest = protocol.FrameIngest(r, frame_ttl_s=2.0)
    assert ingest.ingest("s1", {"seq": 1}, b"one") == (False, True)
    assert ingest.ingest("s1", {"seq": 2}, b"two") == (True, False)  # replaced frame 1, no second ticket
    assert ingest.ingest("s2", {"seq": 1}, b"other") == (False, True)
    assert r.llen(protocol.READY_LIST) == 2
    assert 0 < r.pttl(protocol.frame_slot_key("s1")) <= 2000
    assert 0 < r.pttl(protocol.pending_key("s1")) <= 2000

    taken = protocol.pop_frames(r, "w1", max_n=8, block_s=1.0, wait_s=0.0)
    assert [sid for sid, _ in taken] == ["s1", "s2"]  # oldest ticket first
    assert [protocol.unpack_frame(b) for _, b in taken] == [({"seq": 2}, b"two"), ({"seq": 1}, b"other")]
    assert not r.exists(protocol.pending_key("s1"), protocol.frame_slot_key("s1"))
    # The ticket flag is gone, so the next frame gets a fresh ticket.
    assert ingest.ingest("s1", {"seq": 3}, b"three") == (False, True)


def test_an_expired_slot_gives_none_and_a_stale_ticket_once(redis_server):
    r = redis_server.client()
    ingest = protocol.FrameIngest(r, frame_ttl_s=0.05)
    ingest.ingest("gone", {"seq": 1}, b"x")
    time.sleep(0.15)
    r.lpush(protocol.READY_LIST, "gone")  # a duplicate ticket: the session still comes out once
    assert protocol.pop_frames(r, "w1", 4, 1.0, 0.0) == [("gone", None)]
    assert r.llen(protocol.READY_LIST) == 0


def test_pop_frames_waits_the_batch_window_then_returns(redis_server):
    r = redis_server.client()
    t0 = time.monotonic()
    assert protocol.pop_frames(r, "w1", 4, block_s=0.1, wait_s=0.0) == []
    assert time.monotonic() - t0 >= 0.09  # it did block
    r.lpush(protocol.READY_LIST, "a")
    t0 = time.monotonic()
    assert protocol.pop_frames(r, "w1", 4, block_s=1.0, wait_s=0.02) == [("a", None)]
    elapsed = time.monotonic() - t0
    assert 0.015 <= elapsed < 0.08, elapsed  # the window, not Redis's 100 ms cron tick
    r.lpush(protocol.READY_LIST, *[f"s{i}" for i in range(10)])
    assert len(protocol.pop_frames(r, "w1", 4, 1.0, 0.0)) == 4
    assert r.llen(protocol.READY_LIST) == 6


def test_pop_and_take_are_one_round_trip_and_wake_on_a_new_frame(redis_server):
    """The blocked pop returns the frame itself: the take runs in Redis right after the block ends."""
    import threading

    r = redis_server.client()
    r.ping()  # connected: the handshake's own commands are not counted
    sent = []
    real_send = r.connection_pool.connection_class.send_packed_command

    def counting_send(conn, command, check_health=True):
        if threading.current_thread() is threading.main_thread():  # not the ingest on the timer thread
            sent.append(1)
        return real_send(conn, command, check_health)

    ingest = protocol.FrameIngest(redis_server.client(), frame_ttl_s=2.0)
    timer = threading.Timer(0.1, lambda: ingest.ingest("s1", {"seq": 7}, b"jpeg"))
    timer.start()
    r.connection_pool.connection_class.send_packed_command = counting_send
    try:
        t0 = time.monotonic()
        taken = protocol.pop_frames(r, "w1", 8, block_s=2.0, wait_s=0.0)
    finally:
        r.connection_pool.connection_class.send_packed_command = real_send
        timer.join()
    assert time.monotonic() - t0 < 1.0
    assert [(sid, protocol.unpack_frame(b)) for sid, b in taken] == [("s1", ({"seq": 7}, b"jpeg"))]
    assert len(sent) == 1
    assert not r.exists(protocol.pending_key("s1"), protocol.worker_inbox_key("w1"), protocol.worker_taken_key("w1", 1))


def test_a_moved_frame_keeps_its_ttl(redis_server):
    """The take script moves frames (RENAME keeps the TTL): one whose reader vanished expires as it would have."""
    r = redis_server.client()
    protocol.FrameIngest(r, frame_ttl_s=2.0).ingest("s1", {"seq": 1}, b"x")
    r.rpush(protocol.worker_inbox_key("w1"), "s1")
    r.lpop(protocol.READY_LIST)
    sids = r.eval(protocol.FRAME_TAKE_LUA, 2, protocol.worker_inbox_key("w1"), protocol.READY_LIST, 8,
                  protocol.frame_slot_key(""), protocol.pending_key(""), protocol.worker_taken_key("w1", 1)[:-1])
    assert sids == [b"s1"] and not r.exists(protocol.frame_slot_key("s1"))
    assert 0 < r.pttl(protocol.worker_taken_key("w1", 1)) <= 2000


def test_a_ticket_left_in_a_worker_inbox_is_taken_first(redis_server):
    """A worker whose connection dropped between its pop and its take finds the ticket on its next call."""
    r = redis_server.client()
    ingest = protocol.FrameIngest(r, frame_ttl_s=2.0)
    ingest.ingest("old", {"seq": 1}, b"a")
    ingest.ingest("new", {"seq": 2}, b"b")
    r.lmove(protocol.READY_LIST, protocol.worker_inbox_key("w1"), "RIGHT", "RIGHT")  # "old", half taken
    r.set(protocol.worker_taken_key("w1", 3), b"stale")  # left by a pop whose MGET never ran
    ingest.ingest("expired", {"seq": 3}, b"c")
    r.delete(protocol.frame_slot_key("expired"))
    taken = protocol.pop_frames(r, "w1", 8, 1.0, 0.0)
    assert [(sid, protocol.unpack_frame(b)[1] if b else b) for sid, b in taken] == [
        ("old", b"a"), ("new", b"b"), ("expired", None)]
    assert not r.keys(protocol.worker_taken_key("w1", 0)[:-1] + "*")
    r.lpush(protocol.worker_inbox_key("w2"), "x")
    protocol.remove_worker(r, "w2")
    assert not r.exists(protocol.worker_inbox_key("w2"))


def test_ready_list_is_bounded(redis_server, monkeypatch):
    r = redis_server.client()
    monkeypatch.setattr(protocol, "READY_MAX", 5)
    ingest = protocol.FrameIngest(r, 2.0)
    for i in range(20):
        ingest.ingest(f"s{i}", {}, b"x")
    assert r.llen(protocol.READY_LIST) == 5


def test_heartbeats_count_live_workers(redis_server):
    r = redis_server.client()
    now = time.time()
    protocol.heartbeat(r, "w1", now)
    protocol.heartbeat(r, "w2", now - protocol.WORKER_ALIVE_S - 1)
    assert protocol.live_worker_count(r, now) == 1
    protocol.remove_worker(r, "w1")
    assert protocol.live_worker_count(r, now) == 0


def test_client_frame_header_round_trip_and_errors():
    blob = wire.pack_client_frame(42, 1234.5, b"\xff\xd8jpeg")
    seq, ts, image = wire.unpack_client_frame(blob)
    assert (seq, ts, bytes(image)) == (42, 1234.5, b"\xff\xd8jpeg")
    assert len(blob) == wire.FRAME_HEADER_BYTES + 6
    with pytest.raises(wire.HeaderError):
        wire.unpack_client_frame(b"DCF1")
    with pytest.raises(wire.HeaderError):
        wire.unpack_client_frame(b"XXXX" + bytes(20))


@pytest.mark.parametrize("origin,host,allowed,ok", [
    (None, "h:8443", (), True),
    ("https://h:8443", "h:8443", (), True),
    ("https://H:8443/", "h:8443", (), True),
    ("https://h:9999", "h:8443", (), False),
    ("https://evil.example", "h:8443", (), False),
    ("https://app.example", "h:8443", ("https://app.example",), True),
    ("null", "h:8443", (), False),
    ("https://any", "h:8443", ("*",), True),
])
def test_origin_allowlist(origin, host, allowed, ok):
    assert origin_allowed(origin, host, allowed) is ok


def test_token_bucket_limits_sustained_rate():
    bucket = TokenBucket(rate=10, burst=2)
    assert [bucket.take() for _ in range(3)] == [True, True, False]
    time.sleep(0.11)
    assert bucket.take()
