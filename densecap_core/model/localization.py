"""The localization layer: anchors, the RPN head, the training box sampler, RPN losses and test-time proposals.

Layouts follow the original so converted Torch7 weights drop in: the box conv's channel ``a*4 + c`` is anchor
``a``'s delta ``c`` in (tx, ty, tw, th) order; the score conv's channel ``a*2 + s`` is anchor ``a``'s score with
``s = 0`` object and ``s = 1`` background; flattened anchors are ordered anchor-major, then row, then column.

Quirks decided (see docs/model.md):
- anchor centres sit at ``stride * (j + 0.5)`` in our 0-indexed continuous frame, which is the original's
  1-indexed 8.5 + 16 j;
- the sampler's IoU uses the same box areas as NMS and the evaluator (no +1 term; the original mixed both);
- test-time proposals are clipped to the image, degenerate ones dropped, the top ``pre_nms_top_k`` by object
  probability kept *before* NMS (the original ran NMS over all anchors: 0.6 s on CPU), then NMS at
  ``rpn_nms_thresh`` on the softmax object probability, keeping ``num_proposals``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou, nms

from ..config import ModelConfig
from .box_ops import apply_box_deltas, box_deltas, clip_boxes, inside_image


def make_anchors(config: ModelConfig, height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """All anchors of an ``height x width`` feature map as (k*H*W, 4) xyxy, anchor-major then row then column."""
    s = config.stride
    ys = (torch.arange(height, device=device, dtype=dtype) + 0.5) * s
    xs = (torch.arange(width, device=device, dtype=dtype) + 0.5) * s
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")  # H x W
    wh = torch.tensor(config.anchors, device=device, dtype=dtype)  # k x 2
    cx = cx[None].expand(len(wh), -1, -1)
    cy = cy[None].expand(len(wh), -1, -1)
    w = wh[:, 0, None, None].expand_as(cx)
    h = wh[:, 1, None, None].expand_as(cy)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), -1).reshape(-1, 4)


class RPNHead(nn.Module):
    """3x3 conv + ReLU, then 1x1 convs to 4k box deltas (zero-initialised) and 2k scores (N(0, 0.01))."""

    def __init__(self, in_channels: int, hidden: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.box = nn.Conv2d(hidden, 4 * num_anchors, 1)
        self.score = nn.Conv2d(hidden, 2 * num_anchors, 1)
        self.k = num_anchors
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.zeros_(self.conv.bias)
        nn.init.zeros_(self.box.weight)  # initial proposals are exactly the anchors
        nn.init.zeros_(self.box.bias)
        nn.init.normal_(self.score.weight, std=0.01)
        nn.init.zeros_(self.score.bias)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features B x C x H x W -> (deltas B x kHW x 4, scores B x kHW x 2)."""
        x = torch.relu(self.conv(features))
        b, _, h, w = x.shape
        deltas = self.box(x).view(b, self.k, 4, h, w).permute(0, 1, 3, 4, 2).reshape(b, -1, 4)
        scores = self.score(x).view(b, self.k, 2, h, w).permute(0, 1, 3, 4, 2).reshape(b, -1, 2)
        return deltas, scores


def sample_boxes(boxes: torch.Tensor, gt_boxes: torch.Tensor, image_size: tuple[int, int],
                 config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The original ``BoxSampler``: returns (positive indices, matched GT index per positive, negative indices).

    Positive: max IoU > high threshold, or the best box of some GT box (forced, even out of bounds). Negative:
    max IoU < low threshold. Boxes crossing the image edge are ignored. At most ``sampler_max_positive``
    positives, sampled without replacement; negatives fill the batch, with replacement only if too few.
    """
    n = boxes.shape[0]
    if gt_boxes.numel() == 0:
        pos = torch.zeros(n, dtype=torch.bool, device=boxes.device)
        neg = inside_image(boxes, *image_size) if config.remove_outbounds else ~pos
        matched = torch.zeros(n, dtype=torch.long, device=boxes.device)
    else:
        iou = box_iou(boxes, gt_boxes)  # n x G
        max_iou, matched = iou.max(1)
        pos = max_iou > config.sampler_high_thresh
        neg = max_iou < config.sampler_low_thresh
        if config.remove_outbounds:
            inb = inside_image(boxes, *image_size)
            pos &= inb
            neg &= inb
        best = iou.argmax(0)  # the best box for each GT box is positive, whatever its IoU
        pos[best] = True
        neg[best] = False
        matched[best] = torch.arange(gt_boxes.shape[0], device=boxes.device)
    if not neg.any():
        neg = ~pos
    pos_idx = pos.nonzero().squeeze(1)
    neg_idx = neg.nonzero().squeeze(1)
    num_pos = min(config.sampler_max_positive, pos_idx.numel())
    pos_idx = pos_idx[torch.randperm(pos_idx.numel(), device=boxes.device)[:num_pos]]
    num_neg = config.sampler_batch_size - num_pos
    if neg_idx.numel() >= num_neg:
        neg_idx = neg_idx[torch.randperm(neg_idx.numel(), device=boxes.device)[:num_neg]]
    elif neg_idx.numel() > 0:
        neg_idx = neg_idx[torch.randint(neg_idx.numel(), (num_neg,), device=boxes.device)]
    return pos_idx, matched[pos_idx], neg_idx


def rpn_losses(deltas: torch.Tensor, scores: torch.Tensor, anchors: torch.Tensor, pos_idx: torch.Tensor,
               matched_gt: torch.Tensor, neg_idx: torch.Tensor, config: ModelConfig) -> dict[str, torch.Tensor]:
    """RPN objectness (pos-mean + neg-mean cross-entropy), box regression (SmoothL1) and the delta decay."""
    zero = deltas.sum() * 0
    obj = zero
    if pos_idx.numel():
        obj = obj + F.cross_entropy(scores[pos_idx], torch.zeros_like(pos_idx))
    if neg_idx.numel():
        obj = obj + F.cross_entropy(scores[neg_idx], torch.ones_like(neg_idx))
    box = zero
    if pos_idx.numel():
        pred = deltas[pos_idx]
        target = box_deltas(anchors[pos_idx], matched_gt)
        # The original's "dirty hack": a positive whose target exceeds 10 is ignored (pred and target zeroed).
        bad = (target.abs() > 10).any(1, keepdim=True)
        box = F.smooth_l1_loss(pred.masked_fill(bad, 0), target.masked_fill(bad, 0).detach(), beta=1.0)
    decay = 0.5 * config.box_reg_decay * (deltas ** 2).sum()
    return {"mid_objectness": obj * config.mid_objectness_weight,
            "mid_box_reg": box * config.mid_box_reg_weight,
            "box_decay": decay}


@torch.no_grad()
def propose(boxes: torch.Tensor, scores: torch.Tensor, image_size: tuple[int, int], config: ModelConfig,
            num_proposals: int | None = None, nms_thresh: float | None = None) -> torch.Tensor:
    """Test-time proposals for one image: (M, 4) xyxy, sorted by object probability."""
    h, w = image_size
    boxes = clip_boxes(boxes, h, w)
    keep = ((boxes[:, 2] - boxes[:, 0]) > 1e-3) & ((boxes[:, 3] - boxes[:, 1]) > 1e-3)
    boxes = boxes[keep]
    prob = scores[keep].float().softmax(-1)[:, 0]
    if config.pre_nms_top_k is not None and prob.numel() > config.pre_nms_top_k:
        prob, top = prob.topk(config.pre_nms_top_k)
        boxes = boxes[top]
    kept = nms(boxes.float(), prob, config.rpn_nms_thresh if nms_thresh is None else nms_thresh)
    return boxes[kept[: (num_proposals or config.num_proposals)]]


class LocalizationLayer(nn.Module):
    """RPN + anchors; training sampling and losses; test-time proposals."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.head = RPNHead(config.feature_channels, config.rpn_channels, config.num_anchors)

    def forward(self, features: torch.Tensor):
        """Returns (anchors kHW x 4, deltas B x kHW x 4, scores B x kHW x 2, boxes B x kHW x 4)."""
        deltas, scores = self.head(features)
        anchors = make_anchors(self.config, features.shape[2], features.shape[3], features.device, deltas.dtype)
        boxes = apply_box_deltas(anchors[None].expand_as(deltas), deltas)
        return anchors, deltas, scores, boxes
