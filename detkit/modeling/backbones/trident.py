"""TridentNet's trident blocks (Li et al. 2019; SimpleDet's models/tridentnet): res4 units whose 3x3 convs run once per
branch with that branch's dilation (1, 2, 3), every weight (convs and norms) shared, the branches folded into the batch.

Folding is branch-major: a batch of N images becomes B*N rows, row `b * N + n` being image n seen by branch b,
so each branch is one contiguous slice (`x.chunk(B)`) and everything after res4 (RPN, RoI head) runs once on the
folded batch. SimpleDet stacks image-major (`n * B + b`); the order changes nothing but which rows the RoI
sampler's random draw visits first.

A `ResNet` becomes a trident ResNet in place with `make_trident`: the parameter names do not change (a trident
conv keeps `conv2.weight`), so ImageNet trunks and plain C4 checkpoints load as they are.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def active_branches(num_branches: int, test_branch: int, training: bool) -> tuple[int, ...]:
    """The branches a forward pass runs: all of them in training and in full-Trident testing, only `test_branch`
    in Trident-Fast testing (`test_branch` >= 0, in eval mode)."""
    if training or test_branch < 0:
        return tuple(range(num_branches))
    return (test_branch,)


class TridentConv2d(nn.Conv2d):
    """One conv applied to each branch slice of a folded batch with the branch's dilation (padding = dilation for
    the 3x3 kernel), with a single weight.

    Args:
        conv: the conv to share (its weight and bias Parameters are reused, not copied); its own dilation and
            padding are replaced by the branch's.
        dilations: one per branch.
        test_branch: -1 runs every branch in eval mode too; k runs only branch k in eval mode (the input is then
            not folded: N rows).
    """

    def __init__(self, conv: nn.Conv2d, dilations: Sequence[int], test_branch: int = -1):
        if conv.kernel_size != (3, 3) or conv.groups != 1:
            raise ValueError(f"trident convs are 3x3 and ungrouped, got kernel {conv.kernel_size}, "
                             f"groups {conv.groups}")
        super().__init__(conv.in_channels, conv.out_channels, 3, conv.stride, 1, bias=conv.bias is not None,
                         device=conv.weight.device, dtype=conv.weight.dtype)
        self.weight = conv.weight  # the same Parameter: one weight for every branch
        self.bias = conv.bias
        self.dilations, self.test_branch = tuple(int(d) for d in dilations), test_branch

    def forward(self, x: Tensor) -> Tensor:
        branches = active_branches(len(self.dilations), self.test_branch, self.training)
        # (B*N, C, H, W) -> B slices of (N, C, H, W), branch-major; one conv call per branch, as the dilation
        # is a property of the call (a loop over 3 branches, not over boxes or images)
        outs = [F.conv2d(part, self.weight, self.bias, self.stride, self.dilations[b], self.dilations[b])
                for b, part in zip(branches, x.chunk(len(branches)))]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dilations={self.dilations}, test_branch={self.test_branch}"


class TridentStage(nn.Sequential):
    """A ResNet stage whose units from `first_trident` on are trident units: the input of that unit is repeated
    once per branch (branch-major), so the stage maps (N, C, H, W) to (B*N, C', H', W').

    The units keep their positions (`layer3.0`, `layer3.1`, ...), so state dicts are unchanged.
    """

    def __init__(self, units: Sequence[nn.Module], first_trident: int, num_branches: int, test_branch: int = -1):
        super().__init__(*units)
        self.first_trident, self.num_branches, self.test_branch = first_trident, num_branches, test_branch

    def __getitem__(self, idx: int | slice) -> nn.Module:
        if isinstance(idx, slice):  # a run of units is a plain Sequential: the fold belongs to the whole stage
            return nn.Sequential(*list(self._modules.values())[idx])
        return super().__getitem__(idx)

    def forward(self, x: Tensor) -> Tensor:
        for i, unit in enumerate(self):
            if i == self.first_trident:
                x = fold_branches(x, len(active_branches(self.num_branches, self.test_branch, self.training)))
            x = unit(x)
        return x


def fold_branches(x: Tensor, num_branches: int) -> Tensor:
    """(N, ...) -> (B*N, ...): every branch gets a copy of the batch, branch-major (row b * N + n)."""
    return x if num_branches == 1 else x.repeat(num_branches, *([1] * (x.dim() - 1)))


def make_trident(backbone: nn.Module, *, dilations: Sequence[int] = (1, 2, 3), num_blocks: int = -1,
                 test_branch: int = -1, stage: str = "layer3") -> nn.Module:
    """Turn the last `num_blocks` units of a ResNet stage (res4 = `layer3`) into trident units, in place.

    Every 3x3 conv of those units becomes a `TridentConv2d` (a bottleneck has one; a basic block's two are both
    dilated), sharing its weight; norms and 1x1 convs are untouched and simply see the folded batch, so they are
    shared too (a trainable BatchNorm takes its statistics over all branches together).

    Args:
        backbone: a `ResNet` with the stage built.
        dilations: one per branch (SimpleDet, detectron2: 1, 2, 3).
        num_blocks: trident units at the end of the stage; -1: all but the first (SimpleDet's
            num_block - 1: the first unit, with the stride and the projection, stays single); the stage's unit count
            makes every unit a trident unit (detectron2).
        test_branch: -1: all branches in eval mode too (TridentNet); k: only branch k in eval mode (Trident-Fast, 1).
        stage: the stage to convert.

    Returns:
        The same backbone; its stage is now a `TridentStage` and its output has B*N rows in training.
    """
    units = list(getattr(backbone, stage))
    count = len(units) - 1 if num_blocks == -1 else num_blocks
    if not 1 <= count <= len(units):
        raise ValueError(f"{stage} has {len(units)} units: num_blocks must be -1 or in 1..{len(units)}, "
                         f"got {num_blocks}")
    if not -1 <= test_branch < len(dilations):
        raise ValueError(f"test_branch must be -1 or a branch index below {len(dilations)}, got {test_branch}")
    first = len(units) - count
    for unit in units[first:]:
        for name, child in list(unit.named_children()):
            if isinstance(child, nn.Conv2d) and child.kernel_size == (3, 3):
                setattr(unit, name, TridentConv2d(child, dilations, test_branch))
    setattr(backbone, stage, TridentStage(units, first, len(dilations), test_branch))
    return backbone
