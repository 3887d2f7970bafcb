"""The result router: one pub/sub listener thread per gateway process.

It pattern-subscribes to every session's result channel (``protocol.RESULT_PATTERN``) on its own Redis
connection and hands each message to the session it names; messages for sessions of other processes
(or already closed ones) are ignored. Pub/sub is at-most-once: results published while the listener is
reconnecting are lost, which a live stream tolerates (the client sends its next frame after a timeout).

Redis restarts and half-open connections: a read error, or no PONG for a ping sent ``PING_EVERY_S``
earlier, makes the thread drop the connection and re-subscribe with backoff, for ever, until ``stop()``.
"""

from __future__ import annotations

import logging
import threading
import time

import redis

from densecap_core import protocol
from densecap_core.settings import Settings

log = logging.getLogger("densecap.gateway.results")

PING_EVERY_S = 5.0
BACKOFF_MAX_S = 2.0
#: How long the first sessions of a process wait for the listener's first subscription (see ensure_started).
FIRST_SUBSCRIBE_WAIT_S = 1.0


class ResultRouter:
    def __init__(self, settings: Settings, sessions, metrics):
        self.settings = settings
        self.sessions = sessions
        self.metrics = metrics
        self.connected = threading.Event()
        self.subscribed_once = threading.Event()  # set at the first subscription, never cleared
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def ensure_started(self, wait_s: float = FIRST_SUBSCRIBE_WAIT_S) -> None:
        """Start the listener thread once (lazily, after gunicorn has forked this worker process).

        Until the listener has subscribed for the first time, callers wait for it (at most ``wait_s``): pub/sub
        keeps nothing for late subscribers, so the first sessions of a fresh process would otherwise lose any
        result published before then (measured: a fast worker answered sessions' first frames before the
        subscription, and those frames never got a reply). Once subscribed, nobody waits again, even while
        the listener re-subscribes after a Redis restart.
        """
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="densecap-result-listener", daemon=True)
                self._thread.start()
        if not self.subscribed_once.is_set():
            self.subscribed_once.wait(wait_s)

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _client(self) -> redis.Redis:
        # Its own client: a PubSub holds a connection for ever, and its reads block up to 1 s.
        return redis.Redis.from_url(**self.settings.redis_kwargs(), socket_connect_timeout=1.0,
                                    socket_timeout=PING_EVERY_S * 2, socket_keepalive=True)

    def _run(self) -> None:
        backoff = 0.05
        first = True
        while not self._stop.is_set():
            client = self._client()
            pubsub = client.pubsub()
            try:
                pubsub.psubscribe(protocol.RESULT_PATTERN)
                # Wait for the subscribe confirmation so "connected" means results can arrive.
                deadline = time.monotonic() + 2.0
                while time.monotonic() < deadline:
                    msg = pubsub.get_message(timeout=0.5)
                    if msg and msg["type"] == "psubscribe":
                        break
                else:
                    raise redis.ConnectionError("no psubscribe confirmation within 2 s")
                if not first:
                    self.metrics.listener_reconnects.inc()
                    log.warning("result listener re-subscribed to Redis at %s", self.settings.redis_url_redacted)
                first = False
                self.connected.set()
                self.subscribed_once.set()
                backoff = 0.05
                self._listen(pubsub)
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                if self.connected.is_set() or first:
                    log.warning("result listener lost Redis (%s); reconnecting", exc.__class__.__name__)
                self.connected.clear()
                self._stop.wait(backoff)
                backoff = min(BACKOFF_MAX_S, backoff * 2)
            finally:
                try:
                    pubsub.close()
                    client.close()
                except Exception:  # closing a dead connection may raise anything; it is gone either way
                    pass
        self.connected.clear()

    def _listen(self, pubsub) -> None:
        last_ping = time.monotonic()
        awaiting_pong = False
        while not self._stop.is_set():
            msg = pubsub.get_message(timeout=1.0)
            now = time.monotonic()
            if msg is not None:
                kind = msg["type"]
                if kind == "pmessage":
                    session = self.sessions.get(protocol.sid_from_result_channel(msg["channel"]))
                    if session is not None:
                        session.deliver(msg["data"])
                elif kind == "pong":
                    awaiting_pong = False
            if now - last_ping >= PING_EVERY_S:
                if awaiting_pong:
                    raise redis.ConnectionError("no PONG on the pub/sub connection")
                pubsub.ping()
                awaiting_pong = True
                last_ping = now
