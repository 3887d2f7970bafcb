"""Draw boxes and captions into an image (the original's ``vis_utils.densecap_draw``), with Pillow only.

Torch-free, so the gateway, the client and the CLI can all draw. ``draw_regions`` returns a new image and
never touches its input. Boxes are ``Region.box`` = ``[x, y, w, h]`` in pixels of the image being drawn on
(see ``densecap_core.schema``); a caller holding boxes in another frame scales them first.

Differences from the original, on purpose:

- the caption sits on a strip filled with the box colour, in black or white, whichever reads better on
  that colour, so it stays legible on any background (the original wrote coloured text straight onto
  the photo);
- the strip goes just above the box's top-left corner, or inside the box when there is no room above,
  and is shifted and truncated so it always lies inside the image;
- boxes are drawn best-last, so the highest-scoring box and its caption end up on top.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from densecap_core.schema import Region

RGB = tuple[int, int, int]

#: The original's ``WAD_COLORS`` palette (vis_utils.lua and view_results.html), in its order. Region ``i``
#: (0-based, by descending score) gets ``PALETTE[i % len(PALETTE)]``, so a colour means the same rank in
#: the drawn images, the viewer and the webcam client.
PALETTE: tuple[RGB, ...] = (
    (173, 35, 25),    # red
    (42, 75, 215),    # blue
    (87, 87, 87),     # dark grey
    (29, 105, 20),    # green
    (129, 74, 25),    # brown
    (129, 197, 122),  # light green
    (157, 175, 255),  # light blue
    (41, 208, 208),   # cyan
    (255, 146, 51),   # orange
    (255, 238, 51),   # yellow
    (233, 222, 187),  # tan
    (255, 205, 243),  # pink
    (0, 0, 0),        # black
)

#: Pixels of font height per unit of ``text_size``. The original's Torch ``image.drawText`` scaled an
#: 8-pixel bitmap font by ``size``, so ``text_size=2`` gave text about 16 px high; we keep that scale.
FONT_PX_PER_TEXT_SIZE = 8

# Tried in order: Pillow resolves a bare file name through the system font folders.
_FONT_CANDIDATES = (
    "DejaVuSans.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
)


def colour_for(rank: int, colours: Sequence[RGB] = PALETTE) -> RGB:
    """The colour of the region at ``rank`` (0 = best score)."""
    return tuple(colours[rank % len(colours)])  # type: ignore[return-value]


def text_colour_on(background: RGB) -> RGB:
    """Black or white, whichever contrasts more with ``background`` (WCAG relative luminance)."""
    def linear(c: int) -> float:
        c = c / 255.0
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(c) for c in background[:3])
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    # Contrast with black is (L + 0.05) / 0.05, with white 1.05 / (L + 0.05); they are equal at L ~ 0.179.
    return (0, 0, 0) if luminance > 0.179 else (255, 255, 255)


@functools.lru_cache(maxsize=32)
def load_font(pixel_size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans at ``pixel_size`` if installed, else Pillow's built-in font at that size."""
    pixel_size = max(6, int(pixel_size))
    for candidate in _FONT_CANDIDATES:
        try:
            return ImageFont.truetype(candidate, pixel_size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=pixel_size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def _clip_box(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int] | None:
    """``[x, y, w, h]`` (continuous) -> inclusive pixel corners clipped to the image, or None if nothing shows."""
    x, y, w, h = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        return None
    # A box [x, x + w) covers pixel columns floor(x) .. ceil(x + w) - 1.
    x0, y0 = max(0, math.floor(x)), max(0, math.floor(y))
    x1 = min(width - 1, math.ceil(x + w) - 1)
    y1 = min(height - 1, math.ceil(y + h) - 1)
    if x1 < x0 or y1 < y0:
        return None
    return x0, y0, x1, y1


def _line_height(font) -> int:
    """Height of one line of text, ascender to descender."""
    if hasattr(font, "getmetrics"):
        ascent, descent = font.getmetrics()
        return int(ascent + descent)
    _, top, _, bottom = font.getbbox("Ag")  # bitmap fallback font
    return int(bottom - top) + 2


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, max_width: int) -> str:
    """``text``, cut with an ellipsis so it is at most ``max_width`` pixels wide."""
    if draw.textlength(text, font=font) <= max_width:
        return text
    lo, hi = 0, len(text)
    while lo < hi:  # longest prefix that fits with the ellipsis
        mid = (lo + hi + 1) // 2
        if draw.textlength(text[:mid].rstrip() + "…", font=font) <= max_width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip() + "…" if lo else ""


def _draw_label(draw: ImageDraw.ImageDraw, corners: tuple[int, int, int, int], text: str, colour: RGB,
                font, image_size: tuple[int, int]) -> None:
    width, height = image_size
    line_h = _line_height(font)
    pad = max(1, line_h // 8)
    strip_h = line_h + 2 * pad
    text = _fit_text(draw, text, font, width - 2 * pad)
    if not text:
        return
    strip_w = int(draw.textlength(text, font=font)) + 2 * pad
    x0, y0, _, _ = corners
    top = y0 - strip_h if y0 - strip_h >= 0 else y0  # above the box if it fits, else inside it
    top = min(top, height - strip_h)
    left = min(x0, width - strip_w)
    left, top = max(0, left), max(0, top)
    draw.rectangle([left, top, left + strip_w - 1, top + strip_h - 1], fill=colour)
    draw.text((left + pad, top + pad), text, font=font, fill=text_colour_on(colour))


def draw_regions(image: Image.Image, regions: Sequence[Region], *, num_to_draw: int = 10, box_width: int = 2,
                 text_size: float = 2, colours: Sequence[RGB] = PALETTE, captions: bool = True) -> Image.Image:
    """Return a copy of ``image`` (as RGB) with the first ``num_to_draw`` regions drawn in.

    ``regions`` are in descending score order with boxes in ``image``'s pixels; region ``i`` is drawn in
    ``colours[i % len(colours)]`` as an outline ``box_width`` pixels thick lying inside the box's edges,
    clipped to the image. Boxes entirely outside the image, or with no area, are skipped. ``text_size``
    follows the original's scale (font height ~ ``8 * text_size`` px); ``captions=False`` draws boxes only.
    """
    out = image.convert("RGB") if image.mode != "RGB" else image.copy()
    shown = list(regions)[:max(0, int(num_to_draw))]
    if not shown:
        return out
    draw = ImageDraw.Draw(out)
    width, height = out.size
    line = max(1, int(box_width))
    placed: list[tuple[int, tuple[int, int, int, int], Region]] = []
    for rank, region in enumerate(shown):
        corners = _clip_box(region.box, width, height)
        if corners is not None:
            placed.append((rank, corners, region))
    # Worst first, so the best box, and then its caption, are painted last and stay visible.
    for rank, corners, _ in reversed(placed):
        draw.rectangle(corners, outline=colour_for(rank, colours), width=line)
    if captions:
        font = load_font(round(FONT_PX_PER_TEXT_SIZE * float(text_size)))
        for rank, corners, region in reversed(placed):
            if region.caption:
                _draw_label(draw, corners, region.caption, colour_for(rank, colours), font, (width, height))
    return out
