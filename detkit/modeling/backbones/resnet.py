"""ResNet-18/34/50/101 trunks with a choice of norm and frozen early stages, in three layouts: v1 "pytorch" (stride
on the 3x3, torchvision names), v1 "caffe" (MSRA: stride on the first 1x1) and "v2" (pre-activation, the MXNet
model zoo's ResNet v2 that SimpleDet's R50v2/R101v2 detectors use).

v1 parameter names follow torchvision (conv1, bn1, layer1..layer4, downsample.0/1), so torchvision ImageNet state
dicts load as they are (without `fc`). v2 keeps those positions and adds `bn_data` (the input BatchNorm) and
`post_norm` (MXNet's final `bn1`); its shortcut is a bare conv, `downsample.weight`.
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


class PreActBasicBlock(nn.Module):
    """ResNet v2 basic unit (MXNet `residual_unit`, bottle_neck False): BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3.

    `projection`: a 1x1 strided conv shortcut read from the pre-activated input (MXNet's `_sc`, no norm); without
    it the shortcut is the unit's raw input. MXNet projects in the first unit of every stage, res2 included.
    """

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int, norm: str, projection: bool):
        super().__init__()
        out = width * self.expansion
        self.bn1 = make_norm(norm, in_channels)
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride, 1, bias=False)
        self.bn2 = make_norm(norm, width)
        self.conv2 = nn.Conv2d(width, out, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = nn.Conv2d(in_channels, out, 1, stride, bias=False) if projection else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.bn1(x))
        shortcut = x if self.downsample is None else self.downsample(y)
        y = self.conv1(y)
        return self.conv2(self.relu(self.bn2(y))) + shortcut


class PreActBottleneck(nn.Module):
    """ResNet v2 bottleneck unit: BN-ReLU-conv1x1, BN-ReLU-conv3x3 (stride here, as in MXNet and mxnext),
    BN-ReLU-conv1x1, plus the shortcut (see PreActBasicBlock). The sum is returned un-normalised: the next unit's
    bn1 (or the trunk's `post_norm`) normalises it."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int, norm: str, projection: bool):
        super().__init__()
        out = width * self.expansion
        self.bn1 = make_norm(norm, in_channels)
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn2 = make_norm(norm, width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn3 = make_norm(norm, width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = nn.Conv2d(in_channels, out, 1, stride, bias=False) if projection else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.bn1(x))
        shortcut = x if self.downsample is None else self.downsample(y)
        y = self.conv1(y)
        y = self.conv2(self.relu(self.bn2(y)))
        return self.conv3(self.relu(self.bn3(y))) + shortcut


class InputBatchNorm(FrozenBatchNorm2d):
    """ResNet v2's `bn_data`: a BatchNorm on the raw 0-255 RGB input with its scale fixed at 1 (MXNet fix_gamma).

    It is always frozen, as mxnext's `whiten` (use_global_stats) keeps it in every SimpleDet config, SyncBN rows
    included: it is the v2 models' input normalisation, with the statistics and shift a checkpoint brings. A
    checkpoint's gamma is ignored (MXNet never applies it).
    """

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.weight.fill_(1.0)


class ResNet(nn.Module):
    """A ResNet trunk returning {"res2": C2, ..., "res5": C5} (strides 4, 8, 16, 32) for the requested stages.

    v2 (pre-activation): `bn_data` on the raw input, then the 7x7 stem with BN and ReLU, max-pool, the units of
    PreActBottleneck / PreActBasicBlock, and after res5 a final norm + ReLU (`post_norm`). res2..res4 are the raw
    (un-normalised) stage sums, as SimpleDet's v2 C4 detectors feed res4 to the RPN and the RoI pooler (mxnext
    `resnet_c4_factory`); res5 includes the final norm + ReLU, as every SimpleDet use of a v2 C5 does (the
    BboxC5Head, the c5 and c4c5 endpoints), so `post_norm` is never a dead layer; mxnext's FPN endpoint and timm's
    feature maps return a raw C5 instead. `post_norm` is the configured norm (SimpleDet always uses a global-stats
    fixbn there, so its SyncBN configs differ in that one layer). Feed it raw pixels
    (`model.input.normalization: raw`).

    Args:
        depth: 18, 34, 50 or 101.
        style: "pytorch" (stride on the 3x3), "caffe" (stride on the first 1x1; bottlenecks only differ) or "v2"
            (pre-activation, stride on the 3x3).
        norm: FrozenBN, BN, SyncBN or GN (v2: every norm except `bn_data`, which is always frozen).
        freeze_at: 0 trains everything; 1 freezes the stem (v2: with bn_data); k >= 2 also freezes res2..res{k}
            (detectron2's FREEZE_AT; v2: 5 also freezes `post_norm`). Frozen parts get no gradients and their
            BatchNorms become frozen.
        out_features: stage names to return.
        norm_eps: epsilon of every norm layer (0 for torchvision's COCO detection weights).
    """

    def __init__(self, depth: int = 50, style: Literal["pytorch", "caffe", "v2"] = "pytorch",
                 norm: str = "FrozenBN", freeze_at: int = 2, out_features: Sequence[str] = ("res3", "res4", "res5"),
                 norm_eps: float = 1e-5):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"ResNet depth must be one of {sorted(DEPTHS)}, got {depth}")
        unknown = set(out_features) - set(STAGE_NAMES)
        if unknown:
            raise ValueError(f"unknown ResNet stages {sorted(unknown)}; choose from {STAGE_NAMES}")
        if style not in ("pytorch", "caffe", "v2"):
            raise ValueError(f"ResNet style must be 'pytorch', 'caffe' or 'v2', got {style!r}")
        kind, blocks = DEPTHS[depth]
        self.preact = style == "v2"
        if self.preact:
            block_cls = PreActBottleneck if kind == "bottleneck" else PreActBasicBlock
        else:
            block_cls = Bottleneck if kind == "bottleneck" else BasicBlock
        self.out_features = tuple(out_features)
        if self.preact:
            self.bn_data = InputBatchNorm(3)
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = make_norm(norm, 64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_channels, channels, strides = 64, {}, {}
        for i, (num_blocks, width) in enumerate(zip(blocks, (64, 128, 256, 512))):
            stride = 1 if i == 0 else 2
            layers = []
            for b in range(num_blocks):
                if self.preact:  # MXNet projects in the first unit of every stage (dim_match False), res2 included
                    layers.append(block_cls(in_channels, width, stride if b == 0 else 1, norm, projection=b == 0))
                else:
                    layers.append(block_cls(in_channels, width, stride if b == 0 else 1, norm, style))
                in_channels = width * block_cls.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
            channels[STAGE_NAMES[i]], strides[STAGE_NAMES[i]] = in_channels, 4 * 2 ** i
        if self.preact:
            self.post_norm = make_norm(norm, in_channels)
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
        if self.preact and freeze_at >= 5:  # the final norm belongs to res5
            self.post_norm = freeze(self.post_norm)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if self.preact:
            x = self.bn_data(x)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = {}
        last = max(STAGE_NAMES.index(n) for n in self.out_features)
        for i in range(last + 1):
            x = getattr(self, f"layer{i + 1}")(x)
            if self.preact and i == 3:  # v2: res5 is the final norm + ReLU of the last stage's sum
                x = self.relu(self.post_norm(x))
            if STAGE_NAMES[i] in self.out_features:
                out[STAGE_NAMES[i]] = x
        return out
