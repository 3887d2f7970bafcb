"""How a result reaches a live session: forwarded at once by the listener thread, or through the mailbox.

``Session.deliver`` (gateway/sessions.py) forwards on the listener thread only when that cannot wait or
reorder; ``StreamSession._direct`` (gateway/stream.py) declines when the socket could block. The live
tests (test_gateway_live.py) run both paths end to end; these pin the decisions themselves.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
from simple_websocket import ConnectionClosed
from simple_websocket.ws import Base as SimpleWebsocket
from wsproto import ConnectionType, WSConnection, frame_protocol
from wsproto.events import AcceptConnection, CloseConnection, Request

from gateway import wsmask
from gateway.sessions import Session
from gateway.stream import StreamSession


def _session(direct_result: bool | None):
    calls: list[bytes] = []

    def direct(raw: bytes) -> bool:
        calls.append(raw)
        return bool(direct_result)

    s = Session(sid="s1", wake=threading.Event(), direct=None if direct_result is None else direct)
    return s, calls


def test_an_idle_session_gets_its_result_on_the_listener_thread():
    s, calls = _session(True)
    s.deliver(b"r1")
    assert calls == [b"r1"] and not s.mailbox and not s.wake.is_set()


def test_a_busy_session_gets_it_through_the_mailbox():
    s, calls = _session(True)
    with s.lock:  # the handler thread is working on this session
        s.deliver(b"r1")
    assert calls == [] and list(s.mailbox) == [b"r1"] and s.wake.is_set()


def test_a_result_never_overtakes_one_waiting_in_the_mailbox():
    s, calls = _session(True)
    s.mailbox.append(b"r1")
    s.deliver(b"r2")
    assert calls == [] and list(s.mailbox) == [b"r1", b"r2"]


@pytest.mark.parametrize("direct_result", [False, None])
def test_declined_or_no_direct_path_falls_back_to_the_mailbox(direct_result):
    s, _ = _session(direct_result)
    s.deliver(b"r1")
    assert list(s.mailbox) == [b"r1"] and s.wake.is_set() and not s.lock.locked()


class _Socketish:
    """What ``_direct`` reads of simple-websocket's Server: ``sock`` and ``connected``."""

    def __init__(self, sock):
        self.sock, self.connected = sock, True


def test_direct_declines_at_once_when_the_client_stopped_reading():
    a, b = socket.socketpair()
    try:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        a.setblocking(False)
        try:
            while True:  # fill both buffers: b never reads, like a client that stopped reading
                a.send(b"x" * 4096)
        except BlockingIOError:
            pass
        a.setblocking(True)
        stream = StreamSession.__new__(StreamSession)
        stream.ws = _Socketish(a)
        stream.session = Session(sid="s1", wake=threading.Event())
        t0 = time.monotonic()
        assert stream._direct(b'{"type":"result"}') is False
        assert time.monotonic() - t0 < 0.5
    finally:
        a.close()
        b.close()


# --- a client that goes away while the gateway sends -----------------------------------------------------------


def _open_websocket(sock) -> tuple[SimpleWebsocket, WSConnection]:
    """simple-websocket's sending half over ``sock``, with a real wsproto connection after a real handshake
    (its reader thread is left out: the tests below play its part); returns it and the client's wsproto."""
    server, client = WSConnection(ConnectionType.SERVER), WSConnection(ConnectionType.CLIENT)
    server.receive_data(client.send(Request(host="gateway", target="/ws/stream")))
    assert isinstance(next(server.events()), Request)
    client.receive_data(server.send(AcceptConnection()))
    assert isinstance(next(client.events()), AcceptConnection)
    ws = SimpleWebsocket.__new__(SimpleWebsocket)
    ws.ws, ws.sock, ws.connected = server, sock, True
    return ws, client


def _stream_on(ws) -> StreamSession:
    stream = StreamSession.__new__(StreamSession)
    stream.ws, stream.session, stream.last_seq = ws, Session(sid="s1", wake=threading.Event()), None
    return stream


def test_a_close_frame_taken_between_the_check_and_the_send_ends_the_session_quietly(caplog):
    """The race CI once hit: simple-websocket's reader thread takes the client's close frame after ``send``
    checked ``connected``; wsproto then refuses to send. That is the client leaving, not a bug (1011)."""
    a, b = socket.socketpair()
    try:
        ws, client = _open_websocket(a)
        ws.ws.receive_data(client.send(CloseConnection(code=1000)))
        assert isinstance(next(ws.ws.events()), CloseConnection)  # what the reader thread does; state: closing
        assert ws.connected  # ... and it has not yet marked the socket closed
        stream = _stream_on(ws)
        with pytest.raises(ConnectionClosed):
            stream.send({"type": "pong", "t": 1})
        with caplog.at_level("ERROR", logger="densecap.gateway.stream"):
            assert stream._direct(b'{"type":"workers","seq":1}') is True  # counted as sent, not logged
        assert caplog.records == []
    finally:
        a.close()
        b.close()


def test_a_connection_reset_while_sending_ends_the_session_quietly():
    a, b = socket.socketpair()
    ws, _ = _open_websocket(a)
    b.close()  # the client's end is gone: the write fails with a broken pipe
    try:
        with pytest.raises(ConnectionClosed):
            _stream_on(ws).send({"type": "pong", "t": 1})
    finally:
        a.close()


# --- numpy unmasking of received frames (gateway/wsmask.py) ----------------------------------------------------


def test_numpy_masker_matches_wsprotos_over_any_chunking():
    original = wsmask._original_masker()
    rng = __import__("random").Random(5)
    for _ in range(40):
        key = os.urandom(4)
        data = os.urandom(rng.randrange(0, 70000))
        cuts = sorted({0, len(data), *(rng.randrange(0, len(data) + 1) for _ in range(rng.randrange(0, 6)))})
        ours, theirs = wsmask.NumpyXorMasker(key), original(key)
        for lo, hi in zip(cuts, cuts[1:]):
            assert bytes(ours.process(data[lo:hi])) == bytes(theirs.process(data[lo:hi]))


def test_install_replaces_wsprotos_masker_once_and_refuses_a_bad_key():
    assert wsmask.install() and wsmask.install()
    assert frame_protocol.XorMaskerSimple is wsmask.NumpyXorMasker
    with pytest.raises(ValueError):
        wsmask.NumpyXorMasker(b"abc")
