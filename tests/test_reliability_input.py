"""Hostile and broken input against the real gateway (gunicorn over TLS) and a stream worker: each must get the
documented answer while the service stays up and a well-behaved session streams on unaffected.

Already covered elsewhere, not repeated here (docs/reliability.md lists them all): non-image bytes, an image
over the pixel limit, a missing DCF1 header, an unknown text message, a message over the size limit (1009),
missing and wrong tokens, a foreign Origin (tests/test_gateway_live.py); a truncated JPEG
(tests/test_stream_worker.py); the per-session rate limit (tests/test_gateway_live.py); unknown job ids, `..` in
uploaded file names, bad JSON, bad cursors (tests/test_jobs_system.py::test_clear_errors).
"""

from __future__ import annotations

import io
import json
import os
import socket
import ssl
import struct
import threading
import time
import zlib

import pytest
import websocket
from PIL import Image

from conftest import ELEPHANT, RedisServer
from faultstack import TOKEN, SystemStack, load_soak, wait_for
from gateway.wire import pack_client_frame
from livestack import jpeg, random_checkpoint, recv_json, recv_until  # noqa: F401 (fixture)

SOAK = load_soak()
MAX_PIXELS = 1_000_000
MAX_MESSAGE = 1_000_000
STALL_S = 2.0  # DENSECAP_CLIENT_STALL_TIMEOUT_S here (default 10 s)
SESSIONS = 4  # -> 4 + 16 gunicorn threads: few enough to exhaust in a test


@pytest.fixture(scope="module")
def stack(tmp_path_factory, random_checkpoint):  # noqa: F811
    tmp = tmp_path_factory.mktemp("hostile")
    redis_server = RedisServer(tmp)
    s = SystemStack(tmp, redis_server, random_checkpoint, DENSECAP_REDIS_PASSWORD="",
                    DENSECAP_MAX_STREAM_PIXELS=MAX_PIXELS, DENSECAP_MAX_MESSAGE_BYTES=MAX_MESSAGE,
                    DENSECAP_MAX_SESSIONS=SESSIONS, DENSECAP_CLIENT_STALL_TIMEOUT_S=STALL_S,
                    DENSECAP_MAX_UPLOAD_BYTES=1_000_000, DENSECAP_MAX_IMAGE_PIXELS=MAX_PIXELS)
    try:
        s.start_gateway()
        s.start_stream_workers("sw-hostile")
        yield s
    finally:
        s.close()
        redis_server.kill()


@pytest.fixture
def bystander(stack):
    """A well-behaved session streaming in the background; the test checks it was never held up."""
    session = stack.sessions(1, fps=5)[0]
    session.start()
    wait_for(lambda: session.stats.results >= 2, 60, "the bystander's first results")
    t0 = time.monotonic()
    yield session
    session.stop()
    gap = session.max_gap(t0, time.monotonic())
    print(f"bystander: {session.stats.results} results, longest wait {gap:.2f} s, errors {dict(session.stats.errors)}")
    assert session.stats.cross_talk == 0 and not session.stats.errors and session.stats.reconnects == 0
    assert gap < 3.0, f"the well-behaved session waited {gap:.2f} s for a result"


# --- control messages ------------------------------------------------------------------------------------------


def test_malformed_control_messages_get_bad_message_and_the_session_stays(stack, bystander):
    ws = stack.connect(token=TOKEN)
    recv_json(ws)
    bad = ["{", "[1, 2, 3]", "null", '"config"', '{"type": null}', '{"type": "config", "max_regions": "all"}',
           '{"type": "config", "max_regions": 0}', '{"type": "config", "max_regions": true}',
           '{"type": "config", "max_regions": 1e309}', '{"type": "ping"' + ' ' * 5000,
           "[" * 100_000 + "]" * 100_000, "\u0000\u2028\ud7ff"]
    for text in bad:
        ws.send(text)
    ws.send(json.dumps({"type": "ping", "t": "still-here"}))
    msg, before = recv_until(ws, lambda m: m.get("type") == "pong", timeout=20)
    assert msg == {"type": "pong", "t": "still-here"}, "the session must survive every malformed message"
    codes = {m.get("code") for m in before}
    assert codes == {"bad_message"}, before  # reported (at most once a second), nothing else
    # A valid config still works after all that.
    ws.send(json.dumps({"type": "config", "max_regions": 3}))
    assert recv_until(ws, lambda m: m.get("type") == "config", timeout=10)[0]["max_regions"] == 3
    ws.close()



# --- hostile connections ---------------------------------------------------------------------------------------


def test_stalled_handshakes_and_plain_http_do_not_take_the_gateway_down(stack, bystander):
    """More connections than gunicorn has threads, each stalling: one byte of a TLS handshake, a TLS connection
    with half a request, plain HTTP sent to the TLS port and held open. /livez must keep answering and the live
    session streaming; a stalled connection is dropped after DENSECAP_CLIENT_STALL_TIMEOUT_S.

    Bound: a probe waits at most STALL_S (threads held by stalled clients are freed) + 5 s (gunicorn's own
    wait for a request on a fresh connection) + slack.
    """
    threads = SESSIONS + 16
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    hostile = []
    t0 = time.monotonic()
    try:
        for _ in range(threads + 10):
            c = socket.create_connection(("127.0.0.1", stack.port), timeout=10)
            c.sendall(b"\x16")  # the first byte of a TLS ClientHello
            hostile.append(c)
        for _ in range(10):
            c = ctx.wrap_socket(socket.create_connection(("127.0.0.1", stack.port), timeout=10))
            c.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Half: ")
            hostile.append(c)
        plain = []
        for _ in range(20):
            c = socket.create_connection(("127.0.0.1", stack.port), timeout=10)
            c.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            plain.append(c)
        hostile += plain
        setup_s = time.monotonic() - t0  # the TLS connections above had to wait for a thread too
        latencies = []
        for _ in range(8):
            t0 = time.monotonic()
            status = probe(stack, "/livez")
            latencies.append((round(time.monotonic() - t0, 2), status))
            time.sleep(0.5)
        print(f"{len(hostile)} stalled connections against {threads} threads: opened in {setup_s:.2f} s; "
              f"/livez then answered in {latencies}")
        assert all(status == 200 for _, status in latencies), latencies
        assert max([t for t, _ in latencies] + [setup_s]) < STALL_S + 5 + 2
        # Plain HTTP to the TLS port gets no answer: the connection is closed (gunicorn logs "http request").
        plain[0].settimeout(STALL_S + 5)
        assert plain[0].recv(100) == b""
        # Every stalled client was cut off.
        for c in hostile[:3]:
            c.settimeout(STALL_S + 5)
            try:
                assert c.recv(100) == b""
            except ConnectionResetError:
                pass
    finally:
        for c in hostile:
            c.close()


def probe(stack, path: str, timeout: float = 15.0) -> int:
    """HTTP status of GET ``path`` (0 when it did not answer within ``timeout``)."""
    import urllib.error
    import urllib.request
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    try:
        with urllib.request.urlopen(stack.base + path, context=ctx, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0
