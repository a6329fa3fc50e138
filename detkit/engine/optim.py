"""SGD or AdamW, with separate weight decay for normalisation weights and biases."""
from __future__ import annotations

import torch
from torch import nn

from detkit.config.schema import SolverConfig

# FrozenBatchNorm2d is absent on purpose: its affine terms are buffers, so it has nothing to optimise.
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm,
              nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.RMSNorm)


def build_optimizer(model: nn.Module, solver: SolverConfig, lr: float) -> torch.optim.Optimizer:
    """SGD with momentum (or AdamW, decoupled decay) over the trainable parameters of `model`, in up to three groups.

    `no_decay_bias` takes every bias (normalisation biases included, as in detectron2) with
    `solver.weight_decay_bias`; `no_decay_norm` the other parameters of normalisation layers with
    `solver.weight_decay_norm`; `decay` the rest with `solver.weight_decay`. Frozen parameters are left out and
    a parameter shared by several modules is listed once, under the first module that holds it.

    Args:
        model: the network to train.
        solver: the optimizer kind, its momentum or betas, and the three weight decays.
        lr: the learning rate, already scaled to the real batch (see `scaled_lr`).

    Returns:
        The optimizer; each group carries `name`, `weight_decay` and `initial_lr` (the scheduler's base LR).
    """
    params: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay_norm": [], "no_decay_bias": []}
    seen: set[int] = set()
    for module in model.modules():  # yields a shared module once
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if name == "bias":
                params["no_decay_bias"].append(param)
            elif isinstance(module, NORM_TYPES):
                params["no_decay_norm"].append(param)
            else:
                params["decay"].append(param)
    if not seen:
        raise ValueError("the model has no trainable parameters")
    decay = {"decay": solver.weight_decay, "no_decay_norm": solver.weight_decay_norm,
             "no_decay_bias": solver.weight_decay_bias}
    groups = [{"name": name, "params": group, "weight_decay": decay[name], "lr": lr, "initial_lr": lr}
              for name, group in params.items() if group]
    if solver.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(solver.betas))
    return torch.optim.SGD(groups, lr=lr, momentum=solver.momentum)
