"""Caption exactness on synthetic scenes: does the model name each region exactly?

METEOR gives partial credit (a model answering one constant caption everywhere still scores mAP ~25 on our
synthetic data, see machine-facts.md), so beside mAP we check captions against the structured truth that the
synthetic generator writes to ``regions_meta.json`` (``densecap_core.data.synth``).

For each ground-truth region, the best-scoring detection with IoU >= 0.5 (continuous x1y1x2y2 boxes) is its
answer (what a viewer showing the top boxes would show); a region without one is *missed*. Regions overlap (an
object inside a relation's union box), so a high-scoring object box may answer for a relation region; ``pick="iou"``
takes the best-overlapping detection at IoU >= 0.5 instead, which asks "did the model describe this region with
a box of its own". The answer is judged with the generator's own grammar
(``densecap_core.data.grammar``, synonyms included, imported rather than copied):

- ``true``: ``grammar.caption_matches``: a phrase of the grammar of the right kind that names colour and shape
  (objects), count, colour and shape (groups), or the relation word and both objects' colour and shape
  (relations, either way round: "A left of B" == "B right of A"), and states nothing false (a size or texture
  named must be right).
- ``exact``: ``true``, and for an object with a visible texture (striped, dotted, checkered) the texture is
  named too. "Solid" objects need no texture word (the generator's own phrases rarely say "plain"); groups and
  relations have no further requirement (their phrases carry no texture reliably).

Fractions are over all regions of a kind (missed regions count as not exact); ``*_of_detected`` over the found ones.
``wrong_parts`` says where the errors are: of the regions answered with a phrase of their own kind, the share
getting each part wrong (``grammar.caption_errors``: an object's colour, shape, size or texture; a group's count,
colour, shape; a relation's word, subject or object). A shape confused at small sizes and a relation read the
wrong way need different remedies, and the exact/true figures alone cannot tell them apart.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from densecap_core.data import grammar
from densecap_core.evaluation.metric import box_iou

KINDS = ("object", "group", "relation")
MATCH_IOU = 0.5


def region_box_xyxy(region: dict, scale: float = 1.0) -> list[float]:
    """A ``regions_meta.json`` region's ``box`` ``[x, y, w, h]`` (original pixels) as x1y1x2y2, times ``scale``."""
    x, y, w, h = (float(v) for v in region["box"])
    return [scale * x, scale * y, scale * (x + w), scale * (y + h)]


def judge_caption(caption: str, region: dict) -> tuple[bool, bool]:
    """``(true, exact)`` for one caption against one region's truth (see the module docstring)."""
    if not grammar.caption_matches(caption, region):
        return False, False
    if region["kind"] != "object" or region.get("texture", "solid") == "solid":
        return True, True
    parsed = grammar.parse_caption(caption)
    return True, parsed is not None and parsed.subject.texture == region["texture"]


ANSWER_KINDS = (*KINDS, "other")  # what kind of phrase answered a region; "other": outside the grammar


@dataclass
class KindCounts:
    kind: str = ""  # the regions' kind ("" for the total over kinds)
    regions: int = 0
    detected: int = 0
    true: int = 0
    exact: int = 0
    answered: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ANSWER_KINDS, 0))
    wrong_parts: dict[str, int] = field(default_factory=dict)  # of the answers in kind, how many got each part wrong

    def summary(self) -> dict:
        def share(n: int, of: int) -> float:
            return n / of if of else 0.0

        return {"regions": self.regions, "detected": share(self.detected, self.regions),
                "true": share(self.true, self.regions), "exact": share(self.exact, self.regions),
                "exact_of_detected": share(self.exact, self.detected),
                "answered_as": {kind: share(n, self.detected) for kind, n in self.answered.items()},
                "wrong_parts": {part: share(n, self.in_kind) for part, n in sorted(self.wrong_parts.items())}}

    @property
    def in_kind(self) -> int:
        """Detected regions answered with a phrase of their own kind (``wrong_parts`` is over these)."""
        return self.answered.get(self.kind, 0)


@dataclass
class CaptionExactness:
    """Accumulates per-image judgements; :meth:`summary` gives fractions per region kind and overall."""

    match_iou: float = MATCH_IOU
    pick: str = "score"  # which detection at IoU >= match_iou answers: "score" (highest) or "iou" (best overlap)
    counts: dict[str, KindCounts] = field(default_factory=lambda: {k: KindCounts(kind=k) for k in KINDS})
    examples: list[dict] = field(default_factory=list)  # a few wrong answers, for the report
    max_examples: int = 20

    def __post_init__(self):
        if self.pick not in ("score", "iou"):
            raise ValueError(f"pick must be 'score' or 'iou', not {self.pick!r}")

    def add_image(self, regions: Sequence[dict], scores, boxes, captions: Sequence[str], *,
                  scale: float = 1.0) -> None:
        """One image: its truth ``regions`` (from regions_meta.json) and the model's detections.

        ``boxes`` are K x 4 x1y1x2y2 in the frame of the image the model saw; ``scale`` maps the regions'
        original-pixel boxes into that frame (e.g. 720 / max(original width, height) for an HDF5 image).
        """
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        if not (len(scores) == len(boxes) == len(captions)):
            raise ValueError(f"{len(scores)} scores, {len(boxes)} boxes and {len(captions)} captions must match")
        truth_boxes = np.asarray([region_box_xyxy(r, scale) for r in regions], dtype=np.float64).reshape(-1, 4)
        ious = box_iou(truth_boxes, boxes)
        for r, region in enumerate(regions):
            counts = self.counts.setdefault(region["kind"], KindCounts(kind=region["kind"]))
            counts.regions += 1
            candidates = np.flatnonzero(ious[r] >= self.match_iou)
            if not len(candidates):
                continue
            ranking = scores if self.pick == "score" else ious[r]
            best = candidates[np.argmax(ranking[candidates])]
            counts.detected += 1
            true, exact = judge_caption(captions[best], region)
            counts.true += true
            counts.exact += exact
            parsed = grammar.parse_caption(captions[best])
            counts.answered[parsed.kind if parsed is not None else "other"] += 1
            errors = grammar.caption_errors(parsed, region) if parsed is not None else None
            for part in errors or ():
                counts.wrong_parts[part] = counts.wrong_parts.get(part, 0) + 1
            if not exact and len(self.examples) < self.max_examples:
                self.examples.append({"kind": region["kind"], "truth": region.get("phrase", ""),
                                      "caption": captions[best], "iou": round(float(ious[r, best]), 3)})

    def summary(self) -> dict:
        """``{kind: {regions, detected, true, exact, exact_of_detected, answered_as}, "all": {...}}`` (fractions
        in [0, 1]; ``answered_as``: of the detected regions, the share answered by each kind of phrase, e.g. a
        group region answered with a relation phrase)."""
        out = {kind: c.summary() for kind, c in self.counts.items()}
        total = KindCounts()
        for c in self.counts.values():
            total.regions += c.regions
            total.detected += c.detected
            total.true += c.true
            total.exact += c.exact
            for kind, n in c.answered.items():
                total.answered[kind] += n
        out["all"] = total.summary()
        return out


def load_regions_meta(path) -> dict[int, dict]:
    """``regions_meta.json`` (``densecap synth``) as ``{image_id: {"width", "height", "regions": [...]}}``.

    ``width``/``height`` are the original image's, the frame of the regions' boxes; ``image_id`` is what
    ``DenseCapH5Dataset`` targets carry as ``"image_id"``.
    """
    with open(path) as f:
        meta = json.load(f)
    if not isinstance(meta, dict) or "images" not in meta:
        raise ValueError(f"{path} is not a synthetic regions_meta.json (no 'images'); it comes from `densecap synth`")
    return {int(image["image_id"]): {"width": image["width"], "height": image["height"],
                                     "regions": image["regions"]} for image in meta["images"]}


def format_exactness(summary: dict) -> str:
    rows = ["caption exactness (per region, its answer is a detection at IoU >= 0.5):"]
    for kind, s in summary.items():
        if s["regions"]:
            rows.append(f"  {kind:<9} {s['regions']:6d} regions  detected {100 * s['detected']:5.1f}%  "
                        f"exact {100 * s['exact']:5.1f}%  (true {100 * s['true']:5.1f}%, "
                        f"exact of detected {100 * s['exact_of_detected']:5.1f}%)")
            if kind != "all" and s["detected"]:
                shares = ", ".join(f"{k} {100 * v:.1f}%" for k, v in s["answered_as"].items() if v)
                rows.append(f"  {'':<9} {'':6}          answered with a phrase of kind: {shares}")
                if s.get("wrong_parts"):
                    parts = ", ".join(f"{k} {100 * v:.1f}%" for k, v in
                                      sorted(s["wrong_parts"].items(), key=lambda kv: -kv[1]))
                    rows.append(f"  {'':<9} {'':6}          of those answered in kind, wrong: {parts}")
    return "\n".join(rows)
