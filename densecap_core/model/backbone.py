"""Backbones: a trunk to output stride 16 (the tiny trunk: 16 or 8), plus an optional 1x1 reduction to ``config.feature_channels``.

All trunks are built without pretrained weights (no downloads at run time); weights come from our checkpoints
or from the Torch7 converter. ``vgg16`` keeps conv1_1..relu5_3 and drops pool5, like the original.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = None
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.skip is None else self.skip(x)))


class TinyTrunk(nn.Module):
    """A small ResNet-style trunk (output stride 16 or 8) for CPU models trained from scratch.

    Stem: 3x3/2 conv; then one residual block per stage, stages 1-3 at stride 2. At output stride 8 the third
    stage keeps its resolution and the fourth uses dilation 2 (same receptive field growth, 4x the cells):
    small objects then cover several feature cells, so RoI features keep their shape and texture.
    """

    def __init__(self, widths: tuple[int, ...], stride: int = 16):
        super().__init__()
        if stride not in (8, 16):
            raise ValueError(f"the tiny trunk has output stride 8 or 16, not {stride}")
        w0, w1, w2, w3 = widths
        s3, d4 = (2, 1) if stride == 16 else (1, 2)
        self.stem = nn.Sequential(nn.Conv2d(3, w0, 3, 2, 1, bias=False), nn.BatchNorm2d(w0), nn.ReLU(inplace=True))
        self.stages = nn.Sequential(_BasicBlock(w0, w1, 2), _BasicBlock(w1, w2, 2), _BasicBlock(w2, w3, s3),
                                    _BasicBlock(w3, w3, 1, d4))
        self.out_channels = w3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_levels(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(output of the second stage at stride 8, final output)."""
        x = self.stages[1](self.stages[0](self.stem(x)))
        return x, self.stages[3](self.stages[2](x))


def _vgg16_trunk(widths: tuple[int, ...] | None = None) -> tuple[nn.Sequential, int]:
    """torchvision's VGG16 features without pool5; ``widths`` (5 block widths) builds the same topology narrower,
    with the same module indices (conv1_1 = trunk.0, ..., conv5_3 = trunk.28)."""
    if widths is None:
        from torchvision.models import vgg16
        features = vgg16(weights=None).features
        return nn.Sequential(*list(features.children())[:-1]), 512  # drop pool5
    from torchvision.models.vgg import make_layers
    if len(widths) != 5:
        raise ValueError(f"vgg_widths needs 5 block widths, got {widths!r}")
    w1, w2, w3, w4, w5 = (int(w) for w in widths)
    features = make_layers([w1, w1, "M", w2, w2, "M", w3, w3, w3, "M", w4, w4, w4, "M", w5, w5, w5])
    return features, w5


def _resnet18_trunk() -> tuple[nn.Sequential, int]:
    from torchvision.models import resnet18
    r = resnet18(weights=None)
    return nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2, r.layer3), 256


def _mobilenet_trunk() -> tuple[nn.Sequential, int]:
    from torchvision.models import mobilenet_v3_large
    feats = mobilenet_v3_large(weights=None).features
    # Blocks up to index 12 end at stride 16 with 112 channels; 13+ go to stride 32.
    return nn.Sequential(*list(feats.children())[:13]), 112


class Backbone(nn.Module):
    """Image (B x 3 x H x W, normalised) -> features (B x C x ceil(H/s) x ceil(W/s)), s = ``config.stride``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.backbone == "vgg16":
            self.trunk, c = _vgg16_trunk(config.vgg_widths)
        elif config.backbone == "resnet18":
            self.trunk, c = _resnet18_trunk()
        elif config.backbone == "mobilenet_v3_large":
            self.trunk, c = _mobilenet_trunk()
        elif config.backbone == "tiny":
            self.trunk = TinyTrunk(config.backbone_widths, config.stride)
            c = self.trunk.out_channels
        else:
            raise ValueError(f"unknown backbone {config.backbone!r}")
        self.reduce = None
        if c != config.feature_channels:
            self.reduce = nn.Sequential(nn.Conv2d(c, config.feature_channels, 1), nn.ReLU(inplace=True))
        self.out_channels = config.feature_channels
        # Optional finer map for RoI features (``config.roi_stride`` = half the stride, tiny trunk only): the
        # second stage's stride-8 output through a 1x1 conv, plus the final map upsampled (an FPN-style top-down
        # merge). Small objects then span several cells of the map their 7x7 RoI grid samples; the RPN keeps
        # the coarse map and its anchors.
        # (ModelConfig refuses any other roi_stride combination.)
        self.lateral = None
        if config.roi_stride and config.roi_stride != config.stride:
            self.lateral = nn.Conv2d(config.backbone_widths[2], config.feature_channels, 1)
        self.frozen_layers = config.freeze_backbone_layers
        if config.backbone == "vgg16" and self.frozen_layers:
            # conv1_1, conv1_2, conv2_1, conv2_2: the original's conv_net1, never trained.
            convs = [m for m in self.trunk if isinstance(m, nn.Conv2d)][: self.frozen_layers]
            for m in convs:
                for p in m.parameters():
                    p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The map the RPN sees (stride ``config.stride``)."""
        x = self.trunk(x)
        return x if self.reduce is None else self.reduce(x)

    def forward_pair(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(RPN map, RoI map): the same tensor twice unless a finer RoI map is configured."""
        if self.lateral is None:
            feats = self.forward(x)
            return feats, feats
        fine, x = self.trunk.forward_levels(x)
        feats = x if self.reduce is None else self.reduce(x)
        up = nn.functional.interpolate(feats, size=fine.shape[-2:], mode="bilinear", align_corners=False)
        return feats, torch.relu(self.lateral(fine) + up)
