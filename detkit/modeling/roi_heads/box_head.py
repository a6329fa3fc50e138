"""Box heads on pooled RoI features and the class/box predictor of Faster R-CNN."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..norm import make_norm


class TwoMLPHead(nn.Module):
    """The FPN box head ("2MLP"): flatten (C, R, R) -> fc `fc_dim` -> ReLU -> fc `fc_dim` -> ReLU."""

    def __init__(self, in_channels: int, resolution: int, fc_dim: int = 1024):
        super().__init__()
        self.fc6 = nn.Linear(in_channels * resolution * resolution, fc_dim)
        self.fc7 = nn.Linear(fc_dim, fc_dim)
        self.out_features = fc_dim
        for fc in (self.fc6, self.fc7):  # detectron2's c2_xavier_fill
            nn.init.kaiming_uniform_(fc.weight, a=1)
            nn.init.zeros_(fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        # (R, C, r, r) -> (R, C*r*r) -> (R, fc_dim)
        return torch.relu(self.fc7(torch.relu(self.fc6(x.flatten(1)))))


class ConvFCHead(nn.Module):
    """`num_convs` x (3x3 conv `conv_dim`, [norm], ReLU) -> flatten -> `num_fcs` x (fc `fc_dim`, [norm], ReLU).

    SpineNet's TF Mask R-CNN uses 4 convs and 1 fc with BatchNorm ("4conv1fc"; TPU `FastrcnnHead`). As there,
    the layers keep their biases next to a norm, convs start from He-normal fan-out init and fcs from
    Glorot-uniform, biases 0. A norm over an fc's output treats it as (R, fc_dim, 1, 1).
    """

    def __init__(self, in_channels: int, resolution: int, *, num_convs: int = 4, conv_dim: int = 256,
                 num_fcs: int = 1, fc_dim: int = 1024, norm: str = "", norm_momentum: float = 0.1,
                 norm_eps: float = 1e-5):
        super().__init__()
        if num_fcs < 1:
            raise ValueError(f"ConvFCHead needs at least one fc layer, got num_fcs={num_fcs}")

        def make(channels: int) -> nn.Module:
            return make_norm(norm, channels, momentum=norm_momentum, eps=norm_eps) if norm else nn.Identity()

        self.convs = nn.ModuleList(nn.Conv2d(in_channels if i == 0 else conv_dim, conv_dim, 3, padding=1)
                                   for i in range(num_convs))
        self.conv_norms = nn.ModuleList(make(conv_dim) for _ in range(num_convs))
        flat = (conv_dim if num_convs else in_channels) * resolution * resolution
        self.fcs = nn.ModuleList(nn.Linear(flat if i == 0 else fc_dim, fc_dim) for i in range(num_fcs))
        self.fc_norms = nn.ModuleList(make(fc_dim) for _ in range(num_fcs))
        self.out_features = fc_dim
        for conv in self.convs:
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        for fc in self.fcs:
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        for conv, norm in zip(self.convs, self.conv_norms):
            x = torch.relu(norm(conv(x)))
        x = x.flatten(1)  # (R, C, r, r) -> (R, C*r*r)
        for fc, norm in zip(self.fcs, self.fc_norms):
            x = fc(x)
            # (R, F) -> (R, F, 1, 1) for the 2-D norm layers, and back
            x = torch.relu(norm(x[:, :, None, None]).flatten(1))
        return x


class Res5Head(nn.Module):
    """The C4 box head: the ResNet's res5 stage on RoI features pooled from res4, then global average pooling.

    Detectron pools 14x14 and keeps res5's stride 2 (-> 7x7); SimpleDet's C5-*ROI heads pool 7x7 and run res5
    with stride 1. `feature_map` keeps the res5 output for the C4 mask head.
    """

    def __init__(self, res5: nn.Sequential, stride: int = 2):
        super().__init__()
        self.res5 = res5
        if stride == 1:
            _set_first_block_stride(self.res5, 1)
        self.out_features = _out_channels(res5)

    def trunk_names(self) -> dict[str, str]:
        """Prefixes of the trunk's state dict that now live here: {"layer4.": "res5.", ...} (ImageNet loading).

        A v1 `layer4` is `res5` itself; a v2 res5 is Sequential(units..., post_norm, ReLU) (see `take_res5`).
        """
        units = [i for i, m in enumerate(self.res5) if any(isinstance(c, nn.Conv2d) for c in m.modules())]
        names = {f"layer4.{i}.": f"res5.{i}." for i in units}
        if len(units) < len(self.res5):  # v2: the post-norm follows the units
            names["post_norm."] = f"res5.{len(units)}."
        return names

    def forward(self, x: Tensor, return_map: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        y = self.res5(x)  # (R, 2048, r', r')
        pooled = y.mean(dim=(2, 3))  # (R, 2048)
        return (pooled, y) if return_map else pooled


def _set_first_block_stride(stage: nn.Sequential, stride: int) -> None:
    """Change the stride of a ResNet stage's first block (its strided conv and its shortcut) in place."""
    block = stage[0]
    for m in block.modules():
        if isinstance(m, nn.Conv2d) and m.stride != (1, 1):
            m.stride = (stride, stride)


def _out_channels(stage: nn.Sequential) -> int:
    # the last conv of the stage: a v2 res5 ends with its norm and ReLU, and a block's last conv (or its
    # shortcut, registered after it) has the block's output width
    convs = [m for m in stage.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


def take_res5(backbone: nn.Module) -> nn.Sequential:
    """Remove the last stage (`layer4`) from a ResNet trunk and return it, for the C4 box head.

    A pre-activation (v2) trunk's final norm (`post_norm`) and ReLU go with it, so the head pools normalised
    features as SimpleDet's BboxC5Head does (res5 -> bn1 -> relu1 -> global pool): the result is
    Sequential(res5 units..., post_norm, ReLU). v1 returns `layer4` itself (same parameter names as before).
    """
    res5 = backbone.layer4
    del backbone.layer4
    post_norm = getattr(backbone, "post_norm", None)
    if post_norm is None:
        return res5
    del backbone.post_norm
    return nn.Sequential(*res5, post_norm, nn.ReLU(inplace=True))


class BoxPredictor(nn.Module):
    """Linear class scores (K foreground classes + background, background last) and box deltas.

    `class_agnostic`: one 4-vector per RoI instead of one per class.
    """

    def __init__(self, in_features: int, num_classes: int, class_agnostic: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.cls_score = nn.Linear(in_features, num_classes + 1)
        self.bbox_pred = nn.Linear(in_features, 4 if class_agnostic else 4 * num_classes)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(R, F) -> class logits (R, K+1) and box deltas (R, 4K) or (R, 4)."""
        return self.cls_score(x), self.bbox_pred(x)
