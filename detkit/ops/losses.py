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


def _at_least_float32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


class _NegativeFocalSum(torch.autograd.Function):
    """sum_k p_k**gamma * softplus(x_k) over the last dimension, with p = sigmoid(x): the focal loss of every
    entry as a negative (without alpha). The gradient is computed in the same pass as the loss, in place, and
    is the only tensor kept for backward."""

    @staticmethod
    def forward(ctx, logits: Tensor, gamma: float) -> Tensor:
        x = _at_least_float32(logits)
        p = torch.sigmoid(x)
        softplus = F.softplus(x)  # -log(1 - p)
        p_gamma = p * p if gamma == 2 else p.pow(gamma)
        if ctx.needs_input_grad[0]:
            # d/dx [p**g * softplus(x)] = p**g * (g * (1 - p) * softplus(x) + p)
            grad = (1 - p).mul_(gamma).mul_(softplus).add_(p).mul_(p_gamma)
            ctx.save_for_backward(grad)
            ctx.input_dtype = logits.dtype
        loss = softplus.mul_(p_gamma).sum(-1)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor, None]:
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss[..., None]).to(ctx.input_dtype), None


def sigmoid_focal_loss_from_labels(logits: Tensor, labels: Tensor, alpha: float = 0.25,
                                   gamma: float = 2.0) -> Tensor:
    """The focal loss of `sigmoid_focal_loss` with one-hot targets given as class indices, summed over classes.

    Equal to `sigmoid_focal_loss(logits, one_hot(labels)).sum(-1)` but without building the one-hot targets
    and with a fused dense part: every entry is first scored as a negative (one pass forward, one backward),
    then the single positive entry of each foreground row is corrected from a gathered (...,) tensor.

    Args:
        logits: (..., K) raw scores.
        labels: (...) int64: 0..K-1 for a foreground row, anything else (K for background, -1 for ignored) for
            a row whose targets are all zero. The caller masks ignored rows out.

    Returns:
        (...) float32 loss per row.
    """
    num_classes = logits.shape[-1]
    w_pos, w_neg = (alpha, 1 - alpha) if alpha >= 0 else (1.0, 1.0)
    loss = _NegativeFocalSum.apply(logits, gamma) * w_neg
    foreground = (labels >= 0) & (labels < num_classes)
    x = _at_least_float32(logits.gather(-1, labels.clamp(0, num_classes - 1).unsqueeze(-1)).squeeze(-1))
    p = torch.sigmoid(x)
    as_positive = w_pos * (1 - p).pow(gamma) * F.softplus(-x)  # -log(p) = softplus(-x)
    as_negative = w_neg * p.pow(gamma) * F.softplus(x)  # -log(1 - p) = softplus(x)
    return loss + foreground * (as_positive - as_negative)


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
