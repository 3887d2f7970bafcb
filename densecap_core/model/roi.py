"""Bilinear RoI sampling: a ``size x size`` grid spanning each box edge to edge, sampled on the feature map.

This is the original's ``BilinearRoiPooling`` (an STN affine grid with align-corners semantics and zero
padding): sample points run from the box's left edge to its right edge *inclusive*, and a point outside the
map contributes 0. Gradients flow to the features and, unless boxes are detached, to the box coordinates.

Two mappings from image pixels to feature-map coordinates (``config.roi_mapping``):
- ``"original"``: the original treats image-normalised coordinates as feature-normalised coordinates
  (u = (2 xc - W - 1)/(W - 1) +- w/W, then feature pixel (u + 1)(S - 1)/2). Kept for converted weights.
- ``"exact"``: a point at image x lands on feature coordinate x / stride - 0.5 (feature cell centres).
- ``"original_ceil"``: ``"original"`` with S = ceil(size / stride): the map size of the released Torch7 VGG,
  whose loadcaffe pools run in Caffe's ceil mode (set by ``densecap convert-t7`` when the file says so).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _feature_points(boxes: torch.Tensor, image_hw: tuple[int, int], stride: int, size: int,
                    mapping: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample points (R x size each, x and y) in feature-pixel coordinates (0-indexed cell centres)."""
    t = torch.linspace(0, 1, size, device=boxes.device, dtype=boxes.dtype)
    x1, y1, x2, y2 = (boxes[:, i:i + 1] for i in range(4))
    if mapping == "exact":
        xs = x1 + (x2 - x1) * t
        ys = y1 + (y2 - y1) * t
        return xs / stride - 0.5, ys / stride - 0.5
    if mapping not in ("original", "original_ceil"):
        raise ValueError(f"unknown roi_mapping {mapping!r}")
    # The original's affine grid: centre (1-indexed) and extent in image-normalised units, applied on the
    # feature map of the unpadded image (S = floor(size / stride), as VGG's floor pooling gives; ceil-mode
    # pooling gives S = ceil(size / stride)).
    h_img, w_img = image_hw
    if mapping == "original_ceil":
        s_w, s_h = max(int(-(-w_img // stride)), 1), max(int(-(-h_img // stride)), 1)
    else:
        s_w, s_h = max(int(w_img // stride), 1), max(int(h_img // stride), 1)
    tt = 2 * t - 1
    xc, yc = (x1 + x2) / 2 + 0.5, (y1 + y2) / 2 + 0.5
    ux = (2 * xc - w_img - 1) / max(w_img - 1, 1) + (x2 - x1) / w_img * tt
    uy = (2 * yc - h_img - 1) / max(h_img - 1, 1) + (y2 - y1) / h_img * tt
    return (ux + 1) * (s_w - 1) / 2, (uy + 1) * (s_h - 1) / 2


def bilinear_roi_features(features: torch.Tensor, boxes: torch.Tensor, image_hw: tuple[int, int], stride: int,
                          size: int = 7, mapping: str = "exact") -> torch.Tensor:
    """Features of one image (1 x C x Hf x Wf) and its boxes (R x 4 xyxy, image pixels) -> R x C x size x size."""
    if boxes.numel() == 0:
        return features.new_zeros((0, features.shape[1], size, size))
    hf, wf = features.shape[-2:]
    fx, fy = _feature_points(boxes.to(features.dtype), image_hw, stride, size, mapping)
    gx = 2 * fx / max(wf - 1, 1) - 1  # align_corners=True normalisation
    gy = 2 * fy / max(hf - 1, 1) - 1
    r = boxes.shape[0]
    grid = torch.stack((gx[:, None, :].expand(r, size, size), gy[:, :, None].expand(r, size, size)), -1)
    out = F.grid_sample(features, grid.reshape(1, r * size, size, 2), mode="bilinear", padding_mode="zeros",
                        align_corners=True)  # 1 x C x (R*size) x size
    return out.view(features.shape[1], r, size, size).transpose(0, 1)
