"""The dense-captioning mAP of DenseCap (Johnson et al., CVPR 2016), in plain numpy.

What it measures: a detection counts as a true positive at (IoU threshold ``o``, METEOR threshold ``m``) when it is
the first detection to claim its best-matching ground-truth region, overlaps that region by ``IoU >= o`` and its
caption scores ``METEOR > m`` against the region's captions. Average precision is read off the pooled, score-sorted
detections of all images; ``map`` averages the 5 x 6 APs with ``m >= 0`` and ``detmap`` the 5 APs with ``m = -1``
(localisation only). All results are fractions in [0, 1]; the original printed them x100 ("5.39 mAP" is 0.0539).

Per image (:meth:`DenseCapEvaluator.add_result`):

1. Ground-truth boxes that overlap by IoU >= 0.7 are merged (:func:`merge_ground_truth_boxes`): repeatedly the box
   with the most neighbours at >= 0.7 takes all of them; the group becomes its mean box with all its captions as
   references. ``npos`` grows by the number of merged regions.
2. Detections, best score first, each take their best-IoU merged region (:func:`match_detections`). The first
   detection to take a region is eligible (``ok``); later ones are not, whatever their IoU.

Deliberate decisions (see docs/evaluation.md for the reasoning):

- Boxes are ``x1, y1, x2, y2`` floats. By default sizes are ``x2 - x1`` (continuous coordinates, like torchvision and
  our model); the original used inclusive pixels (``x2 - x1 + 1``). ``lua_compat=True`` selects the original's.
- Kept: a region is consumed by the first detection whose best match it is, even when that IoU is below every
  threshold. The matching is done once, independent of thresholds; this is what published DenseCap numbers mean.
- Fixed: in the original a detection that overlaps nothing marks ``used[-1]`` (Lua negative indexing: the LAST
  merged region) as taken, so a later, correct detection of that region became a false positive. Here such a
  detection consumes nothing. ``lua_compat=True`` reproduces the original.
- Fixed: AP uses exactly 101 recall points ``i/100`` compared in integer arithmetic; the original's float loop
  ``for t=0,1,0.01`` accumulates drift and runs 100 times (0 ... 0.99, each a hair high). ``lua_compat`` keeps it.
- Only detections that could ever be true positives (``ok`` and IoU >= 0.3) are sent to METEOR; the others cannot
  change any AP, so their METEOR is left as NaN. This is an exact shortcut, not an approximation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

MERGE_IOU = 0.7
IOU_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
METEOR_THRESHOLDS = (-1.0, 0.0, 0.05, 0.1, 0.15, 0.2, 0.25)  # -1 means "any caption": pure detection AP
RECALL_POINTS = 101


class CaptionScorer(Protocol):
    """What the metric needs from METEOR: ``score([(hypothesis, [references...]), ...]) -> [float, ...]``."""

    def score(self, pairs: Sequence[tuple[str, Sequence[str]]]) -> list[float]: ...


def _as_boxes(boxes, name: str) -> np.ndarray:
    array = np.asarray(boxes, dtype=np.float64)
    if array.size == 0:
        return np.zeros((0, 4), dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"{name} must be an N x 4 array of x1, y1, x2, y2 boxes, got shape {array.shape}")
    return array


def box_iou(boxes_a: np.ndarray, boxes_b: np.ndarray, *, pixel_offset: float = 0.0) -> np.ndarray:
    """Pairwise IoU (N x M) of x1y1x2y2 boxes; 0 where boxes do not overlap.

    ``pixel_offset=0`` treats coordinates as continuous (width ``x2 - x1``); ``1`` as inclusive pixel indices
    (width ``x2 - x1 + 1``), the original DenseCap convention. Boxes with no overlap, or a zero union, give 0.
    """
    a = _as_boxes(boxes_a, "boxes_a")[:, None, :]
    b = _as_boxes(boxes_b, "boxes_b")[None, :, :]
    inter_w = np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + pixel_offset
    inter_h = np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + pixel_offset
    overlaps = (inter_w > 0) & (inter_h > 0)
    inter = np.where(overlaps, inter_w * inter_h, 0.0)
    area_a = (a[..., 2] - a[..., 0] + pixel_offset) * (a[..., 3] - a[..., 1] + pixel_offset)
    area_b = (b[..., 2] - b[..., 0] + pixel_offset) * (b[..., 3] - b[..., 1] + pixel_offset)
    union = area_a + area_b - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(overlaps & (union > 0), inter / np.where(union > 0, union, 1.0), 0.0)
    return iou


def merge_ground_truth_boxes(boxes, captions: Sequence[str], *, threshold: float = MERGE_IOU,
                             pixel_offset: float = 0.0) -> tuple[np.ndarray, list[list[str]]]:
    """Merge ground-truth boxes that overlap by IoU >= ``threshold`` into regions with several references.

    Greedy, most-neighbours first: the box with the most boxes at IoU >= threshold (itself included; ties go to the
    lowest index) forms a group with all of them; the group is removed and the step repeats until every box is in a
    group. Returns ``(G x 4 mean boxes, G caption lists)`` in the order the groups were formed, each caption list in
    the boxes' input order. Every box belongs to exactly one group, so captions are never lost.
    """
    boxes = _as_boxes(boxes, "gt_boxes")
    if len(boxes) != len(captions):
        raise ValueError(f"{len(boxes)} ground-truth boxes but {len(captions)} captions")
    ious = box_iou(boxes, boxes, pixel_offset=pixel_offset)
    np.fill_diagonal(ious, 1.0)  # a box always counts as its own neighbour, even a degenerate one
    neighbours = ious >= threshold
    merged_boxes, merged_captions = [], []
    while True:
        counts = neighbours.sum(axis=1)
        seed = int(np.argmax(counts)) if len(counts) else 0
        if not len(counts) or counts[seed] == 0:
            break
        group = np.flatnonzero(neighbours[seed])
        neighbours[group, :] = False
        neighbours[:, group] = False
        merged_boxes.append(boxes[group].mean(axis=0))
        merged_captions.append([captions[i] for i in group])
    return np.asarray(merged_boxes, dtype=np.float64).reshape(-1, 4), merged_captions


@dataclass
class ImageMatches:
    """One image's detections in descending score order, each with its best merged ground-truth region.

    ``gt_index[k]`` is -1 when detection k overlaps no region (then ``overlap[k]`` is 0 and it has no references).
    """

    scores: np.ndarray
    ok: np.ndarray  # bool: first detection to claim its region (eligible to be a true positive)
    overlap: np.ndarray  # IoU with its best region
    gt_index: np.ndarray
    candidates: list[str]
    references: list[list[str]]


def match_detections(scores, boxes, captions: Sequence[str], merged_boxes: np.ndarray,
                     merged_captions: list[list[str]], *, pixel_offset: float = 0.0,
                     lua_compat: bool = False) -> ImageMatches:
    """Greedy first-come matching of one image's detections to its merged ground truth.

    Detections are visited by descending score (ties: input order). Each takes the region with the highest IoU > 0
    (ties: the first region). It is ``ok`` if that region was still free, and the region is then taken whatever the
    IoU was (kept from the original). A detection overlapping nothing takes nothing, unless ``lua_compat`` where,
    like the original's ``used[-1]``, it takes the last region if that one is free.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    boxes = _as_boxes(boxes, "boxes")
    if not (len(scores) == len(boxes) == len(captions)):
        raise ValueError(f"{len(scores)} scores, {len(boxes)} boxes and {len(captions)} captions must match")
    order = np.argsort(-scores, kind="stable")
    ious = box_iou(boxes[order], merged_boxes, pixel_offset=pixel_offset)
    num_gt = len(merged_boxes)
    if num_gt:
        best = np.argmax(ious, axis=1)
        overlap = ious[np.arange(len(order)), best]
        gt_index = np.where(overlap > 0, best, -1)
    else:
        overlap = np.zeros(len(order))
        gt_index = np.full(len(order), -1)
    used = np.zeros(num_gt, dtype=bool)
    ok = np.zeros(len(order), dtype=bool)
    for k, j in enumerate(gt_index):
        if j < 0:
            if not (lua_compat and num_gt):
                continue
            j = num_gt - 1  # Lua's used[-1]: the last region
        if not used[j]:
            used[j] = True
            ok[k] = True
    return ImageMatches(
        scores=scores[order], ok=ok, overlap=overlap, gt_index=gt_index,
        candidates=[str(captions[i]) for i in order],
        references=[list(merged_captions[j]) if j >= 0 else [] for j in gt_index],
    )


def lua_recall_thresholds() -> list[float]:
    """The original's ``for t=0,1,0.01`` values: accumulated floats, 100 of them (the last is 0.99000000000000066)."""
    thresholds, t = [], 0.0
    while t <= 1.0:
        thresholds.append(t)
        t += 0.01
    return thresholds


def average_precision(true_positive: np.ndarray, npos: int, *, lua_compat: bool = False) -> float:
    """Interpolated AP of a ranked list: mean over recall levels t of max{precision at recall >= t} (0 if none).

    ``true_positive`` is the score-sorted list of TP (True) / FP (False) flags, ``npos`` the number of ground-truth
    regions. Recall levels are exactly t = i/100 for i = 0..100, compared as ``100 * tp >= i * npos`` in integers so
    no level is lost to rounding; ``lua_compat`` uses the original's 100 drifting float levels instead.
    Returns 0.0 when there are no detections or no ground truth.
    """
    flags = np.asarray(true_positive, dtype=bool).reshape(-1)
    if npos <= 0 or flags.size == 0:
        return 0.0
    tp = np.cumsum(flags, dtype=np.int64)
    precision = tp / np.arange(1, flags.size + 1)
    best_from = np.maximum.accumulate(precision[::-1])[::-1]  # best precision at this rank or any later one
    padded = np.append(best_from, 0.0)  # index len(flags): the recall level is never reached
    if lua_compat:
        recall = tp / npos
        first = np.searchsorted(recall, lua_recall_thresholds(), side="left")
    else:
        first = np.searchsorted(100 * tp, np.arange(RECALL_POINTS, dtype=np.int64) * npos, side="left")
    return float(padded[first].mean())


def threshold_key(value: float) -> str:
    """How the original spells a threshold in result keys: 0.3 -> '0.3', 0 -> '0', 0.05 -> '0.05'."""
    return f"{value:g}"


class DenseCapEvaluator:
    """Accumulates per-image results, then computes the DenseCap mAP.

    ``lua_compat=True`` reproduces the original Lua evaluator bit for bit where it differs from ours: inclusive-pixel
    IoU (+1), the ``used[-1]`` marking, and the drifting 100-point recall grid. Default: continuous coordinates and
    the two fixes. See the module docstring.
    """

    def __init__(self, *, lua_compat: bool = False, merge_threshold: float = MERGE_IOU):
        self.lua_compat = lua_compat
        self.pixel_offset = 1.0 if lua_compat else 0.0
        self.merge_threshold = merge_threshold
        self.images: list[ImageMatches] = []
        self.npos = 0

    def add_result(self, scores, boxes, captions: Sequence[str], gt_boxes, gt_captions: Sequence[str]) -> None:
        """Add one image: K detections (scores, K x 4 x1y1x2y2 boxes, captions) and N ground-truth boxes/captions.

        Boxes of detections and ground truth must be in the same pixel frame. Any K or N may be 0.
        """
        merged_boxes, merged_captions = merge_ground_truth_boxes(
            gt_boxes, list(gt_captions), threshold=self.merge_threshold, pixel_offset=self.pixel_offset)
        self.images.append(match_detections(scores, boxes, list(captions), merged_boxes, merged_captions,
                                            pixel_offset=self.pixel_offset, lua_compat=self.lua_compat))
        self.npos += len(merged_boxes)

    def _pooled(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[str, list[str]]]]:
        if not self.images:
            return np.zeros(0), np.zeros(0, bool), np.zeros(0), []
        scores = np.concatenate([m.scores for m in self.images])
        ok = np.concatenate([m.ok for m in self.images])
        overlap = np.concatenate([m.overlap for m in self.images])
        pairs = [pair for m in self.images for pair in zip(m.candidates, m.references)]
        return scores, ok, overlap, pairs

    def evaluate(self, meteor_scorer: CaptionScorer) -> dict:
        """METEOR-score the candidates that can matter, then compute every AP.

        Returns ``{"map", "detmap", "ap_breakdown": {"ov0.5_score0.1": ...}, "det_breakdown": {"ov0.5": ...},
        "npos", "ndet", "num_images", "meteor_pairs"}`` with APs as fractions in [0, 1].
        """
        scores, ok, overlap, pairs = self._pooled()
        could_count = ok & (overlap >= min(IOU_THRESHOLDS))
        meteor = np.full(len(pairs), np.nan)
        index = np.flatnonzero(could_count)
        if len(index):
            meteor[index] = meteor_scorer.score([pairs[i] for i in index])
        order = np.argsort(-scores, kind="stable")  # pooled over images; ties keep image order
        ok, overlap, meteor = ok[order], overlap[order], meteor[order]

        ap_breakdown, det_breakdown = {}, {}
        for iou_threshold in IOU_THRESHOLDS:
            located = ok & (overlap >= iou_threshold)
            for meteor_threshold in METEOR_THRESHOLDS:
                ap = average_precision(located & (meteor > meteor_threshold), self.npos, lua_compat=self.lua_compat)
                if meteor_threshold < 0:
                    det_breakdown[f"ov{threshold_key(iou_threshold)}"] = ap
                else:
                    ap_breakdown[f"ov{threshold_key(iou_threshold)}_score{threshold_key(meteor_threshold)}"] = ap
        return {
            "map": float(np.mean(list(ap_breakdown.values()))),
            "detmap": float(np.mean(list(det_breakdown.values()))),
            "ap_breakdown": ap_breakdown,
            "det_breakdown": det_breakdown,
            "npos": int(self.npos),
            "ndet": int(len(scores)),
            "num_images": len(self.images),
            "meteor_pairs": int(len(index)),
        }


def format_results(results: dict) -> str:
    """Human-readable summary, x100 like the original's printout."""
    lines = [f"mAP: {100 * results['map']:.2f}   detection mAP: {100 * results['detmap']:.2f}   "
             f"({results['num_images']} images, {results['npos']} ground-truth regions, {results['ndet']} detections)"]
    for key, value in results["det_breakdown"].items():
        row = {k: v for k, v in results["ap_breakdown"].items() if k.startswith(key + "_")}
        cells = "  ".join(f"{k.split('_score')[1]}:{100 * v:6.2f}" for k, v in row.items())
        lines.append(f"  IoU {key[2:]:<4} det {100 * value:6.2f}  METEOR> {cells}")
    return "\n".join(lines)
