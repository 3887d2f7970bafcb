"""Test-time post-processing: final box regression, final NMS, scores, captions.

Quirks decided (see docs/model.md): the final NMS ranks by the raw objectness logit (as the original); the
score we report is ``sigmoid(logit)``, a probability in [0, 1] with the same order (the original reported raw
logits); final boxes are clipped to the image (the original's ``-clip_final_boxes`` flag was never read, so its
boxes could leave the image).
"""

from __future__ import annotations

import torch
from torchvision.ops import nms

from .box_ops import apply_box_deltas, clip_boxes


def final_detections(roi_boxes: torch.Tensor, logits: torch.Tensor, deltas: torch.Tensor,
                     image_size: tuple[int, int], nms_thresh: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (kept index into the RoIs, boxes K x 4 xyxy clipped, scores K), sorted by descending score."""
    boxes = clip_boxes(apply_box_deltas(roi_boxes, deltas), *image_size).float()
    logits = logits.float()
    if nms_thresh > 0:
        keep = nms(boxes, logits, nms_thresh)
    else:
        keep = logits.argsort(descending=True)
    return keep, boxes[keep], torch.sigmoid(logits[keep])
