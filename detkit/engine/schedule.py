"""Learning-rate schedules: linear warmup times step or cosine decay, counted in optimizer steps."""
from __future__ import annotations

import bisect
import functools
import math
from typing import Sequence

import torch

from detkit.config.schema import SolverConfig

SCHEDULES = ("step", "cosine")


def iterations(length: int, unit: str, iters_per_epoch: int) -> int:
    """A solver length in optimizer steps.

    Args:
        length: a length as written in the config (max_length or a milestone).
        unit: `iterations` (taken as is) or `epochs` (times `iters_per_epoch`, rounded).
        iters_per_epoch: optimizer steps per pass over the training set.

    Returns:
        The length in optimizer steps.
    """
    if unit == "iterations":
        return int(length)
    if unit == "epochs":
        if iters_per_epoch <= 0:
            raise ValueError(f"iters_per_epoch must be > 0 to count in epochs, got {iters_per_epoch}")
        return round(length * iters_per_epoch)
    raise ValueError(f"unknown solver unit {unit!r}; choose 'iterations' or 'epochs'")


def scaled_lr(base_lr: float, total_batch: int, reference_batch_size: int) -> float:
    """The linear scaling rule (Goyal et al. 2017): the LR grows in proportion to the total batch.

    Args:
        base_lr: the learning rate tuned for `reference_batch_size` images per step.
        total_batch: images per optimizer step over all devices and accumulation steps.
        reference_batch_size: the batch `base_lr` was tuned for.

    Returns:
        base_lr * total_batch / reference_batch_size.
    """
    if total_batch <= 0 or reference_batch_size <= 0:
        raise ValueError(f"batch sizes must be > 0, got {total_batch} and {reference_batch_size}")
    return base_lr * total_batch / reference_batch_size


def lr_factor(step: int, *, max_iter: int, schedule: str, steps: Sequence[int], gamma: float, warmup_iters: int,
              warmup_factor: float) -> float:
    """The multiplier of the base LR at optimizer step `step`.

    Args:
        step: optimizer steps taken so far (0 for the first step).
        max_iter: length of training in steps; cosine reaches 0 here and stays there.
        schedule: `step` (multiply by gamma at each milestone) or `cosine`.
        steps: increasing milestones in steps; the factor drops once `step` reaches one.
        gamma: the step schedule's decay per milestone.
        warmup_iters: length of the linear warmup in steps; 0 turns it off.
        warmup_factor: the warmup's factor at step 0; it rises linearly to 1 at `warmup_iters`.

    Returns:
        warmup(step) * schedule(step).
    """
    if schedule == "step":
        factor = gamma ** bisect.bisect_right(steps, step)
    elif schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * min(step, max_iter) / max_iter))
    else:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    if step < warmup_iters:
        alpha = step / warmup_iters  # detectron2's convention: warmup_factor at step 0, 1 at warmup_iters
        factor *= warmup_factor * (1.0 - alpha) + alpha
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, solver: SolverConfig,
                    iters_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepping once per optimizer step, with the solver's lengths converted to steps.

    Args:
        optimizer: its groups' `initial_lr` (or `lr`) are the base LRs the factor multiplies.
        solver: schedule, milestones, gamma and warmup, in `solver.unit`.
        iters_per_epoch: optimizer steps per epoch, used when `solver.unit` is `epochs`.

    Returns:
        The scheduler. Its state_dict holds only numbers (the factor is a partial, whose empty __dict__ is all
        LambdaLR saves), so it loads with `torch.load(weights_only=True)`; the schedule itself is rebuilt from
        the config on resume.
    """
    def to_steps(length: int) -> int:
        return iterations(length, solver.unit, iters_per_epoch)

    factor = functools.partial(
        lr_factor, max_iter=max(1, to_steps(solver.max_length)), schedule=solver.schedule,
        steps=tuple(to_steps(s) for s in solver.steps), gamma=solver.gamma,
        warmup_iters=solver.warmup_iters, warmup_factor=solver.warmup_factor)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
