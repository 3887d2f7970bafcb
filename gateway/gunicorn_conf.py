"""gunicorn hooks for the gateway (``--config python:gateway.gunicorn_conf``; the other settings are
command-line flags made by ``gateway/__main__.py``).

On SIGTERM a gthread worker stops accepting and then waits up to ``graceful_timeout`` for open
connections, and a live websocket never ends by itself. So the worker's SIGTERM handler is chained
to set the application's ``shutting_down`` event first: every session then closes with 1001 ("going
away") within a second, and browsers reconnect (to another gateway, or to this one once it is back).

It also installs ``gateway.conn_guard`` in each worker: clients that stall in a TLS handshake or a request,
or hold a finished connection open, can no longer take every thread or freeze the worker's main loop.
"""

from __future__ import annotations

import signal


def post_worker_init(worker) -> None:
    from gateway import conn_guard
    from gateway.app import EXTENSION

    state = worker.wsgi.extensions.get(EXTENSION)
    if state is not None:
        conn_guard.install(state.settings.client_stall_timeout_s)
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(sig, frame):
        if state is not None:
            state.shutting_down.set()
        if callable(previous):
            previous(sig, frame)

    signal.signal(signal.SIGTERM, on_sigterm)
