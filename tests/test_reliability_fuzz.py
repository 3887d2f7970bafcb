"""Fuzzing the decoders that face the network, with hypothesis: the live frame path (DCF1 header, image header
check, control messages, as the gateway's session loop runs them) and the bulk upload path (multipart parsing,
item names, image checks, manifest JSON, through the real Flask app on a real redis-server).

The contract under test: any input either works or gets the documented error; nothing raises out of the
handlers (which would kill a session or answer 500). Deterministic (derandomized) and bounded for CI;
``DENSECAP_FUZZ_EXAMPLES=5000`` runs more cases by hand.
"""

from __future__ import annotations

import io
import json
import os
import random
import threading

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import ELEPHANT, RedisServer
from densecap_core.imageio import ImageDecodeError, ImageError, ImageTooLarge, decode_image, peek_size
from densecap_core.jobs import BadItem, validate_item_name
from densecap_core.settings import Settings
from gateway import wire

EXAMPLES = int(os.environ.get("DENSECAP_FUZZ_EXAMPLES", "300"))
# Pillow warns about the corrupt metadata the mutations make (EXIF, TIFF tags): expected here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _seed_images() -> list[bytes]:
    """Small valid images of several formats, the material mutations start from."""
    photo = Image.open(ELEPHANT).convert("RGB").resize((64, 48))
    out = []
    for fmt, kw in [("JPEG", {"quality": 80}), ("JPEG", {"progressive": True}), ("PNG", {}), ("GIF", {}),
                    ("BMP", {}), ("WEBP", {}), ("TIFF", {})]:
        buf = io.BytesIO()
        (photo.convert("P") if fmt == "GIF" else photo).save(buf, fmt, **kw)
        out.append(buf.getvalue())
    return out


SEEDS = _seed_images()


@st.composite
def mutated_images(draw) -> bytes:
    """A valid image with a few bytes flipped, cut short, or with bytes inserted/deleted."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    for _ in range(draw(st.integers(1, 6))):
        op = rng.randrange(4)
        i = rng.randrange(len(data))
        if op == 0:
            data[i] = rng.randrange(256)
        elif op == 1:
            del data[i:]
        elif op == 2:
            data[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8)))
        elif len(data) > 2:
            del data[i:i + rng.randrange(1, 8)]
        if not data:
            data = bytearray(b"\xff")
    return bytes(data)


images_or_noise = st.one_of(mutated_images(), st.binary(max_size=2048))


# --- the image checks every path uses ----------------------------------------------------------------------------


@FUZZ
@given(images_or_noise)
def test_peek_size_returns_a_size_or_a_documented_error(data):
    try:
        w, h = peek_size(data)
    except (ImageDecodeError, ImageTooLarge):
        return
    assert isinstance(w, int) and isinstance(h, int)


@FUZZ
@given(images_or_noise)
def test_decode_image_returns_rgb_within_the_cap_or_a_documented_error(data):
    try:
        im = decode_image(data, max_pixels=200_000)
    except ImageError:
        return
    assert im.mode == "RGB" and im.width * im.height <= 200_000


# --- the live frame path, as the gateway's session loop runs it ----------------------------------------------------


class FakeSocket:
    """What StreamSession needs from a flask-sock websocket: ``send``."""

    def __init__(self):
        self.sent: list[dict] = []
        self.event = threading.Event()

    def send(self, text: str) -> None:
        self.sent.append(json.loads(text))


@pytest.fixture(scope="module")
def session_factory():
    from gateway.app import create_app, get_state
    from gateway.sessions import Session
    from gateway.stream import StreamSession
    app = create_app(Settings(api_tokens=("t",), max_fps_per_session=1e9, max_stream_pixels=1_000_000))
    with app.app_context():
        state = get_state()  # its Redis client never connects: these checks run before any Redis call

    def make():
        ws = FakeSocket()
        return StreamSession(ws, Session("s" * 24, ws.event), state), ws

    return make


@FUZZ
@given(seq=st.integers(0, 2**32 - 1), ts=st.floats(allow_nan=True, allow_infinity=True),
       image=images_or_noise, garbage=st.binary(max_size=64), framed=st.booleans())
def test_binary_messages_are_accepted_or_refused_with_a_documented_error(session_factory, seq, ts, image,
                                                                         garbage, framed):
    session, ws = session_factory()
    message = wire.pack_client_frame(seq, ts, image) if framed else garbage
    accepted = session._accept_frame(message)
    if accepted is None:
        assert len(ws.sent) <= 1
        for msg in ws.sent:
            assert msg["type"] == "error" and msg["code"] in ("bad_header", "bad_image", "too_large"), msg
            assert msg["code"] == "bad_header" or msg["seq"] == seq
    else:
        _, got_seq, got_ts, w, h, payload = accepted
        assert framed and got_seq == seq and bytes(payload) == image and w * h <= 1_000_000 and not ws.sent
        assert got_ts == ts or (got_ts != got_ts and ts != ts)  # NaN echoes as NaN


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=4), max_leaves=12)
control_texts = st.one_of(
    st.text(max_size=200),
    json_values.map(json.dumps),
    st.fixed_dictionaries({"type": st.sampled_from(["config", "ping", "pong", "", "CONFIG"])},
                          optional={"max_regions": json_values, "query": json_values, "t": json_values}).map(json.dumps))


@FUZZ
@given(control_texts)
@example("[" * 50_000 + "]" * 50_000)
@example('{"type": "config", "max_regions": true}')
def test_text_messages_get_one_documented_answer(session_factory, text):
    session, ws = session_factory()
    session._control(text)
    assert len(ws.sent) == 1, ws.sent
    msg = ws.sent[0]
    assert msg["type"] in ("pong", "config", "error"), msg
    if msg["type"] == "error":
        assert msg["code"] == "bad_message" and "seq" not in msg
    if msg["type"] == "config":
        n, query = msg["max_regions"], msg["query"]
        assert n is None or (type(n) is int and 1 <= n <= 1000)
        assert query is None or (type(query) is str and 0 < len(query) <= 200 and query == query.strip())


@FUZZ
@given(st.binary(max_size=40))
def test_frame_header_round_trip_and_refusals(blob):
    try:
        seq, ts, image = wire.unpack_client_frame(blob)
    except wire.HeaderError:
        assert len(blob) < wire.FRAME_HEADER_BYTES or blob[:4] != wire.FRAME_MAGIC
        return
    assert wire.pack_client_frame(seq, ts, bytes(image))[4:] == blob[4:] or ts != ts


# --- the upload path, through the real app --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def jobs_app(tmp_path_factory):
    redis_server = RedisServer(tmp_path_factory.mktemp("fuzz-redis"))
    from gateway.app import create_app
    app = create_app(Settings(api_tokens=("t",), redis_url=redis_server.url, max_upload_bytes=200_000,
                              max_image_pixels=1_000_000, jobs_queue="fuzz-jobs"))
    client = app.test_client()
    job = client.post("/api/v1/jobs", headers={"Authorization": "Bearer t"}).get_json()["id"]
    yield client, job
    redis_server.kill()


names = st.one_of(st.text(max_size=40), st.sampled_from(["a.jpg", "sub/b.png", "../x", "a/../b", "/abs", "C:/x",
                                                         "a\\b", "", ".", "a//b", "ok/./x", "\x00", "x" * 1100]))


@FUZZ
@given(parts=st.lists(st.tuples(names, images_or_noise), min_size=1, max_size=3), field=st.sampled_from(["file", "x"]))
def test_uploads_never_fail_the_server(jobs_app, parts, field):
    client, job = jobs_app
    data = {field: [(io.BytesIO(blob), name) for name, blob in parts]}
    response = client.post(f"/api/v1/jobs/{job}/images", data=data, content_type="multipart/form-data",
                           headers={"Authorization": "Bearer t"})
    assert response.status_code < 500, response.get_data(as_text=True)[:300]
    body = response.get_json()
    if response.status_code == 200:
        for entry in body["accepted"] + body["rejected"]:
            assert validate_item_name(entry["name"]) == entry["name"]
    else:
        assert body["error"]["code"] in ("bad_item", "bad_request", "too_large"), body


@FUZZ
@given(st.one_of(json_values, st.fixed_dictionaries({"items": st.lists(st.dictionaries(
    st.sampled_from(["name", "sha256", "size"]), st.one_of(names, json_values, st.just("0" * 64))), max_size=3)})))
def test_manifests_never_fail_the_server(jobs_app, body):
    client, job = jobs_app
    response = client.post(f"/api/v1/jobs/{job}/manifest", json=body, headers={"Authorization": "Bearer t"})
    assert response.status_code in (200, 400), response.get_data(as_text=True)[:300]
    if response.status_code == 200:
        for item in response.get_json()["items"]:
            assert validate_item_name(item["name"]) == item["name"]


@FUZZ
@given(names)
def test_accepted_item_names_stay_inside_the_output_folder(name):
    from pathlib import PurePosixPath
    try:
        validate_item_name(name)
    except BadItem:
        return
    path = PurePosixPath("/out") / name
    assert not PurePosixPath(name).is_absolute() and ".." not in path.parts and path.parts[:2] == ("/", "out")
