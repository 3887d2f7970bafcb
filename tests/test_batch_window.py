"""The stream worker's micro-batch window ends as soon as the batch is as large as the last one
(protocol.pop_frames ``enough``), and one call takes every ticket already waiting."""

from __future__ import annotations

import threading
import time

from densecap_core import protocol


def push_later(client, sids, delay_s: float) -> threading.Thread:
    t = threading.Timer(delay_s, lambda: client.lpush(protocol.READY_LIST, *sids))
    t.start()
    return t


def sids_of(taken):
    return [sid for sid, _ in taken]


def test_window_ends_once_enough_tickets_are_in(redis_server):
    r = redis_server.client()
    r.lpush(protocol.READY_LIST, "a", "b")
    pusher = push_later(redis_server.client(), ["c"], 0.01)
    t0 = time.monotonic()
    sids = sids_of(protocol.pop_frames(r, "w", 8, block_s=1.0, wait_s=0.5, enough=3))
    elapsed = time.monotonic() - t0
    pusher.join()
    assert sids == ["a", "b", "c"]
    assert elapsed < 0.25, elapsed  # not the 0.5 s window


def test_window_still_runs_its_length_when_fewer_arrive(redis_server):
    r = redis_server.client()
    r.lpush(protocol.READY_LIST, "a")
    t0 = time.monotonic()
    assert sids_of(protocol.pop_frames(r, "w", 8, block_s=1.0, wait_s=0.05, enough=3)) == ["a"]
    assert 0.045 <= time.monotonic() - t0 < 0.3


def test_one_call_takes_all_waiting_tickets_oldest_first_and_no_more_than_max(redis_server):
    r = redis_server.client()
    r.lpush(protocol.READY_LIST, *[f"s{i}" for i in range(12)])  # s0 pushed first: the oldest
    assert sids_of(protocol.pop_frames(r, "w", 8, block_s=1.0, wait_s=0.0)) == [f"s{i}" for i in range(8)]
    assert sids_of(protocol.pop_frames(r, "w", 8, block_s=1.0, wait_s=0.0)) == [f"s{i}" for i in range(8, 12)]


def test_a_newer_frame_arriving_in_the_window_is_taken_too_not_dropped(redis_server):
    """The first take empties the session's slot; a frame arriving during the window gets its own ticket
    and must come back with the batch (it used to be filtered out as a duplicate session and lost)."""
    r = redis_server.client()
    ingest = protocol.FrameIngest(redis_server.client(), frame_ttl_s=2.0)
    ingest.ingest("a", {"seq": 1}, b"one")
    t = threading.Timer(0.02, lambda: ingest.ingest("a", {"seq": 2}, b"two"))
    t.start()
    taken = protocol.pop_frames(r, "w", 8, block_s=1.0, wait_s=0.3, enough=2)
    t.join()
    assert [(sid, protocol.unpack_frame(b)[1]) for sid, b in taken] == [("a", b"one"), ("a", b"two")]
