"""Training machinery: optimizer, LR schedule, checkpoints and metrics."""
from .checkpoint import (CheckpointError, find_last_checkpoint, load_checkpoint, rng_state, save_checkpoint,
                         set_rng_state)
from .metrics import MetricMeter, MetricsWriter, SmoothedValue, plot_loss_curve
from .optim import build_optimizer
from .schedule import build_scheduler, iterations, lr_factor, scaled_lr

__all__ = ["CheckpointError", "MetricMeter", "MetricsWriter", "SmoothedValue", "build_optimizer", "build_scheduler",
           "find_last_checkpoint", "iterations", "load_checkpoint", "lr_factor", "plot_loss_curve", "rng_state",
           "save_checkpoint", "scaled_lr", "set_rng_state"]
