"""The training loop: data, model, optimiser, schedule, AMP, checkpoints, evaluation and logging, top to bottom."""
from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..config import Config, dump_yaml, to_dict
from ..data.loader import build_dataset, build_test_loader, build_train_loader
from ..modeling.build import build_model
from .checkpoint import find_last_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .inference import autocast, evaluate_model
from .metrics import MetricMeter, MetricsWriter, plot_loss_curve
from .optim import build_optimizer
from .schedule import build_scheduler, iterations, scaled_lr

logger = logging.getLogger("detkit.train")


def _duration(seconds: float) -> str:
    """Seconds as h:mm:ss."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; otherwise the named device (`cpu`, `cuda`, `cuda:1`)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"runtime.device is {name!r} but CUDA is not available on this machine")
    return device


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def load_model_weights(model: nn.Module, path: str, *, backbone_only: bool = False) -> str:
    """Initialise `model` (or its backbone) from a detkit, torchvision RetinaNet or ImageNet ResNet file."""
    from ..modeling.weights import convert, load_weights, read_state_dict

    state = convert(read_state_dict(path))
    target = model.backbone if backbone_only else model
    if backbone_only:
        state = {k[len("backbone."):] if k.startswith("backbone.") else k: v for k, v in state.items()}
        if hasattr(model, "route_trunk_weights"):  # a C4 detector's res5 stage lives in its box head
            (state, trunk_prefixes), target = model.route_trunk_weights(state), model
    report = load_weights(target, state)
    if target is model and backbone_only:  # only the trunk was offered: the heads are not "missing"
        report.missing = [k for k in report.missing if k.startswith(trunk_prefixes)]
    if report.missing or report.mismatched or report.unexpected:
        logger.warning("%s does not fit the model completely (those tensors keep their initialisation):\n%s",
                       path, report.summary())
    return f"{path}: {len(report.loaded)} tensors loaded"


class Trainer:
    """Train `cfg` from scratch, from weights, or resumed from its output directory.

    Args:
        cfg: the resolved config.
        resume: continue from the last checkpoint in cfg.runtime.output_dir (or from this checkpoint path).
        progress: show a live progress bar.
    """

    def __init__(self, cfg: Config, *, resume: bool | str = False, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        rt, solver, data = cfg.runtime, cfg.solver, cfg.data
        self.out = Path(rt.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(rt.device)
        seed_everything(rt.seed, rt.deterministic)

        self.train_set = build_dataset(data, "train")
        report = self.train_set.coco.report
        if report.num_invalid:
            logger.warning("training set: %s invalid records dropped (run `detkit check-data` for details)",
                           f"{report.num_invalid:,}")
        num_classes = self.train_set.coco.num_classes
        if cfg.model.label_space != "dataset":
            raise ValueError("model.label_space coco91 is for inference with torchvision's weights; training "
                             "uses the dataset's categories (label_space: dataset)")
        if cfg.model.num_classes and cfg.model.num_classes != num_classes:
            raise ValueError(f"model.num_classes is {cfg.model.num_classes} but the training set has "
                             f"{num_classes} categories")
        coco = self.train_set.coco
        self.categories = [{"id": int(i), "name": str(n)} for i, n in zip(coco.category_ids, coco.category_names)]
        self.model = build_model(cfg.model, num_classes).to(self.device)
        if rt.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if cfg.model.backbone.weights:
            logger.info("backbone weights %s", load_model_weights(self.model, cfg.model.backbone.weights,
                                                                   backbone_only=True))
        elif cfg.model.backbone.freeze_at > 0 and not cfg.model.weights:
            logger.warning("model.backbone.freeze_at is %d but no model.backbone.weights are given: the frozen "
                           "layers keep their random initialisation. Set the weights, or freeze_at: 0 to train "
                           "from scratch.", cfg.model.backbone.freeze_at)
        if cfg.model.weights:
            logger.info("model weights %s", load_model_weights(self.model, cfg.model.weights))

        # one optimiser step sees batch_size x accumulate images (x ranks, with DDP)
        self.total_batch = data.batch_size * solver.accumulate
        self.iters_per_epoch = max(1, math.ceil(len(self.train_set) / self.total_batch))
        self.max_iter = iterations(solver.max_length, solver.unit, self.iters_per_epoch)
        self.lr = scaled_lr(solver.base_lr, self.total_batch, solver.reference_batch_size)
        self.optimizer = build_optimizer(self.model, solver, self.lr)
        self.scheduler = build_scheduler(self.optimizer, solver, self.iters_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=rt.amp == "fp16")
        self.iteration, self.best_metric, self.skipped_steps = 0, None, 0

        checkpoint = find_last_checkpoint(self.out) if resume is True else (Path(resume) if resume else None)
        if resume and checkpoint is None:
            logger.info("nothing to resume in %s: starting from scratch", self.out)
        if checkpoint is not None:
            self._resume(checkpoint)
        self.writer = MetricsWriter(self.out)
        # a resumed run continues its metrics; a fresh run in an old folder starts them anew
        self.writer.truncate_after(self.iteration if checkpoint is not None else -1)
        dump_yaml(cfg, self.out / "config.yaml")
        self._val = None

    # -- checkpoints ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "iteration": self.iteration, "best_metric": self.best_metric, "skipped_steps": self.skipped_steps,
                "rng": rng_state(), "config": to_dict(self.cfg), "detkit_version": __version__,
                "categories": self.categories}

    def save(self, name: str | None = None) -> Path:
        path = self.out / (name or f"model_{self.iteration:07d}.pth")
        save_checkpoint(path, self.state_dict(), keep_last=3)
        return path

    def _resume(self, path: Path) -> None:
        state = load_checkpoint(path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.iteration = int(state["iteration"])
        self.best_metric = state.get("best_metric")
        self.skipped_steps = int(state.get("skipped_steps", 0))
        set_rng_state(state["rng"])
        logger.info("resumed from %s at iteration %d", path, self.iteration)

    # -- evaluation ----------------------------------------------------------------------------------------
    def evaluate(self, out_dir: Path | None = None) -> dict:
        if self._val is None:
            val_set = build_dataset(self.cfg.data, "val")
            self._val = (val_set, build_test_loader(val_set, self.cfg.data, pin_memory=self.device.type == "cuda"))
        val_set, loader = self._val
        return evaluate_model(self.model, val_set, loader, self.device, amp=self.cfg.runtime.amp,
                              iou_types=self.cfg.eval.iou_types, out_dir=out_dir, plots=self.cfg.eval.plots,
                              progress=self.progress)

    def _log_evaluation(self, result: dict) -> dict[str, float]:
        values = {}
        for iou_type, r in result["evaluations"].items():
            values.update({f"{iou_type}/{k}": v for k, v in r.metrics.items()})
        values["eval/images_per_second"] = result["images_per_second"]
        self.writer.write(self.iteration, values)
        ap = values.get("bbox/AP")
        if ap is not None and (self.best_metric is None or ap > self.best_metric):
            self.best_metric = ap
        return values

    # -- the loop ------------------------------------------------------------------------------------------
    def train(self) -> dict:
        """Run to the end of the schedule; returns the final evaluation ({} when there is no val split)."""
        cfg, rt, solver = self.cfg, self.cfg.runtime, self.cfg.solver
        loader = build_train_loader(self.train_set, cfg.data, seed=rt.seed,
                                    start_iter=self.iteration * solver.accumulate,
                                    pin_memory=self.device.type == "cuda")
        data_iter = iter(loader)
        smoothed = MetricMeter(window=20)
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.max_iter, initial=self.iteration, desc="train", unit="it", dynamic_ncols=True)
        logger.info("training %s: %d iterations (%d per epoch) of %d images, lr %.4g, on %s",
                    cfg.name or "model", self.max_iter, self.iters_per_epoch, self.total_batch, self.lr,
                    self.device)
        self.model.train()
        last_log = time.perf_counter()
        images_since_log = 0
        try:
            while self.iteration < self.max_iter:
                step_start = time.perf_counter()
                losses = self._step(data_iter)
                self.iteration += 1
                images_since_log += self.total_batch
                smoothed.update(losses)
                if bar is not None and "loss" in smoothed.meters:
                    means = smoothed.medians()
                    bar.set_postfix(loss=f"{means['loss']:.3f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}",
                                    img_s=f"{self.total_batch / (time.perf_counter() - step_start):.1f}",
                                    refresh=False)
                    bar.update()
                if self.iteration % rt.log_period == 0 or self.iteration == self.max_iter:
                    now = time.perf_counter()
                    speed = images_since_log / (now - last_log)
                    lr = self.optimizer.param_groups[0]["lr"]
                    self.writer.write(self.iteration, {**smoothed.medians(), "lr": lr, "images_per_second": speed,
                                                       "skipped_steps": self.skipped_steps})
                    if bar is None and "loss" in smoothed.meters:  # no progress bar: one log line instead
                        eta = (self.max_iter - self.iteration) * self.total_batch / max(speed, 1e-9)
                        logger.info("iteration %d/%d: loss %.4f, lr %.3g, %.1f img/s, eta %s", self.iteration,
                                    self.max_iter, smoothed.medians()["loss"], lr, speed, _duration(eta))
                    last_log, images_since_log = now, 0
                if rt.checkpoint_period and self.iteration % rt.checkpoint_period == 0 \
                        and self.iteration < self.max_iter:
                    self.save()
                if cfg.eval.period and self.iteration % cfg.eval.period == 0 and self.iteration < self.max_iter \
                        and cfg.data.val.annotations:
                    values = self._log_evaluation(self.evaluate())
                    logger.info("iteration %d: bbox AP %.4f", self.iteration, values.get("bbox/AP", float("nan")))
        finally:
            if bar is not None:
                bar.close()
        final_path = self.save("model_final.pth")
        logger.info("saved %s", final_path)
        result = {}
        if cfg.data.val.annotations:
            result = self.evaluate(self.out / "eval")
            self._log_evaluation(result)
        self.writer.close()
        plot_loss_curve(self.out / "metrics.jsonl", self.out / "loss_curve.png")
        return result

    def _step(self, data_iter) -> dict[str, float]:
        """One optimiser step over `accumulate` batches; returns its losses as floats ({} when skipped)."""
        solver, amp = self.cfg.solver, self.cfg.runtime.amp
        totals: dict[str, torch.Tensor] = {}
        for _ in range(solver.accumulate):
            batch = next(data_iter).to(self.device, non_blocking=True)
            with autocast(self.device, amp):
                losses = self.model(batch.images, batch.image_sizes, batch.targets, image_scales=batch.image_scales)
            loss = sum(v for k, v in losses.items() if k.startswith("loss")) / solver.accumulate
            self.scaler.scale(loss).backward()
            for k, v in losses.items():
                totals[k] = totals.get(k, 0) + v.detach().float() / solver.accumulate
            totals["loss"] = totals.get("loss", 0) + loss.detach().float()
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        # the global gradient norm (clipped to solver.clip_grad_norm when set) also tells a NaN gradient apart
        max_norm = solver.clip_grad_norm if solver.clip_grad_norm > 0 else float("inf")
        totals["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        names = list(totals)
        # one host sync per step, for logging and the finiteness check
        values = dict(zip(names, torch.stack([torch.as_tensor(totals[k]).float() for k in names]).tolist()))
        if math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"]):
            self.scaler.step(self.optimizer)
        else:
            # a non-finite loss or gradient must not reach the weights: skip the step and count it (with fp16 the
            # scaler also lowers its scale)
            self.skipped_steps += 1
            logger.warning("iteration %d: non-finite loss or gradient %s, step skipped", self.iteration + 1, values)
            values = {}
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return values
