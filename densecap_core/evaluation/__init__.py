"""Evaluation: the DenseCap dense-captioning mAP (with METEOR 1.5) and caption exactness on synthetic scenes.

Torch-free: ``metric`` needs numpy only, ``meteor`` a Java runtime. See docs/evaluation.md.
"""

from densecap_core.evaluation.meteor import MeteorError, MeteorScorer
from densecap_core.evaluation.metric import (
    IOU_THRESHOLDS,
    METEOR_THRESHOLDS,
    DenseCapEvaluator,
    average_precision,
    box_iou,
    format_results,
    merge_ground_truth_boxes,
)

__all__ = [
    "IOU_THRESHOLDS", "METEOR_THRESHOLDS", "DenseCapEvaluator", "MeteorError", "MeteorScorer",
    "average_precision", "box_iou", "format_results", "merge_ground_truth_boxes",
]
