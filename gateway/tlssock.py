"""One TLS connection shared by a reading thread and writing threads, made safe.

An OpenSSL ``SSL`` object must not be used by two threads at once, and CPython's ``ssl`` module releases the
GIL around ``SSL_read`` and ``SSL_write`` without a lock of its own. A thread sitting in ``recv`` while another
calls ``send`` on the same ``SSLSocket`` can therefore corrupt the connection: measured on our machines
(``scripts/bench_tls_duplex.py``), one connection in ten of a two-thread duplex loop ended with the peer reporting
``DECRYPTION_FAILED_OR_BAD_RECORD_MAC``. simple-websocket works exactly that way: its reader thread waits in
``recv`` while the session's handler thread (and the gateway's result listener) ``send``. A live session then
drops at random, more often on a loaded machine.

``SerializedTLSSocket`` wraps such a socket:

- every OpenSSL call runs under one lock, on a non-blocking socket, so no two ever overlap;
- every wait (for the peer's bytes, or for room in the send buffer) happens outside that lock, so a reader
  waiting for the client never holds up a result going out, and a writer waiting on a slow client never stops
  the reader (which could deadlock two peers that both write);
- writes are serialized among themselves through completion: OpenSSL requires a write interrupted by
  ``WANT_WRITE`` to be retried with the same bytes before another write starts;
- the timeout the socket had is kept and honoured (``socket.timeout`` after it, as a blocking socket raises);
  ``settimeout(0)`` asks for non-blocking calls, which raise ``SSLWantReadError`` / ``SSLWantWriteError``.

It offers what simple-websocket, websocket-client and ``select`` use (``recv``, ``send``, ``sendall``,
``fileno``, ``gettimeout``/``settimeout``/``setblocking``, ``pending``, ``shutdown``, ``close``); anything else
reaches the wrapped socket unchanged.
"""

from __future__ import annotations

import errno
import select
import socket
import ssl
import threading
import time

#: The longest single wait between retries: bounds a wait for readability that another thread's read made moot.
WAIT_SLICE_S = 0.5


class SerializedTLSSocket:
    """A thread-safe view of one ``ssl.SSLSocket`` (see the module docstring)."""

    def __init__(self, sock: ssl.SSLSocket):
        self._sock = sock
        self._timeout = sock.gettimeout()
        self._ssl = threading.Lock()  # one OpenSSL call at a time
        self._writing = threading.RLock()  # one message written at a time, through completion
        sock.setblocking(False)

    @property
    def wrapped(self) -> ssl.SSLSocket:
        return self._sock

    # --- the socket surface -----------------------------------------------------------------------

    def fileno(self) -> int:
        return self._sock.fileno()

    def gettimeout(self) -> float | None:
        return self._timeout

    def settimeout(self, timeout: float | None) -> None:
        if timeout is not None and timeout < 0:
            raise ValueError("timeout must be non-negative or None")
        self._timeout = None if timeout is None else float(timeout)

    def setblocking(self, flag: bool) -> None:
        self._timeout = None if flag else 0.0

    def pending(self) -> int:
        with self._ssl:
            return self._sock.pending()

    def recv(self, bufsize: int) -> bytes:
        return self._retry(self._sock.recv, bufsize)

    def send(self, data) -> int:
        with self._writing:
            return self._retry(self._sock.send, data)

    def sendall(self, data) -> None:
        view = memoryview(data).cast("B")
        with self._writing:
            while view:
                view = view[self.send(view):]

    def shutdown(self, how: int) -> None:
        with self._ssl:
            self._sock.shutdown(how)

    def close(self) -> None:
        with self._ssl:
            self._sock.close()

    def __getattr__(self, name: str):
        return getattr(self._sock, name)

    # --- waiting, outside the OpenSSL lock --------------------------------------------------------

    def _retry(self, call, arg):
        """``call(arg)`` under the OpenSSL lock, again after each wait OpenSSL asks for, until the timeout."""
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        while True:
            with self._ssl:
                try:
                    return call(arg)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError) as exc:
                    want = exc
            self._wait(want, deadline)

    def _wait(self, want: ssl.SSLError, deadline: float | None) -> None:
        """Wait (without the lock) until the socket can do what OpenSSL asked for, or the deadline passes."""
        if self._timeout == 0:
            raise want
        slice_s = WAIT_SLICE_S
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("timed out")
            slice_s = min(slice_s, left)
        fd = self._sock.fileno()
        if fd < 0:  # closed by another thread meanwhile
            raise OSError(errno.EBADF, "the socket was closed")
        poller = select.poll()
        poller.register(fd,
                        select.POLLIN if isinstance(want, ssl.SSLWantReadError) else select.POLLOUT)
        poller.poll(slice_s * 1000)


def serialize_environ_socket(environ: dict) -> bool:
    """Make the TLS socket of a WSGI request (gunicorn or werkzeug) safe for simple-websocket's threads.

    Returns whether a socket was wrapped; a plain TCP socket is safe as it is and stays.
    """
    for key in ("gunicorn.socket", "werkzeug.socket"):
        sock = environ.get(key)
        if isinstance(sock, ssl.SSLSocket):
            environ[key] = SerializedTLSSocket(sock)
            return True
    return False
