"""The structured truth of a synthetic scene, and how one is sampled.

A scene is a background, a lighting draw and 2-8 objects. Each object has a shape, colour, size class and
texture; objects overlap a little (every object keeps at least ``1 - MAX_OCCLUSION`` of its pixels visible) and
objects of the same colour never touch, so each stays recognisable. Objects of one colour+shape either form a
*group* (2-4 of them, placed close together) or are unique in their image, so every object, group and relation
phrase names exactly one thing. Relations ("left of", ...) are computed from the final boxes.

Which pairs get a relation region is decided by the picture (``relation_choice="near"``, since 2026-11-27):
every pair of unique objects that a relation word describes and whose boxes are close (``NEAR_GAP``). The
generators before drew 1-3 of the describable pairs at random, so a detector could not tell a stated pair from one
left out, and the best any model could score on their data was detection mAP ~95 (``scripts/metric_ceiling.py``,
docs/default-model.md); ``relation_choice="random"`` keeps that behaviour.

Relation pairs are stated in *reading order* by default: the subject is the left object ("A left of B"), the
upper one ("A above B"), or for "next to" the one whose centre is further left. The first generator flipped a
coin for the subject, so one picture had two equally right phrases ("A left of B", "B right of A") and a
captioner trained on them learnt a blurred first object and mixed the two objects' attributes (docs/data.md);
``relation_order="random"`` keeps that behaviour. The evaluation accepts a relation stated either way round.

All randomness comes from the ``numpy.random.Generator`` passed in: the same generator state gives the same
scene. Boxes are ``(x, y, w, h)`` in pixels, 0-indexed, continuous (see ``draw``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from densecap_core.data import draw, grammar
from densecap_core.data.draw import BackgroundSpec, Lighting, Sprite, TextureParams

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond", "pentagon", "cross")
COLOURS = tuple(draw.COLOUR_RGB)
SIZES = ("small", "medium", "large")
TEXTURES = ("solid", "striped", "dotted", "checkered")
RELATIONS = ("left of", "right of", "above", "below", "next to")
RELATION_ORDERS = ("reading", "random")
RELATION_CHOICES = ("near", "random")

#: Object extent (side of its square canvas) as a fraction of the image's shorter side, per size class.
SIZE_EXTENT = {"small": (0.13, 0.16), "medium": (0.19, 0.24), "large": (0.29, 0.36)}
#: At most this fraction of an object's pixels may be hidden by objects drawn over it.
MAX_OCCLUSION = 0.4
#: Pixels of clear space kept between two objects of the same colour (they would merge into one blob).
SAME_COLOUR_GAP = 3
#: Two objects closer than this fraction of the shorter side (box gap) may be "next to" each other.
NEXT_TO_GAP = 0.12
#: ``relation_choice="near"`` states a describable pair when the gap between the two boxes is at most this
#: fraction of the smaller object's longer side (1.10 relations an image on the 2026-11-26 sampler, as many as the
#: random choice stated; docs/data.md).
NEAR_GAP = 0.5


@dataclass
class SceneOptions:
    """Knobs of the scene sampler (defaults give >= 30% of images with relations, >= 20% with groups).

    The defaults were raised on 2026-11-26 (from group 0.32, relation 0.6, at most 2 relations; random order):
    relation and group regions were 12% and 5% of all regions, too few for a captioner to learn phrases that
    name two objects or count (docs/data.md)."""

    min_objects: int = 2
    max_objects: int = 8
    group_probability: float = 0.5
    relation_probability: float = 0.85
    max_relations: int = 3
    relation_order: str = "reading"   # "reading" (subject left/upper) or "random" (the first generator's coin)
    #: Which describable pairs become relation regions. "near": every pair of unique objects a relation word
    #: describes whose boxes are within NEAR_GAP of the smaller one's size (decided by the picture alone; the two
    #: knobs above do not apply). "random": the generators before 2026-11-27: with ``relation_probability``,
    #: 1..``max_relations`` pairs drawn at random, which no picture can tell apart from the pairs left out.
    relation_choice: str = "near"
    placement_tries: int = 40

    def __post_init__(self) -> None:
        for name in ("group_probability", "relation_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], not {getattr(self, name)}")
        if self.max_relations < 1:
            raise ValueError(f"max_relations must be at least 1, not {self.max_relations}")
        if self.relation_choice not in RELATION_CHOICES:
            raise ValueError(f"relation_choice must be one of {', '.join(RELATION_CHOICES)}, "
                             f"not {self.relation_choice!r}")
        if self.relation_order not in RELATION_ORDERS:
            raise ValueError(f"relation_order must be one of {', '.join(RELATION_ORDERS)}, "
                             f"not {self.relation_order!r}")


@dataclass
class SceneObject:
    """One object: its attributes, how it is drawn, and where (canvas top-left ``x0, y0``)."""

    shape: str
    colour: str
    size: str
    texture: str
    extent: int
    rotation_deg: float
    rgb: tuple[float, float, float]
    texture_params: TextureParams
    x0: int = 0
    y0: int = 0
    group: int | None = None
    occluded: float = 0.0  # fraction of its pixels hidden by objects drawn later (filled by placement)

    @cached_property
    def sprite(self) -> Sprite:
        return draw.make_sprite(self.shape, self.extent, self.rotation_deg, self.rgb, self.texture,
                                  self.texture_params)

    @cached_property
    def _tight(self) -> tuple[int, int, int, int]:
        return self.sprite.tight_box()

    @property
    def box(self) -> tuple[int, int, int, int]:
        """``(x, y, w, h)`` of the whole object (occluded parts included), in image pixels."""
        bx, by, bw, bh = self._tight
        return (self.x0 + bx, self.y0 + by, bw, bh)

    def attributes(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "texture": self.texture}


@dataclass
class Relation:
    subject: int  # object index
    relation: str
    object: int


@dataclass
class Scene:
    width: int
    height: int
    background: BackgroundSpec
    lighting: Lighting
    objects: list[SceneObject]  # in drawing order (later ones are on top)
    groups: list[list[int]] = field(default_factory=list)
    relations: list[Relation] = field(default_factory=list)
    noise_seed: int = 0


def union_box(boxes: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int]:
    x0 = min(b[0] for b in boxes)
    y0 = min(b[1] for b in boxes)
    x1 = max(b[0] + b[2] for b in boxes)
    y1 = max(b[1] + b[3] for b in boxes)
    return (x0, y0, x1 - x0, y1 - y0)


def _axis_gaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> tuple[float, float]:
    """Clear space between two ``x, y, w, h`` boxes horizontally and vertically (< 0: they overlap on that axis)."""
    return (max(b[0] - (a[0] + a[2]), a[0] - (b[0] + b[2])), max(b[1] - (a[1] + a[3]), a[1] - (b[1] + b[3])))


def box_gap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Clear space between two ``x, y, w, h`` boxes along the axis where they are furthest apart (< 0: overlap)."""
    return max(_axis_gaps(a, b))


def spatial_relation(a: tuple[int, int, int, int], b: tuple[int, int, int, int], short_side: int) -> str | None:
    """The relation word for "A <word> B", or None when no word describes the pair unambiguously.

    "left of"/"right of": the boxes are apart horizontally and the centres differ mostly horizontally
    (|dy| <= |dx| / 2); "above"/"below" likewise vertically (y grows downwards); "next to": the boxes are
    within ``NEXT_TO_GAP`` of the shorter side of each other but neither axis dominates.
    """
    ax0, ay0, aw, ah = a
    bx0, by0, bw, bh = b
    dx = (bx0 + bw / 2) - (ax0 + aw / 2)
    dy = (by0 + bh / 2) - (ay0 + ah / 2)
    gap_x, gap_y = _axis_gaps(a, b)
    if gap_x > 0 and abs(dy) <= 0.5 * abs(dx):
        return "left of" if dx > 0 else "right of"
    if gap_y > 0 and abs(dx) <= 0.5 * abs(dy):
        return "above" if dy > 0 else "below"
    if max(gap_x, gap_y) <= NEXT_TO_GAP * short_side and max(gap_x, gap_y) > 0:
        return "next to"
    return None


def _new_object(rng: np.random.Generator, shape: str, colour: str, short_side: int) -> SceneObject:
    size = SIZES[int(rng.integers(len(SIZES)))]
    texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    return _object_with(rng, shape, colour, size, texture, short_side)


def _object_with(rng: np.random.Generator, shape: str, colour: str, size: str, texture: str,
                 short_side: int) -> SceneObject:
    lo, hi = SIZE_EXTENT[size]
    extent = max(12, int(round(rng.uniform(lo, hi) * short_side)))
    base = np.asarray(draw.COLOUR_RGB[colour], np.float32)
    rgb = tuple(float(v) for v in np.clip(base + rng.uniform(-12, 12, 3), 0, 255))
    period = max(4.0, extent / rng.uniform(4.0, 6.0))
    params = TextureParams(period=float(period), angle_deg=float(rng.choice([0.0, 45.0, 90.0, 135.0])),
                           phase=float(rng.uniform(0, 1)))
    return SceneObject(shape=shape, colour=colour, size=size, texture=texture, extent=extent,
                       rotation_deg=float(rng.uniform(-15, 15)) if shape != "circle" else 0.0,
                       rgb=rgb, texture_params=params)


class _Placer:
    """Places objects one at a time, each on top of the previous ones, keeping the occlusion bound.

    ``owner`` holds, per pixel, the index of the top object covering it (-1 for background), so the pixels
    a new object would hide from each earlier object are counted exactly.
    """

    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self.owner = np.full((height, width), -1, np.int16)
        self.placed: list[SceneObject] = []
        self.area: list[int] = []
        self.visible: list[int] = []

    def try_place(self, obj: SceneObject, x0: int, y0: int) -> bool:
        e = obj.extent
        if x0 < 0 or y0 < 0 or x0 + e > self.width or y0 + e > self.height:
            return False
        obj.x0, obj.y0 = x0, y0
        bx, by, bw, bh = obj.box
        for other in self.placed:
            if other.colour == obj.colour:
                ox, oy, ow, oh = other.box
                g = SAME_COLOUR_GAP
                if bx < ox + ow + g and ox < bx + bw + g and by < oy + oh + g and oy < by + bh + g:
                    return False
        on = obj.sprite.mask >= 0.5
        under = self.owner[y0:y0 + e, x0:x0 + e][on]
        hidden = np.bincount(under[under >= 0], minlength=len(self.placed)) if under.size else []
        for j, n in enumerate(hidden):
            if n and (self.visible[j] - n) < (1.0 - MAX_OCCLUSION) * self.area[j]:
                return False
        for j, n in enumerate(hidden):
            self.visible[j] -= int(n)
        self.owner[y0:y0 + e, x0:x0 + e][on] = len(self.placed)
        self.placed.append(obj)
        self.area.append(int(on.sum()))
        self.visible.append(int(on.sum()))
        return True

    def occlusions(self) -> list[float]:
        return [1.0 - v / a for v, a in zip(self.visible, self.area)]


def _place(placer: _Placer, obj: SceneObject, rng: np.random.Generator, tries: int,
           near: list[SceneObject] | None = None) -> bool:
    """Try random positions (near an existing group member if ``near``), shrinking the object if crowded."""
    short = min(placer.width, placer.height)
    for size in SIZES[SIZES.index(obj.size)::-1]:
        if size != obj.size:
            shrunk = _object_with(rng, obj.shape, obj.colour, size, obj.texture, short)
            obj.size, obj.extent, obj.rgb = shrunk.size, shrunk.extent, shrunk.rgb
            obj.texture_params = shrunk.texture_params
            obj.__dict__.pop("sprite", None)
            obj.__dict__.pop("_tight", None)
        e = obj.extent
        for _ in range(tries):
            if near:
                anchor = near[int(rng.integers(len(near)))]
                reach = 1.0 * max(anchor.extent, e)
                x0 = int(round(anchor.x0 + rng.uniform(-reach, reach) + (anchor.extent - e) / 2))
                y0 = int(round(anchor.y0 + rng.uniform(-reach, reach) + (anchor.extent - e) / 2))
            else:
                x0 = int(rng.integers(0, placer.width - e + 1))
                y0 = int(rng.integers(0, placer.height - e + 1))
            if placer.try_place(obj, x0, y0):
                return True
    return False


def sample_background(rng: np.random.Generator) -> BackgroundSpec:
    kind = draw.BACKGROUND_KINDS[int(rng.integers(len(draw.BACKGROUND_KINDS)))]
    c0 = draw.muted_colour(rng)
    c1 = draw.muted_colour(rng)
    return BackgroundSpec(kind=kind, colours=(c0, c1), angle_deg=float(rng.uniform(0, 360)),
                          scale=float(rng.uniform(12, 40)), seed=int(rng.integers(2**31)))


def sample_lighting(rng: np.random.Generator) -> Lighting:
    return Lighting(brightness=float(rng.uniform(-22, 22)), contrast=float(rng.uniform(0.78, 1.15)),
                    ramp=float(rng.uniform(-0.3, 0.3)), ramp_angle_deg=float(rng.uniform(0, 360)),
                    noise_sigma=float(rng.choice([0.0, rng.uniform(1, 4), rng.uniform(4, 9)])))


def reading_order(i: int, j: int, word: str, box_i: tuple[int, int, int, int],
                  box_j: tuple[int, int, int, int]) -> tuple[int, str, int]:
    """"i word j" (boxes ``x, y, w, h``) restated with the subject first in reading order: left before right,
    top before bottom; for "next to", the box whose centre is further left (then higher) first."""
    if word in ("right of", "below"):
        return j, grammar.INVERSE_RELATION[word], i
    if word == "next to":
        centre_i = (box_i[0] + box_i[2] / 2, box_i[1] + box_i[3] / 2)
        centre_j = (box_j[0] + box_j[2] / 2, box_j[1] + box_j[3] / 2)
        if centre_j < centre_i:
            return j, word, i
    return i, word, j


def _pick_relations(objects: list[SceneObject], singletons: list[int], rng: np.random.Generator,
                    max_relations: int, short: int, order: str = "reading") -> list[Relation]:
    pairs = []
    for i in singletons:
        for j in singletons:
            if i < j:
                pairs.append((i, j))
    rng.shuffle(pairs)
    want = 1 + int(rng.integers(max_relations))
    out: list[Relation] = []
    for i, j in pairs:
        if rng.random() < 0.5:
            i, j = j, i
        box_i, box_j = objects[i].box, objects[j].box
        word = spatial_relation(box_i, box_j, short)
        if word is not None:
            if order == "reading":
                i, word, j = reading_order(i, j, word, box_i, box_j)
            out.append(Relation(subject=i, relation=word, object=j))
            if len(out) == want:
                break
    return out


def near_relations(boxes: list[tuple[int, int, int, int]], singletons: list[int], short: int,
                   order: str = "reading", rng: np.random.Generator | None = None,
                   max_gap: float | None = NEAR_GAP) -> list[Relation]:
    """Every pair of ``singletons`` (indices into ``boxes``) that a relation word describes and whose gap is at
    most ``max_gap`` of the smaller box's longer side (None: any gap, every describable pair), in index order.
    ``order="random"`` flips a coin from ``rng`` for the subject, as the first generator did."""
    if order == "random" and rng is None:
        raise ValueError("near_relations(order='random') needs rng for the subject's coin")
    out: list[Relation] = []
    for pos, i in enumerate(singletons):
        for j in singletons[pos + 1:]:
            box_i, box_j = boxes[i], boxes[j]
            word = spatial_relation(box_i, box_j, short)
            if word is None or (max_gap is not None
                                and box_gap(box_i, box_j) > max_gap * min(max(box_i[2:]), max(box_j[2:]))):
                continue
            if order == "reading":
                subject, word, obj = reading_order(i, j, word, box_i, box_j)
            elif rng.random() < 0.5:
                subject, word, obj = j, grammar.INVERSE_RELATION[word], i
            else:
                subject, obj = i, j
            out.append(Relation(subject=subject, relation=word, object=obj))
    return out


def sample_scene(rng: np.random.Generator, width: int, height: int,
                 options: SceneOptions | None = None) -> Scene:
    """Sample a scene of ``width`` x ``height`` pixels. See the module docstring for the guarantees."""
    opt = options or SceneOptions()
    short = min(width, height)
    background = sample_background(rng)
    lighting = sample_lighting(rng)
    n = int(rng.integers(opt.min_objects, opt.max_objects + 1))

    combos = [(s, c) for s in SHAPES for c in COLOURS]
    order = rng.permutation(len(combos))
    group_size = 0
    if n >= 2 and rng.random() < opt.group_probability:
        group_size = int(rng.integers(2, min(4, n) + 1))
    placer = _Placer(width, height)
    members: list[SceneObject] = []
    if group_size:
        shape, colour = combos[order[0]]
        for _ in range(group_size):
            obj = _new_object(rng, shape, colour, short)
            if _place(placer, obj, rng, opt.placement_tries, near=members or None):
                obj.group = 0
                members.append(obj)
    # A few spare combos cover objects that found no room; a crowded image simply gets fewer objects.
    first = 1 if group_size else 0
    for k in range(first, len(combos)):
        if len(placer.placed) >= n or (k >= first + n + 4 and len(placer.placed) >= opt.min_objects):
            break
        shape, colour = combos[order[k]]
        _place(placer, _new_object(rng, shape, colour, short), rng, opt.placement_tries)

    # Draw order is placement order; shuffling it would break the occlusion accounting.
    objects = placer.placed
    for obj, occ in zip(objects, placer.occlusions()):
        obj.occluded = occ
    groups: list[list[int]] = []
    group_idx = [i for i, o in enumerate(objects) if o.group is not None]
    if len(group_idx) >= 2:
        groups.append(group_idx)
    else:
        for i in group_idx:  # a lone survivor of a group is an ordinary (unique) object
            objects[i].group = None
    singletons = [i for i, o in enumerate(objects) if o.group is None]
    relations: list[Relation] = []
    if opt.relation_choice == "near":
        relations = near_relations([o.box for o in objects], singletons, short, opt.relation_order, rng)
    elif len(singletons) >= 2 and rng.random() < opt.relation_probability:
        relations = _pick_relations(objects, singletons, rng, opt.max_relations, short, opt.relation_order)
    return Scene(width=width, height=height, background=background, lighting=lighting, objects=objects,
                 groups=groups, relations=relations, noise_seed=int(rng.integers(2**31)))


def occlusion_fractions(scene: Scene, positions: list[tuple[int, int]]) -> list[float]:
    """Fraction of each object's pixels hidden by objects drawn after it, with canvases at ``positions``
    (used for video frames, where drifting objects can cover each other more than placement allows)."""
    owner = np.full((scene.height, scene.width), -1, np.int16)
    areas = []
    for k, (obj, (x0, y0)) in enumerate(zip(scene.objects, positions)):
        on = obj.sprite.mask >= 0.5
        areas.append(int(on.sum()))
        e = obj.extent
        cx0, cy0 = max(x0, 0), max(y0, 0)
        cx1, cy1 = min(x0 + e, scene.width), min(y0 + e, scene.height)
        if cx0 < cx1 and cy0 < cy1:
            part = on[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
            owner[cy0:cy1, cx0:cx1][part] = k
    visible = np.bincount(owner[owner >= 0].ravel(), minlength=len(areas))
    return [1.0 - v / a for v, a in zip(visible.tolist(), areas)]


def render_scene(scene: Scene, positions: list[tuple[int, int]] | None = None,
                 background: np.ndarray | None = None, noise_seed: int | None = None) -> np.ndarray:
    """Draw ``scene`` (H x W x 3 uint8). For video frames: ``positions`` overrides each object's canvas
    top-left, ``background`` reuses an already rendered background (not modified), ``noise_seed`` draws
    fresh pixel noise."""
    canvas = (draw.render_background(scene.background, scene.width, scene.height)
              if background is None else background.copy())
    for k, obj in enumerate(scene.objects):
        x0, y0 = positions[k] if positions is not None else (obj.x0, obj.y0)
        draw.paste_sprite(canvas, obj.sprite, x0, y0)
    return draw.apply_lighting(canvas, scene.lighting, np.random.default_rng(
        scene.noise_seed if noise_seed is None else noise_seed))
