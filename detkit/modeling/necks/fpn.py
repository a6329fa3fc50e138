"""Feature Pyramid Network (Lin et al. 2017) with extra levels: RetinaNet's P6/P7 convs or Faster R-CNN's pooled P6."""
from __future__ import annotations

from typing import Literal, Sequence

import torch.nn.functional as F
from torch import Tensor, nn


class FPN(nn.Module):
    """Lateral 1x1 + top-down nearest upsampling + 3x3 output convs, then optional P6/P7.

    Args:
        in_channels: channels of the inputs, finest first (e.g. C3, C4, C5 of a ResNet-50: 512, 1024, 2048).
        in_features: names of those inputs in the backbone's output dict (e.g. res3, res4, res5).
        out_channels: pyramid width (256).
        first_level: pyramid level of the finest input (3 for C3 -> P3).
        extra_levels: P6/P7 added on top (2 for RetinaNet, 0 for none).
        extra_source: P6 from "c5" (the paper, Detectron, detectron2, mmdetection) or from "p5" (torchvision's
            retinanet_resnet50_fpn, TF ResNet-FPN) by a 3x3 stride-2 conv, P7 = 3x3 stride-2 conv of ReLU(P6)
            (RetinaNet); or "pool": P6 = P5 subsampled by a 1x1 stride-2 max-pool, no parameters (the RPN level
            of Faster/Mask R-CNN FPN; one extra level only).

    Returns (forward): {"p3": ..., "p7": ...} ordered finest first.
    """

    def __init__(self, in_channels: Sequence[int], in_features: Sequence[str], out_channels: int = 256,
                 first_level: int = 3, extra_levels: int = 2, extra_source: Literal["c5", "p5", "pool"] = "c5"):
        super().__init__()
        if len(in_channels) != len(in_features):
            raise ValueError("in_channels and in_features differ in length")
        if extra_source not in ("c5", "p5", "pool"):
            raise ValueError(f"extra_source must be 'c5', 'p5' or 'pool', got {extra_source!r}")
        if extra_source == "pool" and extra_levels > 1:
            raise ValueError(f"extra_source 'pool' adds one level (P6), got extra_levels={extra_levels}")
        self.in_features = tuple(in_features)
        self.extra_source = extra_source
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.output_convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        extra_in = in_channels[-1] if extra_source == "c5" else out_channels
        self.extra_convs = nn.ModuleList(
            nn.Conv2d(extra_in if i == 0 else out_channels, out_channels, 3, stride=2, padding=1)
            for i in range(extra_levels if extra_source != "pool" else 0))
        self.pooled_extra = extra_source == "pool" and extra_levels == 1
        levels = range(first_level, first_level + len(in_channels) + extra_levels)
        self.out_features = tuple(f"p{level}" for level in levels)
        self.out_strides = {f"p{level}": 2 ** level for level in levels}
        self.out_channels = out_channels
        for conv in self.modules():
            if isinstance(conv, nn.Conv2d):
                nn.init.kaiming_uniform_(conv.weight, a=1)
                nn.init.zeros_(conv.bias)

    def forward(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        inputs = [features[name] for name in self.in_features]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        for i in range(len(laterals) - 1, 0, -1):  # top-down: coarse to fine
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:],
                                                              mode="nearest")
        outputs = [conv(x) for conv, x in zip(self.output_convs, laterals)]
        if self.extra_convs:
            x = inputs[-1] if self.extra_source == "c5" else outputs[-1]
            for i, conv in enumerate(self.extra_convs):
                x = conv(F.relu(x) if i > 0 else x)
                outputs.append(x)
        if self.pooled_extra:
            outputs.append(F.max_pool2d(outputs[-1], kernel_size=1, stride=2))
        return dict(zip(self.out_features, outputs))
