"""The training step on its own, as `detkit benchmark` runs it: the same update as the plain recipe."""
import copy

import torch

from detkit.data.loader import build_dataset, build_train_loader
from detkit.engine.optim import build_optimizer
from detkit.engine.schedule import build_scheduler
from detkit.engine.train_step import TrainStep
from detkit.modeling.build import build_model
from run_configs import fast_config


def _parts(cfg, num_classes):
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes)
    optimizer = build_optimizer(model, cfg.solver, 0.01)
    scheduler = build_scheduler(optimizer, cfg.solver, iters_per_epoch=6)
    return model, optimizer, scheduler


def test_one_step_is_forward_backward_clip_and_update(synth_root, tmp_path):
    cfg = fast_config(synth_root, tmp_path)
    dataset = build_dataset(cfg.data, "train")
    batch = next(iter(build_train_loader(dataset, cfg.data, seed=0)))
    model, optimizer, scheduler = _parts(cfg, dataset.coco.num_classes)
    reference = copy.deepcopy(model)
    step = TrainStep(model, model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False),
                     device=torch.device("cpu"), clip_grad_norm=cfg.solver.clip_grad_norm)
    model.train()
    result = step(iter([batch]))
    assert result.kind == "ok" and result.stop is None and set(result.values) >= {"loss", "loss_cls", "grad_norm"}

    # the plain recipe, by hand, on a copy of the same model
    ref_optimizer = build_optimizer(reference, cfg.solver, 0.01)
    ref_scheduler = build_scheduler(ref_optimizer, cfg.solver, iters_per_epoch=6)
    reference.train()
    losses = reference(batch.images, batch.image_sizes, batch.targets, image_scales=batch.image_scales)
    loss = sum(v for k, v in losses.items() if k.startswith("loss"))
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), cfg.solver.clip_grad_norm)
    ref_optimizer.step()
    ref_scheduler.step()
    assert result.values["loss"] == loss.item() and result.values["grad_norm"] == grad_norm.item()
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
    assert optimizer.param_groups[0]["lr"] == ref_optimizer.param_groups[0]["lr"]


def test_a_non_finite_loss_leaves_the_weights_and_reports_bad(synth_root, tmp_path):
    cfg = fast_config(synth_root, tmp_path)
    dataset = build_dataset(cfg.data, "train")
    batch = next(iter(build_train_loader(dataset, cfg.data, seed=0)))
    model, optimizer, scheduler = _parts(cfg, dataset.coco.num_classes)
    before = copy.deepcopy(model.state_dict())
    forward = model.forward

    def nan_loss(*args, **kwargs):
        losses = forward(*args, **kwargs)
        losses["loss_cls"] = losses["loss_cls"] * float("nan")
        return losses

    model.forward = nan_loss
    step = TrainStep(model, model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False),
                     device=torch.device("cpu"))
    model.train()
    result = step(iter([batch]), stop="SIGUSR1")
    assert result.kind == "bad" and result.values == {} and result.stop == "SIGUSR1"
    assert result.raw["loss"] != result.raw["loss"]  # NaN, kept for the log line
    for name, value in model.named_parameters():  # BN statistics saw the batch; no parameter moved
        assert torch.equal(value, before[name]), name
    assert scheduler.last_epoch == 1  # the schedule moves on: a skipped step still counts as an iteration
