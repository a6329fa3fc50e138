"""The RetinaNet head: separate classification and box towers shared across pyramid levels."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..norm import make_norm


class RetinaHead(nn.Module):
    """`num_convs` x (3x3 conv, [norm], activation) per tower, then a 3x3 predictor.

    Args:
        in_channels: pyramid width.
        num_anchors: anchors per location (A).
        num_classes: K (sigmoid outputs, no background logit).
        num_convs, width: the towers (4 x 256 in the paper; 4 x 128 for SpineNet-49S).
        norm: "" for none (paper); "BN"/"SyncBN"/"GN" with `norm_per_level` for SpineNet's head, whose
            convolutions are shared across levels but whose BatchNorms are not.
        num_levels: pyramid levels (needed for per-level norms).
        prior_prob: initial foreground probability; the class bias starts at -log((1 - p) / p).
        activation: "relu" or "swish" (SiLU; SpineNet protocol C).
        norm_momentum, norm_eps: of the norms (momentum in PyTorch's convention; SpineNet uses the backbone's).
        predictor_std: init std of the two predictor convs (tower convs: 0.01; TF's SpineNet predictors: 1e-5).
    """

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, num_convs: int = 4, width: int = 256,
                 norm: str = "", norm_per_level: bool = True, num_levels: int = 5, prior_prob: float = 0.01,
                 activation: str = "relu", norm_momentum: float = 0.1, norm_eps: float = 1e-5,
                 predictor_std: float = 0.01):
        super().__init__()
        self.num_classes, self.num_anchors = num_classes, num_anchors
        channels = [in_channels] + [width] * num_convs
        self.cls_convs = nn.ModuleList(nn.Conv2d(c, width, 3, padding=1) for c in channels[:-1])
        self.box_convs = nn.ModuleList(nn.Conv2d(c, width, 3, padding=1) for c in channels[:-1])
        copies = num_levels if norm_per_level else 1
        if norm:
            # norms[level][conv] (a single shared set when norm_per_level is False)
            kwargs = dict(momentum=norm_momentum, eps=norm_eps)
            self.cls_norms = nn.ModuleList(nn.ModuleList(make_norm(norm, width, **kwargs) for _ in range(num_convs))
                                           for _ in range(copies))
            self.box_norms = nn.ModuleList(nn.ModuleList(make_norm(norm, width, **kwargs) for _ in range(num_convs))
                                           for _ in range(copies))
        else:
            self.cls_norms = self.box_norms = None
        self.activation = nn.SiLU() if activation == "swish" else nn.ReLU()
        self.cls_logits = nn.Conv2d(width if num_convs else in_channels, num_anchors * num_classes, 3, padding=1)
        self.box_pred = nn.Conv2d(width if num_convs else in_channels, num_anchors * 4, 3, padding=1)
        for conv in [*self.cls_convs, *self.box_convs, self.cls_logits, self.box_pred]:
            nn.init.normal_(conv.weight, std=predictor_std if conv in (self.cls_logits, self.box_pred) else 0.01)
            nn.init.zeros_(conv.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))

    def _tower(self, x: Tensor, convs: nn.ModuleList, norms: nn.ModuleList | None, level: int) -> Tensor:
        for i, conv in enumerate(convs):
            x = conv(x)
            if norms is not None:
                x = norms[level if len(norms) > 1 else 0][i](x)
            x = self.activation(x)
        return x

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per level: class logits (N, A*K, H, W) and box deltas (N, A*4, H, W)."""
        logits, deltas = [], []
        for level, x in enumerate(features):
            logits.append(self.cls_logits(self._tower(x, self.cls_convs, self.cls_norms, level)))
            deltas.append(self.box_pred(self._tower(x, self.box_convs, self.box_norms, level)))
        return logits, deltas


def flatten_predictions(per_level: list[Tensor], last_dim: int) -> Tensor:
    """Per-level (N, A*C, H, W) maps -> one (N, sum(H*W*A), C) tensor in the anchor generator's order."""
    out = []
    for x in per_level:
        n, _, h, w = x.shape
        # (N, A*C, H, W) -> (N, A, C, H, W) -> (N, H, W, A, C) -> (N, H*W*A, C)
        out.append(x.view(n, -1, last_dim, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, last_dim))
    return torch.cat(out, dim=1)
