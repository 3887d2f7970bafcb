"""A fresh gateway process must not lose its first sessions' first results: pub/sub keeps nothing for a late
subscriber, so a session starts (and says hello, after which clients send frames) only once the process's result
listener has subscribed. Found by the zero-cost capacity benchmark (scripts/bench_live.py): sessions opened
together on a fresh gateway lost frame 1 when a fast worker answered before the subscription."""

from __future__ import annotations

import time

from densecap_core.settings import Settings
from gateway.metrics import GatewayMetrics
from gateway.results import ResultRouter
from gateway.sessions import SessionRegistry
from livestack import LiveStack, recv_json


def make_router(url: str) -> ResultRouter:
    return ResultRouter(Settings(redis_url=url), SessionRegistry(limit=4), GatewayMetrics())


def test_first_start_returns_only_once_subscribed(redis_server):
    router = make_router(redis_server.url)
    try:
        router.ensure_started()
        assert router.connected.is_set() and redis_server.client().pubsub_numpat() == 1
    finally:
        router.stop()


def test_the_wait_is_bounded_and_happens_only_before_the_first_subscription(redis_server):
    down = make_router("redis://127.0.0.1:1/0")  # nothing listens there
    try:
        t0 = time.monotonic()
        down.ensure_started(wait_s=0.3)
        assert 0.25 <= time.monotonic() - t0 < 2.0 and not down.connected.is_set()
    finally:
        down.stop()
    router = make_router(redis_server.url)
    try:
        router.ensure_started()
        redis_server.kill()  # the listener now re-subscribes in the background; sessions must not wait for it
        t0 = time.monotonic()
        router.ensure_started(wait_s=2.0)
        assert time.monotonic() - t0 < 0.2
    finally:
        router.stop()


def test_hello_comes_after_the_result_listener_has_subscribed(tmp_path, redis_server):
    stack = LiveStack(tmp_path, redis_server)
    try:
        stack.start_gateway()
        r = redis_server.client()
        assert r.pubsub_numpat() == 0  # nothing subscribed before the first session
        ws = stack.connect()
        assert recv_json(ws)["type"] == "hello"
        assert r.pubsub_numpat() == 1, "hello was sent before the result listener subscribed"
        ws.close()
    finally:
        stack.close()
