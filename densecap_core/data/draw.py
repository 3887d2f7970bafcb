"""Drawing for synthetic scenes: shape masks, textures, backgrounds, lighting and noise. Numpy + Pillow.

Everything here is a pure function of its arguments (random draws happen in ``scene``; the few helpers that
take a ``numpy.random.Generator`` say so), so a scene renders to the same pixels every time.

Arrays are float32 in [0, 255], H x W x 3 (RGB) unless a docstring says otherwise. Pixel ``(row, col)``
covers the continuous square ``[col, col+1) x [row, row+1)``: box coordinates are 0-indexed and continuous,
the same frame as ``densecap_core.schema``.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

#: Base RGB of each object colour name. Saturated (or white/black) so they stand out from the muted
#: backgrounds; each object jitters its own copy slightly (``scene``).
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 25),
    "yellow": (240, 215, 35),
    "green": (45, 165, 60),
    "cyan": (35, 200, 215),
    "blue": (40, 80, 225),
    "purple": (135, 55, 190),
    "pink": (245, 125, 195),
    "white": (245, 245, 245),
    "black": (22, 22, 22),
}

BACKGROUND_KINDS = ("plain", "gradient", "noise", "tiles", "lines")

#: Supersampling factor for anti-aliased shape edges.
_SUPERSAMPLE = 4


def _regular_polygon(n: int, radius: float, start_deg: float) -> list[tuple[float, float]]:
    return [(radius * math.cos(math.radians(start_deg + 360.0 * k / n)),
             radius * math.sin(math.radians(start_deg + 360.0 * k / n))) for k in range(n)]


def shape_outline(shape: str) -> list[tuple[float, float]] | None:
    """Vertices of ``shape`` in a unit frame centred on 0 (y down, extent within [-1, 1]); None for a circle."""
    if shape == "circle":
        return None
    if shape == "square":
        return [(-0.86, -0.86), (0.86, -0.86), (0.86, 0.86), (-0.86, 0.86)]
    if shape == "triangle":
        # Equilateral, apex up, shifted down so its box is centred.
        return [(x, y + 0.25) for x, y in _regular_polygon(3, 1.0, -90.0)]
    if shape == "star":
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.42
            a = math.radians(-90.0 + 36.0 * k)
            pts.append((r * math.cos(a), r * math.sin(a) + 0.1))
        return pts
    if shape == "hexagon":
        return _regular_polygon(6, 1.0, 0.0)
    if shape == "diamond":
        # Taller than wide, so a slightly rotated square never looks like one.
        return [(0.0, -1.0), (0.68, 0.0), (0.0, 1.0), (-0.68, 0.0)]
    if shape == "pentagon":
        return [(x, y + 0.1) for x, y in _regular_polygon(5, 1.0, -90.0)]
    if shape == "cross":
        a, b = 0.3, 0.95
        return [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a),
                (-b, -a), (-a, -a)]
    raise ValueError(f"unknown shape {shape!r}")


def shape_mask(shape: str, extent: int, rotation_deg: float) -> np.ndarray:
    """Anti-aliased coverage mask (float32 in [0, 1], ``extent`` x ``extent``) of a shape filling its canvas."""
    big = extent * _SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    half = big / 2.0
    radius = half - _SUPERSAMPLE  # a one-pixel margin keeps anti-aliased edges inside the canvas
    outline = shape_outline(shape)
    if outline is None:
        draw.ellipse([half - radius, half - radius, half + radius, half + radius], fill=255)
    else:
        c, s = math.cos(math.radians(rotation_deg)), math.sin(math.radians(rotation_deg))
        pts = [(half + radius * (x * c - y * s), half + radius * (x * s + y * c)) for x, y in outline]
        draw.polygon(pts, fill=255)
    small = canvas.reduce(_SUPERSAMPLE)
    return np.asarray(small, dtype=np.float32) / 255.0


@dataclass(frozen=True)
class TextureParams:
    """How a texture is laid over an object: pattern period in pixels, angle (stripes), phase offset."""

    period: float
    angle_deg: float
    phase: float


def texture_pattern(texture: str, extent: int, params: TextureParams) -> np.ndarray:
    """Pattern weight (float32 in [0, 1], ``extent`` x ``extent``): 1 where the second colour shows."""
    yy, xx = np.mgrid[0:extent, 0:extent].astype(np.float32) + 0.5
    p = params.period
    if texture == "solid":
        return np.zeros((extent, extent), np.float32)
    if texture == "striped":
        a = math.radians(params.angle_deg)
        u = xx * math.cos(a) + yy * math.sin(a) + params.phase * p
        # A soft-edged square wave: one pixel ramps instead of jagged steps.
        tri = np.abs(((u / p) % 1.0) - 0.5) * p  # distance-like, 0..p/2
        return np.clip(tri - p / 4 + 0.5, 0.0, 1.0)
    if texture == "dotted":
        gx = ((xx / p + params.phase) % 1.0 - 0.5) * p
        gy = ((yy / p + params.phase * 0.7) % 1.0 - 0.5) * p
        d = np.sqrt(gx * gx + gy * gy)
        return np.clip(p * 0.28 - d + 0.5, 0.0, 1.0)
    if texture == "checkered":
        cx = np.floor(xx / p + params.phase).astype(np.int32)
        cy = np.floor(yy / p + params.phase).astype(np.int32)
        return ((cx + cy) % 2).astype(np.float32)
    raise ValueError(f"unknown texture {texture!r}")


def second_colour(rgb: tuple[float, float, float]) -> np.ndarray:
    """The pattern colour of a textured object: a darker shade, or a lighter one for dark colours."""
    base = np.asarray(rgb, np.float32)
    if max(rgb) > 110:
        return base * 0.42
    return base + (255.0 - base) * 0.4


@dataclass(frozen=True)
class Sprite:
    """A drawn object on its own square canvas: coverage mask (E x E) and colour (E x E x 3)."""

    mask: np.ndarray
    rgb: np.ndarray

    def tight_box(self) -> tuple[int, int, int, int]:
        """``(x, y, w, h)`` within the canvas of the pixels at least half covered."""
        on = self.mask >= 0.5
        rows = np.flatnonzero(on.any(axis=1))
        cols = np.flatnonzero(on.any(axis=0))
        return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


def make_sprite(shape: str, extent: int, rotation_deg: float, rgb: tuple[float, float, float],
                texture: str, texture_params: TextureParams) -> Sprite:
    mask = shape_mask(shape, extent, rotation_deg)
    weight = texture_pattern(texture, extent, texture_params)[..., None]
    base = np.asarray(rgb, np.float32)
    colour = base * (1.0 - weight) + second_colour(rgb) * weight
    return Sprite(mask=mask, rgb=colour.astype(np.float32))


def paste_sprite(canvas: np.ndarray, sprite: Sprite, x0: int, y0: int) -> None:
    """Alpha-composite ``sprite`` onto ``canvas`` (H x W x 3 float32) with its top-left at ``(x0, y0)``.

    Parts of the sprite outside the canvas are cut off (video frames may push objects to the border).
    """
    h, w = canvas.shape[:2]
    e = sprite.mask.shape[0]
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + e, w), min(y0 + e, h)
    if cx0 >= cx1 or cy0 >= cy1:
        return
    sx0, sy0 = cx0 - x0, cy0 - y0
    a = sprite.mask[sy0:sy0 + cy1 - cy0, sx0:sx0 + cx1 - cx0, None]
    col = sprite.rgb[sy0:sy0 + cy1 - cy0, sx0:sx0 + cx1 - cx0]
    region = canvas[cy0:cy1, cx0:cx1]
    region *= 1.0 - a
    region += col * a


def muted_colour(rng: np.random.Generator) -> tuple[float, float, float]:
    """A low-saturation mid-brightness colour for backgrounds (never confusable with an object colour)."""
    h = rng.uniform(0.0, 1.0)
    s = rng.uniform(0.0, 0.2)
    v = rng.uniform(0.35, 0.72)
    r, g, b = colorsys.hsv_to_rgb(h, s, v)
    return (r * 255.0, g * 255.0, b * 255.0)


@dataclass(frozen=True)
class BackgroundSpec:
    """A background: its kind and the draws that fix it (colours, angle, scale, seed for its own noise)."""

    kind: str
    colours: tuple[tuple[float, float, float], ...]
    angle_deg: float
    scale: float
    seed: int


def render_background(spec: BackgroundSpec, width: int, height: int) -> np.ndarray:
    """The background of ``spec`` as an H x W x 3 float32 array."""
    c0 = np.asarray(spec.colours[0], np.float32)
    c1 = np.asarray(spec.colours[1], np.float32)
    out = np.empty((height, width, 3), np.float32)
    out[:] = c0
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    if spec.kind == "plain":
        return out
    if spec.kind == "gradient":
        a = math.radians(spec.angle_deg)
        u = xx * math.cos(a) + yy * math.sin(a)
        u = (u - u.min()) / max(float(u.max() - u.min()), 1.0)
        return c0 * (1.0 - u[..., None]) + c1 * u[..., None]
    rng = np.random.default_rng(spec.seed)
    if spec.kind == "noise":
        # Smooth clouds: a coarse random grid upsampled bicubically, mixed between the two colours.
        gw, gh = max(2, int(width / spec.scale)), max(2, int(height / spec.scale))
        coarse = (rng.uniform(0, 255, (gh, gw))).astype(np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.float32) / 255.0
        return c0 * (1.0 - field[..., None]) + c1 * field[..., None]
    if spec.kind == "tiles":
        t = max(6.0, spec.scale)
        shift = (np.floor(yy / t) % 2) * (t / 2)  # brick offset on alternate rows
        cell = (np.floor((xx + shift) / t) + np.floor(yy / t)) % 2
        grout = ((xx + shift) % t < 1.2) | (yy % t < 1.2)
        out = c0 * (1.0 - cell[..., None]) + c1 * cell[..., None]
        out[grout] *= 0.85
        return out
    if spec.kind == "lines":
        # Thin distractor strokes in muted colours: clutter that is not an object.
        im = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(6, 16))):
            p0 = (float(rng.uniform(0, width)), float(rng.uniform(0, height)))
            p1 = (float(rng.uniform(0, width)), float(rng.uniform(0, height)))
            tone = c1 * rng.uniform(0.85, 1.15)
            draw.line([p0, p1], fill=tuple(int(v) for v in np.clip(tone, 0, 255)),
                      width=int(rng.integers(1, 4)))
        return np.asarray(im, np.float32)
    raise ValueError(f"unknown background kind {spec.kind!r}")


@dataclass(frozen=True)
class Lighting:
    """Global photometric variation: contrast about mid-grey, brightness shift, a directional light ramp
    (multiplicative, ``ramp`` is the relative change across the image) and Gaussian pixel noise."""

    brightness: float
    contrast: float
    ramp: float
    ramp_angle_deg: float
    noise_sigma: float


def apply_lighting(image: np.ndarray, light: Lighting, noise_rng: np.random.Generator) -> np.ndarray:
    """Apply ``light`` to an H x W x 3 float32 image and return it as uint8."""
    h, w = image.shape[:2]
    img = (image - 128.0) * light.contrast + 128.0 + light.brightness
    if light.ramp:
        a = math.radians(light.ramp_angle_deg)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        u = (xx - w / 2) * math.cos(a) + (yy - h / 2) * math.sin(a)
        u /= max(w, h)
        img *= (1.0 + light.ramp * u)[..., None]
    if light.noise_sigma > 0:
        img += noise_rng.normal(0.0, light.noise_sigma, img.shape).astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)
