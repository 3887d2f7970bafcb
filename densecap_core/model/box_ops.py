"""Box conversions and the R-CNN box parametrisation.

Convention (decided; the original mixed three): boxes are continuous pixel coordinates, 0-indexed, with the
top-left corner of pixel (0, 0) at (0, 0). ``xyxy`` = (x1, y1, x2, y2); ``cxcywh`` = (xc, yc, w, h) with
``w = x2 - x1`` (no +1 pixel term anywhere: IoU, NMS and the sampler all use the same areas). The original's
1-indexed ``x1 = xc - (w-1)/2`` boxes map to ours by ``x1_ours = x1_orig - 1`` and ``x2_ours = x2_orig``.
"""

from __future__ import annotations

import math

import torch

# exp() of a delta above this would overflow (or produce absurd boxes) in half precision: log(1000/16).
_MAX_LOG_SCALE = math.log(1000.0 / 16)


def xyxy_to_cxcywh(b: torch.Tensor) -> torch.Tensor:
    x1, y1, x2, y2 = b.unbind(-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), -1)


def cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    xc, yc, w, h = b.unbind(-1)
    return torch.stack((xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2), -1)


def xyxy_to_xywh(b: torch.Tensor) -> torch.Tensor:
    x1, y1, x2, y2 = b.unbind(-1)
    return torch.stack((x1, y1, x2 - x1, y2 - y1), -1)


def apply_box_deltas(boxes: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """R-CNN parametrisation (no normalising stds, as the original): x = xa + tx*wa, w = wa*exp(tw).

    ``boxes`` and the result are xyxy. Only the log-scale is clamped (to keep exp finite); the original did not.
    """
    a = xyxy_to_cxcywh(boxes)
    tx, ty, tw, th = deltas.unbind(-1)
    xc = a[..., 0] + tx * a[..., 2]
    yc = a[..., 1] + ty * a[..., 3]
    w = a[..., 2] * torch.exp(tw.clamp(max=_MAX_LOG_SCALE))
    h = a[..., 3] * torch.exp(th.clamp(max=_MAX_LOG_SCALE))
    return cxcywh_to_xyxy(torch.stack((xc, yc, w, h), -1))


def box_deltas(anchors: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The inverse of ``apply_box_deltas``: deltas that move ``anchors`` onto ``targets`` (both xyxy)."""
    a = xyxy_to_cxcywh(anchors)
    t = xyxy_to_cxcywh(targets)
    eps = 1e-6
    return torch.stack(((t[..., 0] - a[..., 0]) / a[..., 2].clamp(min=eps),
                        (t[..., 1] - a[..., 1]) / a[..., 3].clamp(min=eps),
                        torch.log(t[..., 2].clamp(min=eps) / a[..., 2].clamp(min=eps)),
                        torch.log(t[..., 3].clamp(min=eps) / a[..., 3].clamp(min=eps))), -1)


def clip_boxes(boxes: torch.Tensor, height: float, width: float) -> torch.Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack((x1.clamp(0, width), y1.clamp(0, height), x2.clamp(0, width), y2.clamp(0, height)), -1)


def inside_image(boxes: torch.Tensor, height: float, width: float) -> torch.Tensor:
    return (boxes[:, 0] >= 0) & (boxes[:, 1] >= 0) & (boxes[:, 2] <= width) & (boxes[:, 3] <= height)
