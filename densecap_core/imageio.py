"""The one image decoder, with its size checks, used everywhere (CLI, stream worker, job worker, gateway).

Torch-free. ``decode_image`` accepts a path, bytes or a PIL image of any mode and returns an RGB PIL
image, upright according to its EXIF orientation. The pixel limit is checked from the header, *before*
the pixels are decoded, so a decompression bomb costs nothing.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Union

from PIL import Image, ImageOps, UnidentifiedImageError

ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image]

#: Default pixel cap for a single image (40 megapixels). Streams use a smaller cap (settings).
DEFAULT_MAX_PIXELS = 40_000_000


class ImageError(ValueError):
    """An input could not be used as an image. The message says what to do about it."""


class ImageTooLarge(ImageError):
    """The image's header declares more pixels than allowed."""


class ImageDecodeError(ImageError):
    """The bytes are not a readable image (truncated, corrupt, or another file type)."""


def peek_size(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    """Return ``(width, height)`` from an image header without decoding pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                return im.size
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"not a readable image ({exc.__class__.__name__}): send JPEG or PNG bytes") from exc


def _check_pixels(size: tuple[int, int], max_pixels: int, name: str) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageDecodeError(f"{name}: image has an empty size {w}x{h}")
    if max_pixels and w * h > max_pixels:
        raise ImageTooLarge(
            f"{name}: image is {w}x{h} = {w * h / 1e6:.1f} MP, over the limit of {max_pixels / 1e6:.1f} MP; "
            "resize it before sending")


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode (L, LA, P, RGBA, CMYK, I;16, I, F, 1, ...) to 8-bit RGB.

    Transparent pixels are composited over white (what a viewer shows); 16-bit and float images are
    scaled to their own range rather than clipped.
    """
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        im = im.convert("F")
        lo, hi = im.getextrema()
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        im = im.point(lambda v: (v - lo) * scale).convert("L")
        return im.convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        background = Image.new("RGB", im.size, (255, 255, 255))
        background.paste(im, mask=im.getchannel("A"))
        return background
    return im.convert("RGB")


def decode_image(source: ImageInput, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None,
                 exif_transpose: bool = True) -> Image.Image:
    """Decode ``source`` into an upright RGB image, refusing it before decoding if it is too large.

    ``exif_transpose=False`` keeps the stored pixel orientation: for datasets whose annotations were drawn
    on the stored pixels (Visual Genome preprocessing), not on the EXIF-rotated view.

    Raises ``ImageTooLarge`` or ``ImageDecodeError`` (both ``ImageError``, a ``ValueError``) with a message a
    user can act on; ``FileNotFoundError`` for a missing path.
    """
    if isinstance(source, Image.Image):
        _check_pixels(source.size, max_pixels, name or "image")
        return to_rgb(ImageOps.exif_transpose(source) if exif_transpose else source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        label = name or str(path)
        if not path.is_file():
            raise FileNotFoundError(f"{label}: no such file")
        data: bytes | bytearray | memoryview = path.read_bytes()
    else:
        label = name or "image"
        data = source
    try:
        with warnings.catch_warnings():
            # Our own pixel cap decides; Pillow's bomb guard would otherwise warn or raise first.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            _check_pixels(im.size, max_pixels, label)
            im.load()
            if exif_transpose:
                im = ImageOps.exif_transpose(im)
            return to_rgb(im)
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError,
            EOFError) as exc:
        raise ImageDecodeError(
            f"{label}: not a readable image ({exc}); send a complete JPEG, PNG, WebP, BMP or TIFF file") from exc
