"""Detection losses, computed in float32 whatever the input dtype. Each returns per-element losses unless a
`reduction` is given, so callers choose their own normalisation."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean() if loss.numel() else loss.sum()  # empty -> 0, not NaN
    raise ValueError(f"reduction must be none, sum or mean, got {reduction!r}")


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0,
                       reduction: str = "none") -> Tensor:
    """Focal loss (Lin et al. 2017) on independent sigmoid outputs.

    FL = -alpha_t * (1 - p_t) ** gamma * log(p_t), with alpha_t = alpha for positives and 1 - alpha for
    negatives (alpha < 0 disables the weighting).

    Args:
        logits: (...) raw scores.
        targets: (...) same shape, 0/1 (or soft) targets.
    """
    logits, targets = logits.float(), targets.float()
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return _reduce(loss, reduction)


def smooth_l1_loss(pred: Tensor, target: Tensor, beta: float = 1.0, reduction: str = "none") -> Tensor:
    """0.5 * x**2 / beta where |x| < beta, else |x| - 0.5 * beta; beta = 0 is the L1 loss."""
    diff = (pred.float() - target.float()).abs()
    if beta < 1e-5:
        loss = diff
    else:
        loss = torch.where(diff < beta, 0.5 * diff ** 2 / beta, diff - 0.5 * beta)
    return _reduce(loss, reduction)


def l1_loss(pred: Tensor, target: Tensor, reduction: str = "none") -> Tensor:
    return _reduce((pred.float() - target.float()).abs(), reduction)


def huber_loss(pred: Tensor, target: Tensor, delta: float = 1.0, reduction: str = "none") -> Tensor:
    """0.5 * x**2 where |x| <= delta, else delta * (|x| - 0.5 * delta) (TF's Huber; = smooth L1 * delta)."""
    diff = (pred.float() - target.float()).abs()
    loss = torch.where(diff <= delta, 0.5 * diff ** 2, delta * (diff - 0.5 * delta))
    return _reduce(loss, reduction)
