"""The recognition head: RoI features -> a region code, plus objectness and final box regression.

``fc6``/``fc7`` are the original's VGG layers (25088 -> 4096 -> 4096, ReLU, dropout 0.5) in the ``vgg16``
config; light configs use narrower layers. Objectness is ``Linear(D, 1)`` initialised N(0, 0.01) and trained
with a binary logistic loss; the final box regression is ``Linear(D, 4)``, zero-initialised, applied on top of
the RPN box (the RPN box is the "anchor" of this second regression).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig


#: Numbers describing a box's geometry (``box_geometry``): see :func:`box_geometry`.
GEOMETRY_DIM = 6


def box_geometry(boxes: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    """R x 4 x1y1x2y2 boxes of an image of size ``image_hw`` -> R x 6: centre x and y, width and height as
    fractions of the image, and log width and log height relative to the image's shorter side (the scale the
    synthetic world's size classes are defined in; independent of the resize to the model's input size)."""
    h, w = float(image_hw[0]), float(image_hw[1])
    bw = (boxes[:, 2] - boxes[:, 0]).clamp(min=1.0)
    bh = (boxes[:, 3] - boxes[:, 1]).clamp(min=1.0)
    short = min(h, w)
    return torch.stack(((boxes[:, 0] + boxes[:, 2]) / (2 * w), (boxes[:, 1] + boxes[:, 3]) / (2 * h), bw / w, bh / h,
                        torch.log(bw / short), torch.log(bh / short)), 1)


class RecognitionHead(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        in_dim = config.feature_channels * config.roi_size * config.roi_size
        self.fc6 = nn.Linear(in_dim, config.fc_dim)
        # Added to fc6's output (before its ReLU), so fc6 itself keeps the original's shape and weights layout.
        self.geometry = nn.Linear(GEOMETRY_DIM, config.fc_dim) if config.box_geometry else None
        self.fc7 = nn.Linear(config.fc_dim, config.fc_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.objectness = nn.Linear(config.fc_dim, 1)
        self.box_reg = nn.Linear(config.fc_dim, 4)
        nn.init.normal_(self.objectness.weight, std=0.01)
        nn.init.zeros_(self.objectness.bias)
        nn.init.zeros_(self.box_reg.weight)
        nn.init.zeros_(self.box_reg.bias)

    def codes(self, roi_features: torch.Tensor, geometry: torch.Tensor | None = None) -> torch.Tensor:
        """R x C x 7 x 7 (flattened C-major, Caffe pool5 order) -> R x D; ``geometry``: R x 6, only with
        ``box_geometry`` (then required)."""
        x = self.fc6(roi_features.flatten(1))
        if self.geometry is not None:
            if geometry is None:
                raise ValueError("this model's config has box_geometry: pass the boxes' geometry")
            x = x + self.geometry(geometry.to(x.dtype))
        x = self.dropout(torch.relu(x))
        return self.dropout(torch.relu(self.fc7(x)))

    def forward(self, roi_features: torch.Tensor, geometry: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (codes R x D, objectness logits R, box deltas R x 4)."""
        codes = self.codes(roi_features, geometry)
        return codes, self.objectness(codes).squeeze(1), self.box_reg(codes)
