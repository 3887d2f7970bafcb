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

pytestmark = pytest.mark.slow
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


# --- hostile images --------------------------------------------------------------------------------------------


def png_bomb(width: int, height: int) -> bytes:
    """A valid grayscale PNG of ``width x height`` black pixels: a few hundred KB that inflate to w*h bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack("!I", len(data)) + kind + data + struct.pack("!I", zlib.crc32(kind + data))
    z = zlib.compressobj(9)
    rows = (b"\x00" * (width + 1)) * 64
    idat = b"".join(z.compress(rows) for _ in range(height // 64)) + z.flush()
    ihdr = struct.pack("!IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png_text_bomb() -> bytes:
    """A small, valid 64x64 PNG with a zTXt chunk that inflates to 64 MB (Pillow refuses text over 1 MB)."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, "PNG")
    png = buf.getvalue()
    z = zlib.compressobj(9)
    text = b"".join(z.compress(b" " * (1 << 20)) for _ in range(64)) + z.flush()
    data = b"comment\x00\x00" + text
    ztxt = struct.pack("!I", len(data)) + b"zTXt" + data + struct.pack("!I", zlib.crc32(b"zTXt" + data))
    return png[:33] + ztxt + png[33:]  # after the 8-byte signature and the 25-byte IHDR chunk


def jpeg_header_bomb() -> bytes:
    """A tiny JPEG whose frame header claims 65000 x 65000 pixels."""
    data = bytearray(jpeg(16, 16))
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack("!HH", 65000, 65000)
    return bytes(data)


def corrupt_jpeg() -> bytes:
    """A JPEG with an intact header and its entropy-coded data overwritten with noise."""
    data = bytearray(ELEPHANT.read_bytes())
    sos = data.find(b"\xff\xda")
    rng = __import__("random").Random(7)
    for i in range(sos + 20, len(data) - 2, 3):
        data[i] = rng.randrange(256)
    return bytes(data)


def gateway_rss_mb(stack) -> float:
    return SOAK.tree_rss_mb(stack.gateway.pid)


def test_hostile_frames_get_documented_answers(stack, bystander):
    ws = stack.connect(token=TOKEN)
    recv_json(ws)
    rss_before = gateway_rss_mb(stack)
    cases = [
        ("corrupt JPEG", corrupt_jpeg(), {"result", "bad_image"}),
        ("PNG decompression bomb 20000x20000", png_bomb(20000, 20000), {"too_large"}),
        ("JPEG header claiming 65000x65000", jpeg_header_bomb(), {"too_large"}),
        ("PNG with a 64 MB zTXt chunk", png_text_bomb(), {"bad_image", "result"}),
        ("empty image after the header", b"", {"bad_image"}),
        ("GIF bytes cut short", b"GIF89a\x10\x00\x10\x00", {"bad_image"}),
    ]
    for seq, (what, image, expected) in enumerate(cases, start=1):
        assert len(image) < MAX_MESSAGE, (what, len(image))
        ws.send_binary(pack_client_frame(seq, 0, image))
        msg, _ = recv_until(ws, lambda m: m.get("seq") == seq, timeout=20)
        got = msg["type"] if msg["type"] == "result" else msg.get("code")
        print(f"{what}: {got} {msg.get('message', '')[:100]}")
        assert got in expected, (what, msg)
        time.sleep(0.3)  # stay under the rate limit: each case must reach the checks
    ws.send_binary(pack_client_frame(99, 0, jpeg(320, 240)))
    assert recv_until(ws, lambda m: m.get("seq") == 99, timeout=20)[0]["type"] == "result"  # still usable
    ws.close()
    grown = gateway_rss_mb(stack) - rss_before
    assert grown < 30, f"the gateway grew {grown:.0f} MiB on a few hostile frames"
    assert stack.workers[0].poll() is None and stack.gateway.poll() is None


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


def raw_ws(stack) -> ssl.SSLSocket:
    """A websocket handshake by hand, to send frames websocket-client would refuse to build."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", stack.port), timeout=10))
    s.sendall((f"GET /ws/stream HTTP/1.1\r\nHost: 127.0.0.1:{stack.port}\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
               f"Sec-WebSocket-Protocol: densecap.v1, token.{TOKEN}\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(4096)
    assert head.startswith(b"HTTP/1.1 101"), head[:200]
    return s


def read_close_code(s: ssl.SSLSocket, timeout: float = 10.0) -> int | None:
    """Read server frames until a close frame; its code (None if the connection ended without one)."""
    s.settimeout(timeout)
    buf = b""
    while True:
        try:
            data = s.recv(65536)
        except (TimeoutError, OSError):
            return None
        if not data:
            return None
        buf += data
        while len(buf) >= 2:
            opcode, n = buf[0] & 0x0F, buf[1] & 0x7F
            start = 2 + (2 if n == 126 else 8 if n == 127 else 0)
            if len(buf) < start:
                break
            if n >= 126:
                n = int.from_bytes(buf[2:start], "big")
            if len(buf) < start + n:
                break
            if opcode == 0x8:
                return int.from_bytes(buf[start:start + 2], "big")
            buf = buf[start + n:]


def masked(opcode: int, payload: bytes, declared: int | None = None) -> bytes:
    n = len(payload) if declared is None else declared
    head = bytes([0x80 | opcode])
    head += bytes([0x80 | 127]) + n.to_bytes(8, "big") if n >= 65536 else \
        bytes([0x80 | 126]) + n.to_bytes(2, "big") if n >= 126 else bytes([0x80 | n])
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def test_websocket_frames_declaring_8_gib_or_bad_utf8_are_closed(stack, bystander):
    """A frame header may declare any length: the gateway buffers at most the message limit, then closes 1009."""
    s = raw_ws(stack)
    rss_before = gateway_rss_mb(stack)
    # Just over the limit: the server reads it all before closing, so the close frame is not lost to a reset.
    payload = b"DCF1" + bytes(MAX_MESSAGE - 4 + 10)
    s.sendall(masked(0x2, payload, declared=8 << 30))
    t0 = time.monotonic()
    code = read_close_code(s)
    print(f"a frame declaring 8 GiB (then {len(payload)} bytes of it): close {code} after "
          f"{time.monotonic() - t0:.2f} s, gateway RSS {gateway_rss_mb(stack) - rss_before:+.1f} MiB")
    assert code == 1009
    s.close()
    s = raw_ws(stack)
    s.sendall(masked(0x1, b'{"type": "ping", "t": "\xff\xfe"}'))
    code = read_close_code(s)
    print(f"a text frame that is not UTF-8: close {code}")
    assert code in (1002, 1007)
    s.close()


def test_a_flooding_client_is_rate_limited_and_others_are_unaffected(stack, bystander):
    """One client sends 400 frames as fast as it can and never reads: it is rate limited, the others are not
    held up, and the gateway's memory stays flat."""
    rss_before = gateway_rss_mb(stack)
    ws = stack.connect(token=TOKEN)
    recv_json(ws)
    frame = pack_client_frame(0, 0, jpeg(320, 240, noise=True))
    t0 = time.monotonic()
    for seq in range(400):
        ws.send_binary(frame[:4] + seq.to_bytes(4, "big") + frame[8:])
    sent_s = time.monotonic() - t0
    codes: dict[str, int] = {}
    ws.settimeout(5)
    try:
        while True:
            msg = json.loads(ws.recv())
            key = msg.get("code") or msg["type"]
            codes[key] = codes.get(key, 0) + 1
    except websocket.WebSocketTimeoutException:
        pass
    ws.close()
    grown = gateway_rss_mb(stack) - rss_before
    print(f"flood of 400 frames ({len(frame) // 1024} KB each) in {sent_s:.2f} s: answers {codes}; gateway RSS "
          f"{grown:+.1f} MiB")
    assert codes.get("rate_limited", 0) >= 1 and codes.get("result", 0) <= 60
    assert grown < 30


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


# --- bulk uploads ---------------------------------------------------------------------------------------------


def test_hostile_uploads_are_rejected_per_file_or_per_request(stack):
    import requests
    from client.jobs_client import ApiError, UploadFile
    client = stack.jobs_client()
    job = client.create_job()["id"]
    reply = client.upload(job, [UploadFile("bomb.png", png_bomb(20000, 20000)),
                                UploadFile("header-bomb.jpg", jpeg_header_bomb()),
                                UploadFile("text-bomb.png", png_text_bomb()),
                                UploadFile("ok.jpg", jpeg(64, 48))])
    rejected = {r["name"]: r["error"] for r in reply["rejected"]}
    print(f"upload answers: rejected {rejected}, accepted {[a['name'] for a in reply['accepted']]}")
    assert "decompression bomb" in rejected["bomb.png"] and "over the limit" in rejected["header-bomb.jpg"]
    assert "not a readable image" in rejected["text-bomb.png"]
    assert [a["name"] for a in reply["accepted"]] == ["ok.jpg"]
    for bad in ("../x.jpg", "a/../../x.jpg", "/etc/passwd", "C:/x.jpg", "a\\b.jpg", "a//b.jpg", "./a.jpg", "a\x00.jpg"):
        with pytest.raises(ApiError) as info:
            client.manifest(job, [{"name": bad, "sha256": "0" * 64, "size": 1}])
        assert info.value.status == 400 and info.value.code == "bad_item", bad
    # A request declaring more than the limit is answered 413 from its headers, before any body byte is read.
    # (A client that goes on sending may see its connection reset instead; `densecap submit` never sends one.)
    c = ssl.create_default_context(cafile=str(stack.cert)).wrap_socket(
        socket.create_connection(("127.0.0.1", stack.port), timeout=10), server_hostname="127.0.0.1")
    c.sendall((f"POST /api/v1/jobs/{job}/images HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
               "Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 3000000\r\n\r\n").encode())
    answer = b""
    while b'"too_large"' not in answer and (chunk := c.recv(65536)):
        answer += chunk
    answer = answer.decode(errors="replace")
    c.close()
    assert answer.startswith("HTTP/1.1 413") and '"too_large"' in answer, answer[:300]
    assert client.status(job)["counts"]["images"] == 4
    assert stack.get("/livez")[0] == 200


def test_sessions_that_ended_normally_left_no_error_in_the_log(stack):
    """Runs last in this module: every session above ended by a client close or a documented close code, and
    none of them may show up as a failed session (the 1011 path is for bugs only)."""
    log = (stack.dir / "gateway.log").read_text(errors="replace")
    assert "Booting worker" in log
    lines = log.splitlines()
    failed = [i for i, line in enumerate(lines) if "live session" in line and "failed" in line]
    assert failed == [], "\n".join(lines[failed[0]:failed[0] + 40])  # the first one, with its traceback
