"""Guards gunicorn's connection handling against clients that stall (slowloris) or hold connections open.

gunicorn's ``gthread`` worker serves TLS itself on blocking sockets without a timeout. Measured with gunicorn
27.0.1 (tests/test_reliability_input.py, docs/reliability.md):

- a client that sends the first byte of a TLS handshake, or part of a request, and then nothing, holds a
  worker thread for ever; about ``max_sessions + 16`` such connections (the thread pool) leave no thread for
  anything: ``/healthz``, REST and new sessions all hang;
- every finished connection is closed on the worker's *main loop* with ``util.close_graceful``, which waits up
  to 2 s for the client to close its side: a client that sends plain HTTP to the TLS port (or any request)
  and keeps the connection open freezes the whole process, live sessions included, for 2 s per connection.

``install(stall_timeout_s)`` (called once per worker process by ``gateway/gunicorn_conf.py``):

- gives each TLS handshake, and each blocking read of a request's headers or body, ``stall_timeout_s`` to
  make progress (a Python socket timeout set before the first read: a stalled client gets an error and its
  thread is freed). Websocket traffic after the upgrade is read by simple-websocket only when select() says
  data is there, so an idle session is unaffected; a session whose client stops reading for that long while
  the gateway sends is ended, which is what a dead peer deserves;
- sends the FIN at once and runs the rest of the lingering close (waiting for the client's side) on a few
  background threads instead of the main loop; beyond ``MAX_LINGERING`` waiting sockets, a socket is closed at
  once.
"""

from __future__ import annotations

import logging
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger("densecap.gateway.conn_guard")

#: Sockets waiting for their lingering close at most; more are closed at once (no unbounded pile of fds).
MAX_LINGERING = 256
#: Threads doing lingering closes; each waits at most ``LINGER_S``.
LINGER_THREADS = 4
LINGER_S = 1.0

_installed = False


def install(stall_timeout_s: float) -> None:
    """Patch gunicorn (this process only) as described in the module docstring. Idempotent."""
    global _installed
    if _installed or stall_timeout_s <= 0:
        return
    _installed = True
    _bound_reads(stall_timeout_s)
    _linger_off_the_main_loop()
    log.info("connection guard: %.1f s for a stalled handshake or request read; lingering closes off the main "
             "loop", stall_timeout_s)


def _bound_reads(timeout_s: float) -> None:
    from gunicorn import sock as gsock
    from gunicorn.http import unreader

    wrap = gsock.ssl_wrap_socket

    def ssl_wrap_socket(raw, conf):
        # The handshake runs on the wrapped socket, which inherits this timeout.
        raw.settimeout(timeout_s)
        return wrap(raw, conf)

    chunk = unreader.SocketUnreader.chunk

    def bounded_chunk(self, size_hint=None):
        # gthread makes a kept-alive socket blocking (no timeout) before each request: bound it again.
        if self.sock.gettimeout() is None:
            self.sock.settimeout(timeout_s)
        return chunk(self, size_hint)

    gsock.ssl_wrap_socket = ssl_wrap_socket
    unreader.SocketUnreader.chunk = bounded_chunk


def _linger_off_the_main_loop() -> None:
    from gunicorn import util

    linger = util.close_graceful
    pool = ThreadPoolExecutor(LINGER_THREADS, thread_name_prefix="densecap-linger")
    slots = threading.BoundedSemaphore(MAX_LINGERING)

    def close_graceful(sock, timeout=2.0, max_drain=65536):
        try:  # the FIN goes out now; only the wait for the client's side is deferred
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        if not slots.acquire(blocking=False):
            util.close(sock)
            return

        def run():
            try:
                linger(sock, min(timeout, LINGER_S), max_drain)
            finally:
                slots.release()

        try:
            pool.submit(run)
        except RuntimeError:  # the pool is shut down: the process is exiting
            slots.release()
            util.close(sock)

    util.close_graceful = close_graceful
