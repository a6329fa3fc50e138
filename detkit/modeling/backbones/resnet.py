"""ResNet-18/34/50/101 (v1) in the "pytorch" (stride on the 3x3, torchvision names) and "caffe" (MSRA: stride on
the first 1x1) layouts, with a choice of norm and frozen early stages.

Parameter names follow torchvision (conv1, bn1, layer1..layer4, downsample.0/1), so torchvision ImageNet state
dicts load as they are (without `fc`).
"""
from __future__ import annotations

from typing import Literal, Sequence

from torch import Tensor, nn

from ..norm import FrozenBatchNorm2d, freeze, make_norm

DEPTHS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3)),
          101: ("bottleneck", (3, 4, 23, 3))}
STAGE_NAMES = ("res2", "res3", "res4", "res5")


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int, norm: str, style: str):
        super().__init__()
        out = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride, 1, bias=False)
        self.bn1 = make_norm(norm, width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = make_norm(norm, out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, out, stride, norm)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int, norm: str, style: str):
        super().__init__()
        out = width * self.expansion
        stride_1x1, stride_3x3 = (stride, 1) if style == "caffe" else (1, stride)
        self.conv1 = nn.Conv2d(in_channels, width, 1, stride_1x1, bias=False)
        self.bn1 = make_norm(norm, width)
        self.conv2 = nn.Conv2d(width, width, 3, stride_3x3, 1, bias=False)
        self.bn2 = make_norm(norm, width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = make_norm(norm, out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, out, stride, norm)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + identity)


def _shortcut(in_channels: int, out_channels: int, stride: int, norm: str) -> nn.Module | None:
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), make_norm(norm, out_channels))


class ResNet(nn.Module):
    """A ResNet trunk returning {"res2": C2, ..., "res5": C5} (strides 4, 8, 16, 32) for the requested stages.

    Args:
        depth: 18, 34, 50 or 101.
        style: "pytorch" (stride on the 3x3) or "caffe" (stride on the first 1x1; bottlenecks only differ).
        norm: FrozenBN, BN, SyncBN or GN.
        freeze_at: 0 trains everything; 1 freezes the stem; k >= 2 also freezes res2..res{k} (detectron2's
            FREEZE_AT). Frozen parts get no gradients and their BatchNorms become frozen.
        out_features: stage names to return.
        norm_eps: epsilon of every norm layer (0 for torchvision's COCO detection weights).
    """

    def __init__(self, depth: int = 50, style: Literal["pytorch", "caffe"] = "pytorch", norm: str = "FrozenBN",
                 freeze_at: int = 2, out_features: Sequence[str] = ("res3", "res4", "res5"), norm_eps: float = 1e-5):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"ResNet depth must be one of {sorted(DEPTHS)}, got {depth}")
        unknown = set(out_features) - set(STAGE_NAMES)
        if unknown:
            raise ValueError(f"unknown ResNet stages {sorted(unknown)}; choose from {STAGE_NAMES}")
        kind, blocks = DEPTHS[depth]
        block_cls = Bottleneck if kind == "bottleneck" else BasicBlock
        self.out_features = tuple(out_features)
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = make_norm(norm, 64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_channels, channels, strides = 64, {}, {}
        for i, (num_blocks, width) in enumerate(zip(blocks, (64, 128, 256, 512))):
            stride = 1 if i == 0 else 2
            layers = []
            for b in range(num_blocks):
                layers.append(block_cls(in_channels, width, stride if b == 0 else 1, norm, style))
                in_channels = width * block_cls.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
            channels[STAGE_NAMES[i]], strides[STAGE_NAMES[i]] = in_channels, 4 * 2 ** i
        self.out_channels = {name: channels[name] for name in self.out_features}
        self.out_strides = {name: strides[name] for name in self.out_features}
        self._init_weights()
        for m in self.modules():  # torchvision's COCO detectors were trained with eps 0 in their frozen BNs
            if isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm)):
                m.eps = norm_eps
        if freeze_at >= 1:
            self.conv1, self.bn1 = freeze(self.conv1), freeze(self.bn1)
        for i in range(1, min(freeze_at, 5)):
            setattr(self, f"layer{i}", freeze(getattr(self, f"layer{i}")))

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = {}
        last = max(STAGE_NAMES.index(n) for n in self.out_features)
        for i in range(last + 1):
            x = getattr(self, f"layer{i + 1}")(x)
            if STAGE_NAMES[i] in self.out_features:
                out[STAGE_NAMES[i]] = x
        return out
