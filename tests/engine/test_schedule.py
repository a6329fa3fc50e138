import io
import math

import pytest
import torch

from detkit.config.schema import SolverConfig
from detkit.engine import build_optimizer, build_scheduler, iterations, lr_factor, scaled_lr


def _factor(step, **overrides):
    kwargs = dict(max_iter=1000, schedule="step", steps=(600, 800), gamma=0.1, warmup_iters=100,
                  warmup_factor=0.001)
    kwargs.update(overrides)
    return lr_factor(step, **kwargs)


def test_iterations_converts_epochs_and_keeps_iterations():
    assert iterations(90_000, "iterations", 7330) == 90_000
    assert iterations(12, "epochs", 7330) == 87_960
    assert iterations(1, "epochs", 3) == 3
    with pytest.raises(ValueError, match="iters_per_epoch"):
        iterations(12, "epochs", 0)
    with pytest.raises(ValueError, match="unit"):
        iterations(12, "steps", 10)


def test_scaled_lr_is_linear_in_batch():
    assert scaled_lr(0.02, 16, 16) == pytest.approx(0.02)
    assert scaled_lr(0.02, 8, 16) == pytest.approx(0.01)
    assert scaled_lr(0.01, 64, 16) == pytest.approx(0.04)


def test_warmup_is_linear_from_warmup_factor_to_one():
    assert _factor(0) == pytest.approx(0.001)
    assert _factor(50) == pytest.approx(0.001 * 0.5 + 0.5)
    assert _factor(99) == pytest.approx(0.001 * 0.01 + 0.99)
    assert _factor(100) == 1.0
    assert _factor(0, warmup_iters=0) == 1.0


def test_step_decay_at_milestones():
    assert [_factor(s) for s in (599, 600, 799, 800, 5000)] == pytest.approx([1.0, 0.1, 0.1, 0.01, 0.01])
    # a milestone inside the warmup multiplies the warmup factor
    assert _factor(50, steps=(40,)) == pytest.approx(0.1 * (0.001 * 0.5 + 0.5))


def test_cosine_endpoints_and_midpoint():
    cosine = dict(schedule="cosine", warmup_iters=0)
    assert _factor(0, **cosine) == 1.0
    assert _factor(500, **cosine) == pytest.approx(0.5)
    assert _factor(250, **cosine) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert _factor(1000, **cosine) == pytest.approx(0.0, abs=1e-12)
    assert _factor(1500, **cosine) == pytest.approx(0.0, abs=1e-12)  # stays at 0 past the end
    with pytest.raises(ValueError, match="schedule"):
        _factor(0, schedule="poly")


def _solver_and_optimizer(**solver_kwargs):
    solver = SolverConfig(base_lr=0.1, **solver_kwargs)
    optimizer = build_optimizer(torch.nn.Linear(2, 2), solver, lr=solver.base_lr)
    return solver, optimizer


def test_build_scheduler_counts_epochs_in_steps():
    # 10 steps per epoch: milestones at 80 and 110, end at 120; warmup is always in steps
    solver, optimizer = _solver_and_optimizer(unit="epochs", max_length=12, steps=(8, 11), warmup_iters=10,
                                              warmup_factor=0.01)
    scheduler = build_scheduler(optimizer, solver, iters_per_epoch=10)
    lrs = []
    for _ in range(120):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.1 * 0.01)
    assert lrs[5] == pytest.approx(0.1 * (0.01 * 0.5 + 0.5))
    assert lrs[10] == pytest.approx(0.1)
    assert lrs[79] == pytest.approx(0.1) and lrs[80] == pytest.approx(0.01)
    assert lrs[109] == pytest.approx(0.01) and lrs[110] == pytest.approx(0.001)
    assert all(group["lr"] == pytest.approx(0.001) for group in optimizer.param_groups)


def test_scheduler_state_dict_round_trips_through_weights_only_load():
    solver, optimizer = _solver_and_optimizer(schedule="cosine", max_length=100, warmup_iters=10)
    scheduler = build_scheduler(optimizer, solver, iters_per_epoch=1)
    for _ in range(37):
        optimizer.step()
        scheduler.step()
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    solver2, optimizer2 = _solver_and_optimizer(schedule="cosine", max_length=100, warmup_iters=10)
    resumed = build_scheduler(optimizer2, solver2, iters_per_epoch=1)
    resumed.load_state_dict(state)
    assert resumed.last_epoch == 37
    for _ in range(5):
        optimizer.step()
        scheduler.step()
        optimizer2.step()
        resumed.step()
        assert resumed.get_last_lr() == pytest.approx(scheduler.get_last_lr())
    assert resumed.get_last_lr()[0] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 42 / 100)))
