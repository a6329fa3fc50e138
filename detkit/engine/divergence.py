"""What training does when steps stop being finite: skip a bad step, roll back after several in a row, stop after
too many rollbacks."""
from __future__ import annotations

from typing import Literal

from ..config.schema import DivergenceConfig

StepKind = Literal["ok", "overflow", "bad"]
Action = Literal["ok", "skip", "rollback", "stop"]


class DivergenceError(RuntimeError):
    """Training diverged and could not recover: before its first checkpoint, or after too many rollbacks."""


def classify_step(loss_finite: bool, grads_finite: bool, fp16: bool) -> StepKind:
    """"ok"; "overflow" when fp16 gradients overflowed under a finite loss (the loss scaler recalibrates by itself,
    so this is not divergence); else "bad"."""
    if loss_finite and grads_finite:
        return "ok"
    if loss_finite and fp16:
        return "overflow"
    return "bad"


class DivergenceGuard:
    """Counts consecutive bad steps and rollbacks.

    Args:
        cfg: `solver.divergence`. `max_bad_steps` consecutive bad steps ask for a rollback (0: never, bad steps
            are only skipped); the rollback after `max_rollbacks` asks to stop instead.
    """

    def __init__(self, cfg: DivergenceConfig, rollbacks: int = 0, lr_scale: float = 1.0):
        self.cfg = cfg
        self.consecutive = 0
        self.rollbacks = rollbacks
        self.lr_scale = lr_scale

    def update(self, kind: StepKind) -> Action:
        """The action for a step of this kind."""
        if kind == "ok":
            self.consecutive = 0
            return "ok"
        if kind == "overflow":
            return "skip"
        self.consecutive += 1
        if self.cfg.max_bad_steps and self.consecutive >= self.cfg.max_bad_steps:
            return self.escalate()
        return "skip"

    def escalate(self) -> Action:
        """What training cannot go on without: "rollback" while rollbacks are allowed (max_bad_steps > 0 and fewer
        than max_rollbacks so far), else "stop"."""
        can_roll_back = self.cfg.max_bad_steps > 0 and self.rollbacks < self.cfg.max_rollbacks
        return "rollback" if can_roll_back else "stop"

    def rolled_back(self) -> float:
        """Record a rollback; returns the new learning-rate scale."""
        self.rollbacks += 1
        self.consecutive = 0
        self.lr_scale *= self.cfg.lr_factor
        return self.lr_scale
