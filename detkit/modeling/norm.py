"""Normalisation layers chosen by name: FrozenBN, BN, SyncBN, GN."""
from __future__ import annotations

import torch
from torch import Tensor, nn

NORMS = ("FrozenBN", "BN", "SyncBN", "GN")


def bn_scale_shift(norm: nn.Module, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """(C,) scale and shift of a batch norm with fixed statistics: `norm(x) == x * scale + shift` per channel.

    `norm` is a FrozenBatchNorm2d or a BatchNorm2d/SyncBatchNorm with running statistics (a missing affine weight
    or bias counts as 1 or 0). With `dtype` the statistics are cast to it first (fold_batchnorms: float32).
    """
    weight = norm.weight if norm.weight is not None else torch.ones_like(norm.running_var)
    bias = norm.bias if norm.bias is not None else torch.zeros_like(norm.running_mean)
    mean, var = norm.running_mean, norm.running_var
    if dtype is not None:
        weight, bias, mean, var = (t.to(dtype) for t in (weight, bias, mean, var))
    scale = weight * (var + norm.eps).rsqrt()
    shift = bias - mean * scale
    return scale, shift


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters (buffers, not parameters).

    Holds the same state-dict keys as nn.BatchNorm2d (weight, bias, running_mean, running_var), so ImageNet
    checkpoints load unchanged; the forward is one multiply-add, foldable into the preceding convolution.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # BN checkpoints carry it; it means nothing here
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = bn_scale_shift(self)
        # (C,) -> (1, C, 1, 1), in the input's dtype so autocast stays in half precision
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def make_norm(name: str, channels: int, gn_groups: int = 32, momentum: float = 0.1, eps: float = 1e-5) -> nn.Module:
    """A norm layer by name (`momentum` in PyTorch's convention: TF's 0.99 is 0.01 here)."""
    if name == "FrozenBN":
        return FrozenBatchNorm2d(channels, eps)
    if name == "BN":
        return nn.BatchNorm2d(channels, eps=eps, momentum=momentum)
    if name == "SyncBN":
        return nn.SyncBatchNorm(channels, eps=eps, momentum=momentum)
    if name == "GN":
        return nn.GroupNorm(gn_groups, channels, eps=eps)
    raise ValueError(f"unknown norm {name!r}; choose one of {NORMS}")


def freeze(module: nn.Module) -> nn.Module:
    """Stop training `module`: no gradients, and its BatchNorms become FrozenBatchNorm2d with their statistics."""
    for p in module.parameters():
        p.requires_grad_(False)
    return convert_frozen_batchnorm(module)


def convert_frozen_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d/SyncBatchNorm below `module` (or `module` itself) by a FrozenBatchNorm2d."""
    if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        frozen = FrozenBatchNorm2d(module.num_features, module.eps)
        if module.affine:
            frozen.weight.copy_(module.weight.detach())
            frozen.bias.copy_(module.bias.detach())
        if module.running_mean is not None:
            frozen.running_mean.copy_(module.running_mean)
            frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        new = convert_frozen_batchnorm(child)
        if new is not child:
            setattr(module, name, new)
    return module
