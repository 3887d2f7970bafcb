"""The fast paths of the one image decoder: ``jpeg_size`` (header walk used by ``peek_size``) and
``decode_image_tensor`` (torchvision's JPEG decoder) must agree with Pillow exactly, and fail the same way."""

from __future__ import annotations

import io
import os
import random

import numpy as np
import pytest
from PIL import Image

from densecap_core.imageio import (ImageDecodeError, ImageTooLarge, decode_image, decode_image_tensor, jpeg_size,
                                   peek_size)
from conftest import ELEPHANT


def encode(im: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def jpeg_variants(size=(64, 48)) -> dict[str, bytes]:
    im = Image.open(ELEPHANT).convert("RGB").resize(size)
    exif = im.getexif()
    exif[0x0112] = 6  # rotated 90 degrees
    return {
        "baseline": encode(im), "progressive": encode(im, progressive=True), "gray": encode(im.convert("L")),
        "cmyk": encode(im.convert("CMYK")), "exif_rotated": encode(im, exif=exif.tobytes()),
        "optimized_444": encode(im, optimize=True, quality=30, subsampling=0),
        "big_icc_profile": encode(im, icc_profile=os.urandom(70_000)),  # several APP2 segments before the SOF
    }


@pytest.mark.parametrize("size", [(1, 1), (640, 480), (17, 3000), (3001, 5)])
def test_jpeg_size_agrees_with_pillow(size):
    for name, data in jpeg_variants(size).items():
        expected = Image.open(io.BytesIO(data)).size
        assert jpeg_size(data) == expected, name
        assert jpeg_size(memoryview(data)) == expected, name
        assert peek_size(data) == expected, name


def test_jpeg_size_never_guesses_on_damaged_headers():
    rng = random.Random(0)
    for data in jpeg_variants().values():
        true = Image.open(io.BytesIO(data)).size
        for cut in range(0, 700, 7):  # truncated: None, or the true size if the SOF made it in
            assert jpeg_size(data[:cut]) in (None, true)
        for _ in range(300):  # one flipped byte: never an exception
            b = bytearray(data[:1000])
            b[rng.randrange(len(b))] = rng.randrange(256)
            jpeg_size(bytes(b))
    assert jpeg_size(encode(Image.new("RGB", (5, 5)), "PNG")) is None
    assert jpeg_size(b"") is None
    with pytest.raises(ImageDecodeError):
        peek_size(b"\xff\xd8\xff\xe0 not really a jpeg")


def test_decode_image_tensor_is_pixel_identical_to_decode_image():
    cases = dict(jpeg_variants((200, 150)))
    cases["png_rgba"] = encode(Image.open(ELEPHANT).convert("RGBA").resize((50, 40)), "PNG")
    for name, data in cases.items():
        t = decode_image_tensor(data)
        ref = np.asarray(decode_image(data)).transpose(2, 0, 1)
        assert str(t.dtype) == "torch.uint8" and tuple(t.shape) == ref.shape, name
        assert (t.numpy() == ref).all(), name


def test_decode_image_tensor_fails_like_decode_image():
    data = jpeg_variants((200, 150))["baseline"]
    with pytest.raises(ImageDecodeError, match="frame 3"):
        decode_image_tensor(data[: len(data) // 2], name="frame 3")
    with pytest.raises(ImageDecodeError):
        decode_image_tensor(b"definitely not an image")
    with pytest.raises(ImageTooLarge, match="over the limit"):
        decode_image_tensor(data, max_pixels=200 * 150 - 1)


def test_draft_decode_shrinks_large_jpegs_but_never_below_the_thumbnail_size():
    big = Image.open(ELEPHANT).convert("RGB").resize((1280, 960))
    exif = big.getexif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    data = encode(big, exif=exif.tobytes())
    full = decode_image(data)
    assert full.size == (960, 1280)
    small = decode_image(data, draft_long_side=320)
    assert small.size == (240, 320)  # 1/4 DCT scale, EXIF rotation still applied
    # Same picture: the draft decode matches a plain resize of the full decode closely.
    ref = np.asarray(full.resize(small.size, Image.BILINEAR), dtype=np.float32)
    assert np.abs(np.asarray(small, dtype=np.float32) - ref).mean() < 6
    assert decode_image(data, draft_long_side=700).size == (960, 1280)  # under 2x the target: full decode
    png = encode(big, "PNG")
    assert decode_image(png, draft_long_side=320).size == (1280, 960)  # only JPEG has DCT scaling
