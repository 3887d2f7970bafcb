"""gateway.tlssock.SerializedTLSSocket: one TLS socket safely shared by a reading and a writing thread.

Real TLS over loopback (a certificate from gateway.tls). A bare SSLSocket used this way fails within seconds
(scripts/bench_tls_duplex.py measures it); here the wrapped one must carry every byte intact, a waiting reader
must not hold up a writer (nor the reverse), and timeouts must behave as a blocking socket's do.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time

import pytest

from gateway.tls import loopback_contexts, make_self_signed
from gateway.tlssock import SerializedTLSSocket, serialize_environ_socket


@pytest.fixture(scope="module")
def contexts(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    make_self_signed(d / "cert.pem", d / "key.pem", names=["localhost"])
    return loopback_contexts(d / "cert.pem", d / "key.pem")


@pytest.fixture
def pair(contexts):
    """A connected (client, server) pair of SSLSockets with 10 s timeouts."""
    server_ctx, client_ctx = contexts
    listener = socket.create_server(("127.0.0.1", 0))
    out: dict = {}

    def accept():
        conn, _ = listener.accept()
        out["server"] = server_ctx.wrap_socket(conn, server_side=True)

    t = threading.Thread(target=accept)
    t.start()
    client = client_ctx.wrap_socket(socket.create_connection(listener.getsockname()), server_hostname="localhost")
    t.join(10)
    server = out["server"]
    client.settimeout(10)
    server.settimeout(10)
    yield client, server
    for s in (client, server):
        s.close()
    listener.close()


def recv_exactly(sock, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError(f"lost after {len(buf)} of {n} bytes")
        buf += data
    return buf


def test_duplex_threads_on_both_sides_carry_every_byte(pair):
    client, server = (SerializedTLSSocket(s) for s in pair)
    size, seconds = 100, 2.0
    stop = threading.Event()
    errors: list[str] = []
    counts = {"client": 0, "server": 0}

    def sender(sock, name):
        n = 0
        try:
            while not stop.is_set():
                sock.sendall(bytes([n % 251]) * size)
                n += 1
        except Exception as exc:  # noqa: BLE001
            if not stop.is_set():
                errors.append(f"{name} send: {exc!r}")

    def receiver(sock, name):
        buf, n = b"", 0
        try:
            while not stop.is_set():
                data = sock.recv(65536)
                if not data:
                    if not stop.is_set():
                        errors.append(f"{name} recv: lost")
                    return
                buf += data
                while len(buf) >= size:
                    if buf[:size] != bytes([n % 251]) * size:
                        if not stop.is_set():  # after shutdown() the SSLSocket hands out raw bytes
                            errors.append(f"{name} recv: message {n} corrupt")
                        return
                    buf, n = buf[size:], n + 1
                counts[name] = n
        except Exception as exc:  # noqa: BLE001
            if not stop.is_set():
                errors.append(f"{name} recv: {exc!r}")

    threads = [threading.Thread(target=f, args=(s, name), daemon=True)
               for s, name in ((client, "client"), (server, "server")) for f in (sender, receiver)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not errors:
        time.sleep(0.05)
    stop.set()
    for s in (client, server):
        s.shutdown(socket.SHUT_RDWR)
    for t in threads:
        t.join(5)
    assert errors == []
    # Both directions moved thousands of messages, so reads and writes really overlapped.
    assert counts["client"] > 1000 and counts["server"] > 1000, counts


def test_a_reader_waiting_for_the_peer_does_not_hold_up_a_send(pair):
    client, server = pair
    wrapped = SerializedTLSSocket(server)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(wrapped.recv(100)), daemon=True)
    reader.start()
    time.sleep(0.2)  # the reader now waits: the client has sent nothing
    payload = bytes(range(256)) * 4096  # 1 MiB: many TLS records, more than the socket buffers hold at once
    sent = threading.Thread(target=wrapped.sendall, args=(payload,), daemon=True)
    sent.start()
    assert recv_exactly(client, len(payload)) == payload
    sent.join(5)
    assert not sent.is_alive()
    client.sendall(b"hello")
    reader.join(5)
    assert got == [b"hello"]


def test_a_writer_stuck_on_a_peer_that_does_not_read_does_not_stop_the_reader(pair):
    client, server = pair
    wrapped = SerializedTLSSocket(server)
    wrapped.settimeout(3)  # the writer gives up after this: the client never reads
    big = b"x" * (64 << 20)  # far more than loopback buffers hold: the writer waits for the client to read
    outcome: list[BaseException] = []

    def write():
        try:
            wrapped.sendall(big)
        except OSError as exc:
            outcome.append(exc)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    time.sleep(0.5)
    assert writer.is_alive(), "the writer should be waiting for room in the send buffer"
    client.sendall(b"ping from the client")
    assert wrapped.recv(100) == b"ping from the client"
    writer.join(10)
    assert not writer.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], socket.timeout)


def test_timeouts_behave_as_a_blocking_sockets(pair):
    _, server = pair
    wrapped = SerializedTLSSocket(server)
    assert wrapped.gettimeout() == 10
    assert server.gettimeout() == 0.0  # the wrapped socket itself is non-blocking: waits happen outside OpenSSL
    wrapped.settimeout(0.3)
    t0 = time.monotonic()
    with pytest.raises(socket.timeout):
        wrapped.recv(10)
    assert 0.25 <= time.monotonic() - t0 < 3
    wrapped.setblocking(False)
    with pytest.raises(ssl.SSLWantReadError):
        wrapped.recv(10)
    with pytest.raises(ValueError):
        wrapped.settimeout(-1)


def test_pending_bytes_are_read_without_waiting_for_the_socket(pair):
    client, server = pair
    wrapped = SerializedTLSSocket(server)
    client.sendall(b"abcdefgh")
    assert wrapped.recv(3) == b"abc"  # one TLS record: the rest is decrypted and pending, invisible to poll()
    assert wrapped.pending() == 5
    wrapped.settimeout(0.5)
    assert wrapped.recv(10) == b"defgh"


def test_a_closed_socket_fails_fast_and_select_accepts_the_wrapper(pair):
    import select

    client, server = pair
    wrapped = SerializedTLSSocket(server)
    client.sendall(b"x")
    assert select.select([wrapped], [], [], 5)[0] == [wrapped]
    assert wrapped.recv(1) == b"x"
    wrapped.close()
    with pytest.raises(OSError):
        wrapped.recv(1)


def test_only_tls_sockets_of_a_request_are_wrapped(pair):
    _, server = pair
    environ = {"gunicorn.socket": server}
    assert serialize_environ_socket(environ)
    assert isinstance(environ["gunicorn.socket"], SerializedTLSSocket)
    assert environ["gunicorn.socket"].wrapped is server
    plain = socket.socket()
    try:
        environ = {"werkzeug.socket": plain}
        assert not serialize_environ_socket(environ)
        assert environ["werkzeug.socket"] is plain
    finally:
        plain.close()
