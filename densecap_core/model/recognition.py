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


class RecognitionHead(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        in_dim = config.feature_channels * config.roi_size * config.roi_size
        self.fc6 = nn.Linear(in_dim, config.fc_dim)
        self.fc7 = nn.Linear(config.fc_dim, config.fc_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.objectness = nn.Linear(config.fc_dim, 1)
        self.box_reg = nn.Linear(config.fc_dim, 4)
        nn.init.normal_(self.objectness.weight, std=0.01)
        nn.init.zeros_(self.objectness.bias)
        nn.init.zeros_(self.box_reg.weight)
        nn.init.zeros_(self.box_reg.bias)

    def codes(self, roi_features: torch.Tensor) -> torch.Tensor:
        """R x C x 7 x 7 (flattened C-major, Caffe pool5 order) -> R x D."""
        x = self.dropout(torch.relu(self.fc6(roi_features.flatten(1))))
        return self.dropout(torch.relu(self.fc7(x)))

    def forward(self, roi_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (codes R x D, objectness logits R, box deltas R x 4)."""
        codes = self.codes(roi_features)
        return codes, self.objectness(codes).squeeze(1), self.box_reg(codes)
