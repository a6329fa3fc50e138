"""Fold batch norms into the convolutions before them, for inference: one multiply-add fewer per layer.

A frozen (or eval-mode) batch norm after a convolution computes `y * scale + shift` with constants, which is the same
as a convolution with weights `w * scale` and bias `b * scale + shift`. Folding changes the model's state-dict keys,
so it is for inference models only (`load_detector`); checkpoints are never written from a folded model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .backbones.resnet import BasicBlock, Bottleneck, ResNet
from .backbones.spinenet import Block as SpineNetBlock
from .norm import FrozenBatchNorm2d, bn_scale_shift

_BATCH_NORMS = (FrozenBatchNorm2d, nn.BatchNorm2d, nn.SyncBatchNorm)


@dataclass
class FoldReport:
    folded: int  # norm layers merged into their convolution
    kept: int  # norm layers left as they are (pre-activation, GroupNorm, training-mode BN, no conv before them)


def _pairs(model: nn.Module):
    """(parent, conv attribute, norm attribute) for every norm that directly follows a convolution:
    - the ResNet stem (every style: v2's stem is post-activation too, its `bn_data` has no conv before it);
    - the post-activation blocks, ResNet v1 (`pytorch`, `caffe`; TridentNet's Bottlenecks with a shared-weight
      conv) and SpineNet, whose `convI` each feed `bnI`;
    - adjacent (conv, norm) children of an `nn.Sequential` that runs its children in order (its own forward):
      projection shortcuts, SpineNet's stem, resampling and endpoint convs, the mask head's convs.
    Pre-activation (v2) blocks put their norms before their convs and are not folded."""
    for module in model.modules():
        if isinstance(module, ResNet):
            yield module, "conv1", "bn1"
        elif isinstance(module, (BasicBlock, Bottleneck, SpineNetBlock)):
            for i in (1, 2, 3):
                if hasattr(module, f"conv{i}"):
                    yield module, f"conv{i}", f"bn{i}"
        elif isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
            names = list(module._modules)
            for conv, norm in zip(names, names[1:]):
                if isinstance(module._modules[conv], nn.Conv2d) and isinstance(module._modules[norm], _BATCH_NORMS):
                    yield module, conv, norm


def _foldable(norm: nn.Module) -> bool:
    if isinstance(norm, FrozenBatchNorm2d):
        return True
    return isinstance(norm, (nn.BatchNorm2d, nn.SyncBatchNorm)) and not norm.training \
        and norm.track_running_stats and norm.running_mean is not None


@torch.no_grad()
def fold_batchnorms(model: nn.Module) -> FoldReport:
    """Merge every frozen or eval-mode batch norm that follows a convolution into it, in place.

    Returns:
        How many norm layers were folded and how many were kept.
    """
    folded = 0
    for parent, conv_name, norm_name in list(_pairs(model)):
        conv, norm = getattr(parent, conv_name), getattr(parent, norm_name)
        if not isinstance(conv, nn.Conv2d) or not _foldable(norm):
            continue
        scale, shift = bn_scale_shift(norm, torch.float32)
        new_weight = conv.weight.float() * scale.view(-1, 1, 1, 1)
        new_bias = shift if conv.bias is None else conv.bias.float() * scale + shift
        # new Parameters: a weight another module shares (TridentNet's branches share one conv) stays intact
        conv.weight = nn.Parameter(new_weight.to(conv.weight.dtype), requires_grad=False)
        conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype), requires_grad=False)
        setattr(parent, norm_name, nn.Identity())
        folded += 1
    kept = sum(isinstance(m, (*_BATCH_NORMS, nn.GroupNorm)) for m in model.modules())
    return FoldReport(folded, kept)
