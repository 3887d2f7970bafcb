"""The live path end to end with real parts: gunicorn over TLS (``python -m gateway``), a stream worker
subprocess with a random-weight model, a real redis-server, websocket clients over wss.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import websocket

from conftest import RedisServer
from gateway.wire import pack_client_frame
from livestack import LiveStack, jpeg, random_checkpoint, recv_json, recv_until  # noqa: F401 (fixture)

MAX_PIXELS = 1_000_000
MAX_MESSAGE = 1_000_000


@pytest.fixture(scope="module")
def stack(tmp_path_factory, random_checkpoint):
    tmp = tmp_path_factory.mktemp("live")
    redis_server = RedisServer(tmp)
    s = LiveStack(tmp, redis_server, random_checkpoint, DENSECAP_MAX_STREAM_PIXELS=MAX_PIXELS,
                  DENSECAP_MAX_MESSAGE_BYTES=MAX_MESSAGE, DENSECAP_ALLOWED_ORIGINS="https://app.example")
    try:
        s.start_gateway()
        s.start_worker()
        yield s
    finally:
        s.close()
        redis_server.kill()


def send_frame(ws, seq: int, image: bytes) -> None:
    ws.send_binary(pack_client_frame(seq, time.time() * 1000, image))


def test_hello_then_result_for_a_frame(stack, elephant_path):
    ws = stack.connect()
    try:
        assert ws.subprotocol == "densecap.v1"
        hello = recv_json(ws)
        assert hello["type"] == "hello" and hello["protocol"] == "densecap.v1"
        assert hello["stream_workers"] >= 1 and hello["limits"]["max_pixels"] == MAX_PIXELS
        send_frame(ws, 7, elephant_path.read_bytes())
        msg = recv_json(ws)
        assert msg["type"] == "result" and msg["seq"] == 7
        assert (msg["width"], msg["height"]) == (720, 480)
        assert msg["regions"], "the random model still proposes regions"
        r = msg["regions"][0]
        assert len(r["box"]) == 4 and isinstance(r["caption"], str) and r["caption"] and 0 <= r["score"] <= 1
        # exactly the documented timings (docs/protocol.md): nothing of the server's clock or internals leaks
        assert set(msg["timings"]) == {"queue_ms", "decode_ms", "inference_ms", "batch_size", "server_ms"}
        assert "t_in" not in msg
        # config: fewer regions per result
        ws.send(json.dumps({"type": "config", "max_regions": 2}))
        assert recv_json(ws) == {"type": "config", "max_regions": 2, "query": None}
        send_frame(ws, 8, elephant_path.read_bytes())
        msg = recv_json(ws)
        assert msg["seq"] == 8 and len(msg["regions"]) <= 2
        ws.send(json.dumps({"type": "ping", "t": 123}))
        assert recv_json(ws) == {"type": "pong", "t": 123}
    finally:
        ws.close()


def test_find_says_where_the_model_would_say_the_query(stack, elephant_path):
    """config.query: every result carries ``find``, the region with the highest log p of the phrase (computed
    by the worker's model, checked here against the same model run directly); a word the model never says gets
    a ``find.error`` naming it; null stops it; max_regions is left as it was."""
    from densecap_core.imageio import decode_image
    from densecap_core.inference import Captioner

    ws = stack.connect()
    try:
        recv_json(ws)  # hello
        ws.send(json.dumps({"type": "config", "max_regions": 3}))
        recv_json(ws)
        ws.send(json.dumps({"type": "config", "query": "  a red circle "}))
        assert recv_json(ws) == {"type": "config", "max_regions": 3, "query": "a red circle"}
        send_frame(ws, 1, elephant_path.read_bytes())
        msg = recv_json(ws)
        assert msg["type"] == "result" and len(msg["regions"]) <= 3 and msg["find"]["query"] == "a red circle"
        best = msg["find"]["best"]
        ((result, log_probs),) = Captioner(str(stack.checkpoint), device="cpu").match(
            [decode_image(elephant_path.read_bytes())], ["frame"], "a red circle")
        k = int(log_probs.argmax())
        assert best["rank"] == k and best["caption"] == result.regions[k].caption
        assert best["log_prob"] == pytest.approx(float(log_probs[k]), abs=1e-2) and best["log_prob"] < 0
        assert best["box"] == pytest.approx(list(result.regions[k].box), abs=0.05)

        ws.send(json.dumps({"type": "config", "query": "a purple banana"}))
        recv_json(ws)
        send_frame(ws, 2, elephant_path.read_bytes())
        msg = recv_json(ws)
        assert msg["regions"] and "best" not in msg["find"] and "'banana'" in msg["find"]["error"]

        ws.send(json.dumps({"type": "config", "query": 7}))
        assert recv_json(ws)["code"] == "bad_message"
        ws.send(json.dumps({"type": "config", "query": None}))
        assert recv_json(ws) == {"type": "config", "max_regions": 3, "query": None}
        send_frame(ws, 3, elephant_path.read_bytes())
        msg = recv_json(ws)
        assert msg["seq"] == 3 and "find" not in msg and len(msg["regions"]) <= 3
    finally:
        ws.close()


def test_sessions_receive_only_their_own_results(stack):
    n_sessions, n_frames = 4, 4
    failures: list[str] = []

    def run(i: int) -> None:
        width = 200 + 40 * i  # each session's frames have their own size, so a stray result shows
        image = jpeg(width, 150, color=(40 * i, 100, 150))
        ws = stack.connect()
        try:
            sid = recv_json(ws)["session"]
            for k in range(n_frames):
                seq = 1000 * i + k
                send_frame(ws, seq, image)
                msg, _ = recv_until(ws, lambda m: m["type"] in ("result", "error"), timeout=20)
                if msg["type"] != "result" or msg["seq"] != seq or msg["width"] != width:
                    failures.append(f"session {i} ({sid}) frame {seq}: got {msg}")
        except Exception as exc:  # reported below: assertion errors in threads would be lost
            failures.append(f"session {i}: {exc!r}")
        finally:
            ws.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n_sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures, failures


class Streamer(threading.Thread):
    """A well-behaved session streaming in the background (one frame in flight) and counting results."""

    def __init__(self, stack, image: bytes):
        super().__init__(daemon=True)
        self.ws = stack.connect()
        recv_json(self.ws)
        self.image = image
        self.results = 0
        self.errors: list = []
        self.stop = threading.Event()

    def run(self) -> None:
        seq = 0
        try:
            while not self.stop.is_set():
                send_frame(self.ws, seq, self.image)
                msg, _ = recv_until(self.ws, lambda m: m.get("seq") == seq, timeout=20)
                if msg["type"] == "result":
                    self.results += 1
                else:
                    self.errors.append(msg)
                seq += 1
        except Exception as exc:
            self.errors.append(repr(exc))
        finally:
            self.ws.close()


def test_bad_input_is_refused_with_documented_errors_while_another_session_goes_on(stack, elephant_path):
    good = Streamer(stack, elephant_path.read_bytes())
    good.start()
    try:
        ws = stack.connect()
        recv_json(ws)
        send_frame(ws, 1, b"this is not an image at all")
        msg = recv_json(ws)
        assert (msg["type"], msg["code"], msg["seq"]) == ("error", "bad_image", 1)

        send_frame(ws, 2, jpeg(1200, 1000))  # 1.2 MP > the 1 MP cap: refused from the header, before decoding
        msg = recv_json(ws)
        assert (msg["type"], msg["code"], msg["seq"]) == ("error", "too_large", 2)
        assert "1200x1000" in msg["message"]

        ws.send_binary(b"JUNKJUNKJUNKJUNK" + elephant_path.read_bytes())
        assert recv_json(ws)["code"] == "bad_header"
        ws.send("hello?")
        assert recv_json(ws)["code"] == "bad_message"

        # Still usable after all that.
        send_frame(ws, 3, elephant_path.read_bytes())
        msg, _ = recv_until(ws, lambda m: m.get("seq") == 3)
        assert msg["type"] == "result"

        ws.close()
        before = good.results
        time.sleep(1.0)
        assert good.results > before, "the well-behaved session stopped getting results"
    finally:
        good.stop.set()
        good.join(20)
    assert good.results > 0 and not good.errors, good.errors


def test_oversized_message_gets_close_code_1009(stack):
    ws = stack.connect()
    recv_json(ws)
    blob = pack_client_frame(1, 0, b"\xff" * (MAX_MESSAGE + 10))
    ws.send_binary(blob)
    ws.settimeout(10)
    opcode, data = ws.recv_data(control_frame=True)
    assert opcode == websocket.ABNF.OPCODE_CLOSE
    assert int.from_bytes(data[:2], "big") == 1009
    ws.close()


def test_unauthenticated_and_foreign_origin_refused_before_upgrade(stack):
    with pytest.raises(websocket.WebSocketBadStatusException) as e:
        stack.connect(token=None)
    assert e.value.status_code == 401 and b"unauthorized" in e.value.resp_body
    with pytest.raises(websocket.WebSocketBadStatusException) as e:
        stack.connect(token="wrong-token")
    assert e.value.status_code == 401
    with pytest.raises(websocket.WebSocketBadStatusException) as e:
        stack.connect(origin="https://evil.example")
    assert e.value.status_code == 403 and b"forbidden_origin" in e.value.resp_body
    # An allow-listed origin and the gateway's own origin are accepted; so is ?token= in the URL.
    for origin in ("https://app.example", stack.base):
        ws = stack.connect(origin=origin)
        assert recv_json(ws)["type"] == "hello"
        ws.close()
    ws = websocket.create_connection(f"wss://127.0.0.1:{stack.port}/ws/stream?token={stack.token}",
                                     sslopt={"cert_reqs": 0}, subprotocols=["densecap.v1"])
    assert recv_json(ws)["type"] == "hello"
    ws.close()


def test_large_frame_over_tls_is_not_stalled_by_read_buffering(stack):
    """~360 KB frames over TLS with pings on: each must arrive at once, not after a ping interval."""
    image = jpeg(640, 480, noise=True, quality=95)
    assert len(image) > 200_000
    ws = stack.connect()
    recv_json(ws)
    try:
        for seq in range(3):
            t0 = time.monotonic()
            send_frame(ws, seq, image)
            msg = recv_json(ws, timeout=20)
            elapsed = time.monotonic() - t0
            assert msg["type"] == "result" and msg["seq"] == seq
            assert elapsed < 3.0, f"frame {seq} took {elapsed:.1f} s"
    finally:
        ws.close()


def test_healthz_and_metrics(stack):
    status, body = stack.get_json("/healthz")
    assert status == 200 and body["status"] == "ok" and body["redis"] == "ok" and body["stream_workers"] >= 1
    assert stack.get_json("/livez")[0] == 200
    status, text = stack.get("/metrics")
    text = text.decode()
    assert status == 200

    def value(line_start: str) -> float:
        for line in text.splitlines():
            if line.startswith(line_start):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"{line_start} not in /metrics")

    assert value("densecap_stream_frames_in_total") > 0
    assert value('densecap_stream_frames_dropped_total{reason="bad_image"}') >= 1
    assert value('densecap_stream_frames_dropped_total{reason="too_large"}') >= 1
    assert value("densecap_stream_results_total") > 0
    assert value("densecap_stream_e2e_seconds_count") > 0
    assert value("densecap_stream_inference_seconds_count") > 0
    assert value("densecap_stream_queue_wait_seconds_count") > 0
    assert value("densecap_stream_batch_size_count") > 0
    assert "densecap_stream_sessions_active" in text
    assert value('densecap_stream_sessions_refused_total{reason="unauthorized"}') >= 1


def test_live_page_is_served(stack):
    status, body = stack.get("/live/")
    assert status == 200 and b"<html" in body.lower()
    status, _ = stack.get("/")
    assert status == 200  # redirected to /live/


def test_session_cap_refuses_politely_and_http_stays_responsive(tmp_path, stack):
    """A second gateway (same Redis) capped at 2 sessions: a third gets error + close 4013."""
    capped = LiveStack(tmp_path, stack.redis_server, DENSECAP_MAX_SESSIONS="2")
    capped.start_gateway()
    open_ws = []
    try:
        for _ in range(2):
            ws = capped.connect()
            assert recv_json(ws)["type"] == "hello"
            open_ws.append(ws)
        ws = capped.connect()
        msg = recv_json(ws)
        assert (msg["type"], msg["code"]) == ("error", "server_full")
        ws.settimeout(5)
        opcode, data = ws.recv_data(control_frame=True)
        assert opcode == websocket.ABNF.OPCODE_CLOSE and int.from_bytes(data[:2], "big") == 4013
        ws.close()
        # With every session slot taken, HTTP still has threads.
        for _ in range(5):
            t0 = time.monotonic()
            status, body = capped.get_json("/healthz")
            assert time.monotonic() - t0 < 2.0
            assert body["sessions"] == 2 and body["session_limit"] == 2
        # A slot frees when a session closes.
        open_ws.pop().close()
        deadline = time.monotonic() + 5
        while capped.get_json("/healthz")[1]["sessions"] != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        ws = capped.connect()
        assert recv_json(ws)["type"] == "hello"
        open_ws.append(ws)
    finally:
        for ws in open_ws:
            ws.close()
        capped.close()


def test_sigterm_closes_sessions_with_1001_promptly(tmp_path, stack):
    gw = LiveStack(tmp_path, stack.redis_server)
    gw.start_gateway()
    try:
        ws = gw.connect()
        assert recv_json(ws)["type"] == "hello"
        t0 = time.monotonic()
        os.killpg(gw.gateway.pid, signal.SIGTERM)
        ws.settimeout(5)
        opcode, data = ws.recv_data(control_frame=True)
        assert opcode == websocket.ABNF.OPCODE_CLOSE and int.from_bytes(data[:2], "big") == 1001
        assert time.monotonic() - t0 < 3.0
        assert gw.gateway.wait(10) == 0
        ws.close()
    finally:
        gw.close()


def test_per_session_rate_limit_drops_excess_frames(tmp_path, stack, elephant_path):
    gw = LiveStack(tmp_path, stack.redis_server, DENSECAP_MAX_FPS_PER_SESSION="4")
    gw.start_gateway()
    try:
        ws = gw.connect()
        assert recv_json(ws)["limits"]["max_fps"] == 4
        image = jpeg(64, 48)
        for seq in range(12):  # far faster than 4 frames/s
            send_frame(ws, seq, image)
        msg, _ = recv_until(ws, lambda m: m.get("code") == "rate_limited", timeout=10)
        assert msg["type"] == "error" and isinstance(msg["seq"], int) and "4 frames/s" in msg["message"]

        def dropped() -> float:
            text = gw.get("/metrics")[1].decode()
            prefix = 'densecap_stream_frames_dropped_total{reason="rate_limited"}'
            return float(next(x for x in text.splitlines() if x.startswith(prefix)).split()[-1])

        # The error comes at the first dropped frame; the session may still be reading the rest (under load,
        # closing now would end it before it counts them), so keep it open until they are counted.
        deadline = time.monotonic() + 10
        while dropped() < 8 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert dropped() >= 8  # a burst of 2 passes, the rest is dropped
        ws.close()
    finally:
        gw.close()
