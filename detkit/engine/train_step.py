"""One optimiser step: micro-batches, AMP, the step-wide loss normaliser, the all-reduce, clipping and the update.

The trainer and `detkit benchmark` run this same object, so what the benchmark times is what training does.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from .distributed import all_reduce_sum
from .divergence import StepKind, classify_step
from .inference import autocast
from .signals import STOP_SIGNAL_NAMES



@dataclass
class StepResult:
    """What one step did.

    Attributes:
        values: the step's losses (averaged over ranks), "loss" and "grad_norm" as floats; empty when skipped.
        kind: "ok"; "overflow" (fp16 gradients overflowed under a finite loss; the scaler recalibrates) or "bad"
            (a non-finite loss or gradient); the last two skip the update.
        stop: the stop signal any rank reported in this step's all-reduce ("SIGTERM", "SIGUSR1"), else None.
        raw: the values before a skip emptied them (for the log line of a skipped step).
    """

    values: dict[str, float]
    kind: StepKind
    stop: str | None = None
    raw: dict[str, float] = field(default_factory=dict)


class TrainStep:
    """Callable that runs one optimiser step over `accumulate` micro-batches.

    Args:
        train_model: what the forward calls (the DDP wrapper under torchrun, else the model).
        model: the detector itself (parameters, `normalizer_estimate`, `step_normalizer`).
        optimizer, scheduler, scaler: the optimiser, its LR schedule (stepped once per call) and the AMP scaler.
        device: where batches go.
        amp: "none", "bf16" or "fp16".
        accumulate: micro-batches per step.
        clip_grad_norm: the global gradient norm limit; 0 turns clipping off (the norm is still measured).
        world_size: processes in the job (1 without torchrun).
        step_normalized: divide RetinaNet's losses by a normaliser that spans the whole step (all micro-batches and
            ranks) instead of each micro-batch's own; exact accumulation, see README.
    """

    def __init__(self, train_model: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                 scaler: torch.amp.GradScaler, *, device: torch.device, amp: str = "none", accumulate: int = 1,
                 clip_grad_norm: float = 0.0, world_size: int = 1, step_normalized: bool = False):
        self.train_model, self.model = train_model, model
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.device, self.amp, self.accumulate = device, amp, accumulate
        self.clip_grad_norm, self.world_size, self.step_normalized = clip_grad_norm, world_size, step_normalized
        self.params = list(model.parameters())

    def __call__(self, batches: Iterator, stop: str | None = None,
                 on_batch: Callable[[object], None] | None = None) -> StepResult:
        """Take `accumulate` batches from `batches` and step.

        Args:
            batches: an iterator of `Batch`es (on the CPU; moved to the device here).
            stop: a stop signal this rank received ("SIGTERM" or "SIGUSR1"), shared with the others.
            on_batch: called with each batch as it is taken (e.g. to collect the images the loader skipped).
        """
        world, accumulate = self.world_size, self.accumulate
        # with the step normaliser each micro-batch's loss is divided by an estimate and the gradients are rescaled
        # to the whole step's normaliser once it is known; otherwise each micro-batch counts 1/accumulate
        d_est = self.model.normalizer_estimate() if self.step_normalized else None
        loss_weight = d_est if d_est is not None else 1.0 / accumulate
        sums: dict[str, torch.Tensor] = {}  # the step's loss terms x loss_weight; other values averaged
        num_fg, num_images = torch.zeros((), device=self.device), 0
        for m in range(accumulate):
            batch = next(batches)
            if on_batch is not None:
                on_batch(batch)
            batch = batch.to(self.device, non_blocking=True)
            # DDP all-reduces gradients at the last micro-batch only
            sync = contextlib.nullcontext() if world == 1 or m == accumulate - 1 else self.train_model.no_sync()
            extra = {} if d_est is None else {"loss_normalizer": d_est}
            with sync:
                with autocast(self.device, self.amp):
                    losses = self.train_model(batch.images, batch.image_sizes, batch.targets,
                                              image_scales=batch.image_scales, **extra)
                loss = sum(v for k, v in losses.items() if k.startswith("loss"))
                self.scaler.scale(loss if d_est is not None else loss / accumulate).backward()
            if d_est is not None:
                num_fg = num_fg + losses.pop("num_fg_total").float()
                num_images += len(batch)
            for k, v in losses.items():
                weight = loss_weight if k.startswith("loss") else 1.0 / accumulate
                sums[k] = sums.get(k, 0) + v.detach().float() * weight
        names = sorted(sums, key=lambda k: not k.startswith("loss"))  # loss terms first (stable)
        num_losses = sum(k.startswith("loss") for k in names)
        # built with fills, not from Python lists: a host-to-device copy would make the step wait for the GPU
        flags = torch.zeros(len(STOP_SIGNAL_NAMES), device=self.device)
        if stop in STOP_SIGNAL_NAMES:
            flags[STOP_SIGNAL_NAMES.index(stop)].fill_(1.0)
        packed = torch.cat([torch.stack([sums[k] for k in names]
                                        + [num_fg, torch.full((), float(num_images), device=self.device)]), flags])
        packed = all_reduce_sum(packed)  # no-op in one process
        loss_divisor = world
        if d_est is not None:
            d_true = self.model.step_normalizer(packed[len(names)], packed[len(names) + 1])
            grads = [p.grad for p in self.params if p.grad is not None]
            # DDP averaged the gradients over ranks; the step's loss is their sum over d_true
            torch._foreach_mul_(grads, (d_est * world / d_true).to(grads[0].dtype))
            loss_divisor = d_true
        means = torch.cat([packed[:num_losses] / loss_divisor, packed[num_losses:len(names)] / world])
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        # the global gradient norm (clipped when set) also tells a NaN gradient apart
        max_norm = self.clip_grad_norm if self.clip_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        # one host sync per step, for logging, the finiteness check and stop requests
        numbers = torch.cat([means, packed[-len(STOP_SIGNAL_NAMES):], grad_norm.reshape(1).float()]).tolist()
        values = dict(zip(names, numbers[:len(names)]))
        values["loss"] = sum(v for k, v in values.items() if k.startswith("loss"))
        values["grad_norm"] = numbers[-1]
        agreed = next((name for name, count in zip(STOP_SIGNAL_NAMES, numbers[len(names):-1]) if count), None)
        kind = classify_step(math.isfinite(values["loss"]), math.isfinite(values["grad_norm"]),
                             self.scaler.is_enabled())
        if kind == "ok":
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        # a non-finite loss or gradient never reaches the weights (with fp16 the scaler also lowers its scale)
        return StepResult(values if kind == "ok" else {}, kind, agreed, values)
