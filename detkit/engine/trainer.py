"""The training loop: data, model, optimiser, schedule, AMP, checkpoints, evaluation and logging, top to bottom."""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..config import Config, ConfigError, dump_yaml, to_dict
from ..data.coco import DatasetError
from ..data.fingerprint import dataset_fingerprint
from ..data.loader import build_dataset, build_test_loader, build_train_loader, report_skipped, stream_state
from ..data.report import SkipLedger
from ..modeling.build import build_model
from ..utils.progress import progress_bar
from .checkpoint import (BEST, DISK_FULL, FINAL, CheckpointError, load_checkpoint, load_latest_good,
                         non_finite_tensors, remove_stale_temporaries, rng_state, save_checkpoint, set_rng_state)
from .distributed import all_gather_objects, broadcast_object, init_distributed, prepare_model
from .divergence import DivergenceError, DivergenceGuard
from .inference import evaluate_model, resolve_amp
from .signals import StopRequest
from .train_step import TrainStep
from .metrics import MetricMeter, MetricsWriter, plot_loss_curve
from .optim import build_optimizer
from .schedule import build_scheduler, iterations, scaled_lr

logger = logging.getLogger("detkit.train")

# Config keys that may change between a run and its resumption without changing what it computes.
RESUME_SAFE_KEYS = ("name", "runtime.output_dir", "runtime.log_period", "runtime.checkpoint_period",
                    "runtime.keep_checkpoints", "runtime.device", "runtime.dist_timeout_s", "data.num_workers",
                    "data.train.", "data.val.", "data.test_transform.", "data.test_batch_size",
                    "data.max_unreadable_fraction", "solver.divergence.", "eval.")
MAX_FAILED_SAVES = 3  # consecutive periodic saves that may fail (e.g. a full disk) before the run stops
TRACKED_METRIC = "bbox/AP"  # model_best.pth holds the weights that scored highest on it


class _NullWriter:
    """The metrics writer of ranks other than 0: they compute the same values but write nothing."""

    def write(self, iteration: int, values: dict) -> None:
        pass

    def truncate_after(self, iteration: int) -> None:
        pass

    def close(self) -> None:
        pass


def per_rank_seed(seed: int, rank: int) -> int:
    """The torch seed of rank `rank` (> 0 ranks only draw different RPN samples, DropBlock masks, ...)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


class ResumeMismatchError(ConfigError):
    """The run being resumed is not the run that wrote the checkpoint: its config or training set differ."""


class NonFiniteStateError(CheckpointError):
    """The model or optimiser holds NaN or inf: such a state is never written to a checkpoint."""


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and tuples are leaves (compared as lists)."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: _plain(tree)}


def config_differences(old: dict, new: dict, ignore: tuple[str, ...] = RESUME_SAFE_KEYS) -> list[str]:
    """One line per config key whose value differs, `key: old in the checkpoint, new now`, skipping keys that
    start with one of `ignore` (a trailing dot means a whole section)."""
    a, b = _flatten(old), _flatten(new)
    lines = []
    for key in sorted(set(a) | set(b)):
        if any(key == i or (i.endswith(".") and key.startswith(i)) for i in ignore):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            lines.append(f"{key}: {a.get(key, '<absent>')!r} in the checkpoint, {b.get(key, '<absent>')!r} now")
    return lines


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
    """Seed Python, NumPy and torch; with `deterministic`, ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; it must be set before the first CUDA matmul
        if "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
            logger.debug("deterministic: set CUBLAS_WORKSPACE_CONFIG=:4096:8")
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
        resume: continue from the last good checkpoint in cfg.runtime.output_dir, falling back past damaged ones
            (True), or from this checkpoint file.
        progress: show a live progress bar (on a terminal only; redirected output gets periodic log lines).
        allow_changes: resume even when the config, training set or batch layout differ from the checkpoint's
            (each difference is logged as a warning instead of raising `ResumeMismatchError`).
    """

    def __init__(self, cfg: Config, *, resume: bool | str = False, progress: bool = True,
                 allow_changes: bool = False):
        self.cfg, self.progress, self.allow_changes = cfg, progress, allow_changes
        rt, solver, data = cfg.runtime, cfg.solver, cfg.data
        self.out = Path(rt.output_dir)
        self.device = resolve_device(rt.device)
        # under torchrun: one process per GPU (or CPU process with gloo); rank 0 alone logs and writes files
        self.dist = init_distributed(rt, self.device)
        if self.dist.world_size > 1:
            if self.device.type == "cuda":
                self.device = torch.device("cuda", self.dist.local_rank)
            if not self.dist.is_main:
                logging.getLogger("detkit").setLevel(logging.WARNING)
                self.progress = False
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            for path in remove_stale_temporaries(self.out):
                logger.info("removed %s, left behind by an interrupted save", path.name)
        seed_everything(rt.seed, rt.deterministic)

        self.train_set = build_dataset(data, "train")
        report = self.train_set.coco.report
        if report.num_invalid:
            logger.warning("training set: %s invalid records dropped (listed in data_report.json; `detkit "
                           "check-data` explains them)", f"{report.num_invalid:,}")
        # what training leaves out: the reader's records now, images that fail to load as they are drawn
        self.ledger = SkipLedger(len(self.train_set))
        self.ledger.add_report(report)
        self._new_skips: list = []
        num_classes = self.train_set.coco.num_classes
        if cfg.model.label_space != "dataset":
            raise ConfigError("model.label_space coco91 is for inference with torchvision's weights; training "
                              "uses the dataset's categories (label_space: dataset)")
        if cfg.model.num_classes and cfg.model.num_classes != num_classes:
            raise ConfigError(f"model.num_classes is {cfg.model.num_classes} but the training set has "
                              f"{num_classes} categories")
        coco = self.train_set.coco
        self.categories = [{"id": int(i), "name": str(n)} for i, n in zip(coco.category_ids, coco.category_names)]
        self.dataset_info = dataset_fingerprint(coco, filter_empty=data.filter_empty, min_box_size=data.min_box_size,
                                                load_masks=data.load_masks)
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
        # every rank built the same weights (DDP also broadcasts rank 0's); from here on their random streams differ
        if self.dist.world_size > 1:
            torch.manual_seed(per_rank_seed(rt.seed, self.dist.rank))
        # `self.model` is the detector itself; `self._train_model` the DDP wrapper the training steps call
        self._train_model, self.model = prepare_model(self.model, self.dist, rt, self.device)
        # RetinaNet's loss normaliser can span the whole step (all micro-batches and ranks): accumulation and DDP
        # then give the same update as one big batch
        multi_batch_step = solver.accumulate > 1 or self.dist.world_size > 1
        step_normalized = multi_batch_step and hasattr(self.model, "step_normalizer")

        # one optimiser step sees batch_size x accumulate images x ranks
        self.total_batch = data.batch_size * solver.accumulate * self.dist.world_size
        self.iters_per_epoch = max(1, math.ceil(len(self.train_set) / self.total_batch))
        self.max_iter = iterations(solver.max_length, solver.unit, self.iters_per_epoch)
        self.lr = scaled_lr(solver.base_lr, self.total_batch, solver.reference_batch_size)
        self.optimizer = build_optimizer(self.model, solver, self.lr)
        self.scheduler = build_scheduler(self.optimizer, solver, self.iters_per_epoch)
        self._base_lrs = list(self.scheduler.base_lrs)  # before any rollback's lowering
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=rt.amp == "fp16")
        self.train_step = TrainStep(self._train_model, self.model, self.optimizer, self.scheduler, self.scaler,
                                    device=self.device, amp=rt.amp, accumulate=solver.accumulate,
                                    clip_grad_norm=solver.clip_grad_norm, world_size=self.dist.world_size,
                                    step_normalized=step_normalized)
        self.iteration, self.best_metric, self.skipped_steps = 0, None, 0
        # optimiser steps' worth of batches taken from the data stream: the iteration, until a rollback rewinds
        # the iteration but lets the data move on past the batches that diverged
        self.data_position = 0
        self.guard = DivergenceGuard(solver.divergence)
        self._failed_saves = 0
        self._step_kind = "ok"
        self._stop_request: StopRequest | None = None
        self._stop_agreed: str | None = None  # a stop signal one of the ranks got, agreed on in the last step

        checkpoint = None
        if resume is True:
            found = self._choose_checkpoint()
            if found is None:
                logger.info("nothing to resume in %s: starting from scratch", self.out)
            else:
                checkpoint, state = found
                self._resume(checkpoint, state)
        elif resume:
            checkpoint = Path(resume)
            self._resume(checkpoint, load_checkpoint(checkpoint))
        self.writer = MetricsWriter(self.out) if self.dist.is_main else _NullWriter()
        # a resumed run continues its metrics; a fresh run in an old folder starts them anew
        self.writer.truncate_after(self.iteration if checkpoint is not None else -1)
        if self.dist.is_main:
            dump_yaml(cfg, self.out / "config.yaml")
            self.ledger.write(self.out / "data_report.json")
        self._val = None

    def _sync_skips(self) -> None:
        """Gather the images that failed to load since the last call onto rank 0, update data_report.json, and stop
        every rank when too many of the training images are unreadable."""
        every = all_gather_objects(self._new_skips)
        self._new_skips = []
        stop = None
        if self.dist.is_main:
            for entries in every:
                self.ledger.add_skipped(entries)
            if any(every):
                self.ledger.write(self.out / "data_report.json")
            fraction = self.cfg.data.max_unreadable_fraction
            if self.ledger.too_many(fraction):
                n, total = self.ledger.num_unreadable_images, self.ledger.num_images
                stop = (f"{n} of the {total} training images ({n / total:.1%}) could not be read, more than "
                        f"data.max_unreadable_fraction ({fraction:.0%}); they are listed in "
                        f"{self.out / 'data_report.json'}. Check the dataset with `detkit check-data CONFIG` "
                        "(it decodes every image), or raise the limit")
        stop = broadcast_object(stop)
        if stop is not None:
            raise DatasetError(stop)

    def _choose_checkpoint(self, purpose: str = "resume from") -> tuple[Path, dict] | None:
        """The last good checkpoint of the run folder, chosen by rank 0 and loaded by every rank (the folder must
        be shared by all nodes); None when there is none.

        Raises:
            CheckpointError: every checkpoint is damaged (the message lists them), on every rank.
        """
        choice: tuple[str, str] = ("none", "")
        state = None
        if self.dist.is_main:
            try:
                found = load_latest_good(self.out)
            except CheckpointError as e:
                choice = ("error", str(e))
            else:
                if found is not None:
                    path, state, rejected = found
                    for bad, reason in rejected:
                        logger.warning("cannot %s %s (%s); falling back to %s", purpose, bad.name, reason, path.name)
                    choice = ("path", str(path))
        kind, value = broadcast_object(choice)
        if kind == "error":
            raise CheckpointError(value)
        if kind == "none":
            return None
        error = None
        if state is None:  # another rank: load the file rank 0 chose
            try:
                if not Path(value).is_file():
                    raise CheckpointError(f"rank {self.dist.rank} cannot see {value}, which rank 0 chose: every node "
                                          "must see the same run folder (a shared filesystem) to resume or roll back")
                state = load_checkpoint(value)
            except (CheckpointError, OSError) as e:
                error = str(e)
        errors = [e for e in all_gather_objects(error) if e is not None]
        if errors:  # raised on every rank, so none waits for the others in a collective
            raise CheckpointError("; ".join(errors))
        return Path(value), state

    # -- checkpoints ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue bit for bit, in plain values and tensors only (a collective
        with several processes: every rank's random streams are gathered)."""
        rngs = all_gather_objects(rng_state())
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "iteration": self.iteration, "best_metric": self.best_metric, "skipped_steps": self.skipped_steps,
                "rng": rngs[0], "rng_per_rank": rngs, "config": to_dict(self.cfg), "detkit_version": __version__,
                "categories": self.categories,
                "data": stream_state(self.cfg.runtime.seed, self.total_batch, self.data_position),
                "dataset": dict(self.dataset_info), "world_size": self.dist.world_size,
                "rollbacks": self.guard.rollbacks, "lr_scale": self.guard.lr_scale,
                "bad_streak": self.guard.consecutive,
                "unreadable_images": self.ledger.state()}

    def weights_state(self, **extra: Any) -> dict:
        """The model alone, as `model_final.pth` and `model_best.pth` hold it: weights, config, classes and
        `extra` (e.g. the metric that made it the best), no optimiser, schedule or data position."""
        return {"model": self.model.state_dict(), "config": to_dict(self.cfg), "categories": self.categories,
                "detkit_version": __version__, **extra}

    def save(self, name: str | None = None, *, weights: dict | None = None) -> Path:
        """Write a training checkpoint (default `model_{iteration}.pth`) and its checksum, keeping the last K and
        pointing `last_checkpoint` at it; or, given `weights` (a `weights_state`), a weights file such as
        `model_final.pth`, which `--resume` never picks and which the pointer does not name.

        Raises:
            NonFiniteStateError: a weight or optimiser value is NaN or inf; nothing is written.
            OSError: the write failed; the previous checkpoint is intact.
        """
        path = self.out / (name or f"model_{self.iteration:07d}.pth")
        if weights is None:
            self._sync_skips()  # the checkpoint's ledger covers every step it covers
            state = self.state_dict()
        else:
            state = weights
        failure = None
        if self.dist.is_main:  # rank 0 writes; every rank then raises the same error, so all take the same path
            bad = non_finite_tensors(state)
            try:
                if bad:
                    raise NonFiniteStateError(f"refusing to save {path.name}: non-finite values in "
                                              f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
                if weights is None:
                    save_checkpoint(path, state, keep_last=self.cfg.runtime.keep_checkpoints)
                else:
                    save_checkpoint(path, state, pointer=False)
            except (NonFiniteStateError, OSError) as e:
                failure = e
        failure = broadcast_object(failure)
        if failure is not None:
            raise failure
        return path

    def _save_periodic(self) -> bool:
        """A periodic save: a full disk is survived (the previous checkpoint stays) until it fails repeatedly.
        Returns whether the checkpoint was written (the same answer on every rank)."""
        try:
            self.save()
        except OSError as e:
            if e.errno not in DISK_FULL:
                raise
            self._failed_saves += 1
            logger.error("iteration %d: cannot write a checkpoint (%s); the previous one is intact. Training goes on "
                         "and retries at the next period (%d/%d failures).", self.iteration, e.strerror or e,
                         self._failed_saves, MAX_FAILED_SAVES)
            if self._failed_saves >= MAX_FAILED_SAVES:
                raise OSError(e.errno, f"{MAX_FAILED_SAVES} checkpoint saves in a row failed ({e.strerror}); "
                              f"free space in {self.out} and resume with --resume") from e
            return False
        self._failed_saves = 0
        return True

    def _load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.iteration = int(state["iteration"])
        per_rank = state.get("rng_per_rank")
        if per_rank is not None and len(per_rank) == self.dist.world_size:
            set_rng_state(per_rank[self.dist.rank])
        else:  # another number of processes (allowed with allow_changes): rank 0's streams everywhere
            set_rng_state(state["rng"])

    def _apply_lr_scale(self) -> None:
        """The schedule's base LRs times the rollbacks' scale, applied to the current step too."""
        scale = self.guard.lr_scale
        self.scheduler.base_lrs = [b * scale for b in self._base_lrs]
        for group, base, factor in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                       self.scheduler.lr_lambdas):
            group["initial_lr"] = base
            group["lr"] = base * factor(self.scheduler.last_epoch)

    def _resume(self, path: Path, state: dict) -> None:
        if "optimizer" not in state:
            raise CheckpointError(f"cannot resume from {path}: it holds a model's weights only (no optimiser, "
                                  "schedule or data position); resume from the run folder's last training checkpoint "
                                  "(`--resume` alone, or --resume <output_dir>/model_NNNNNNN.pth), or start a new run "
                                  f"from these weights with model.weights={path}")
        self._check_resume_compatibility(state, path)
        self._load_state(state)
        self.best_metric = state.get("best_metric")
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.guard = DivergenceGuard(self.cfg.solver.divergence, int(state.get("rollbacks", 0)),
                                     float(state.get("lr_scale", 1.0)))
        self.guard.consecutive = int(state.get("bad_streak", 0))
        # the images found unreadable up to the checkpoint (later ones are drawn again and found again)
        self.ledger.restore(state.get("unreadable_images", []))
        if self.guard.lr_scale != 1.0:
            self._apply_lr_scale()
        data_state = state.get("data")
        if data_state is None:  # written before detkit recorded the data position
            self.data_position = self.iteration
        else:
            consumed = int(data_state["steps_consumed"])
            old_batch = int(data_state["step_batch"])
            # a changed batch layout (allowed with allow_changes) restarts the stream at the same image
            self.data_position = consumed * old_batch // self.total_batch
        logger.info("resumed from %s at iteration %d", path, self.iteration)

    def _check_resume_compatibility(self, state: dict, path: Path) -> None:
        """Raise `ResumeMismatchError` (or warn, with allow_changes) when `state` comes from a different run."""
        problems = []
        if "config" in state:
            changed = config_differences(state["config"], to_dict(self.cfg))
            if changed:
                problems.append("the config differs from the checkpoint's:\n  " + "\n  ".join(changed))
        old = state.get("dataset")
        new = self.dataset_info
        if old is not None and old.get("fingerprint") != new["fingerprint"]:
            problems.append(
                f"the training set differs from the checkpoint's ({new['images']} images, {new['annotations']} "
                f"annotations, fingerprint {new['fingerprint'][:12]} now; {old.get('images')} images, "
                f"{old.get('annotations')} annotations, fingerprint {str(old.get('fingerprint'))[:12]} in the "
                "checkpoint); resuming would not continue the same run")
        data_state = state.get("data")
        if state.get("world_size", 1) != self.dist.world_size:
            problems.append(f"the run had {state.get('world_size', 1)} processes and now has "
                            f"{self.dist.world_size}; per-process random streams cannot continue exactly")
        if data_state is not None and int(data_state["step_batch"]) != self.total_batch:
            problems.append(f"one step takes {self.total_batch} images now but took {data_state['step_batch']} "
                            "(batch size x accumulation x processes); the data stream cannot continue exactly")
        version = state.get("detkit_version")
        if version is not None and version != __version__:
            logger.warning("%s was written by detkit %s; this is detkit %s", path.name, version, __version__)
        if not problems:
            return
        if self.allow_changes:
            for problem in problems:
                logger.warning("resuming from %s anyway (--allow-changes): %s", path.name, problem)
            return
        raise ResumeMismatchError(f"cannot resume from {path}: " + "\n".join(problems)
                                  + "\npass --allow-changes to resume anyway, or choose another output_dir")

    # -- evaluation ----------------------------------------------------------------------------------------
    def evaluate(self, out_dir: Path | None = None) -> dict:
        """Evaluate on the val split, each rank on its share of the images; rank 0 gathers and scores."""
        if self._val is None:
            val_set = build_dataset(self.cfg.data, "val")
            self._val = (val_set, build_test_loader(val_set, self.cfg.data, rank=self.dist.rank,
                                                    world_size=self.dist.world_size,
                                                    pin_memory=self.device.type == "cuda"))
        val_set, loader = self._val
        return evaluate_model(self.model, val_set, loader, self.device, amp=self.cfg.runtime.amp,
                              iou_types=self.cfg.eval.iou_types, out_dir=out_dir if self.dist.is_main else None,
                              plots=self.cfg.eval.plots, progress=self.progress,
                              gather=self._gather_results if self.dist.world_size > 1 else None)

    def _gather_results(self, results: list) -> list | None:
        """Every rank's detections, concatenated on rank 0 (None on the others)."""
        every = all_gather_objects(results)
        return [r for rank in every for r in rank] if self.dist.is_main else None

    def _log_evaluation(self, result: dict) -> dict[str, float]:
        """Log an evaluation's metrics (fractions, as the COCO block prints them; those COCO leaves undefined, such
        as AP small without small objects, are left out) and write `model_best.pth` when TRACKED_METRIC improves.

        Returns:
            The values logged, "<iou_type>/<metric>" -> value.
        """
        values = {}
        for iou_type, r in result["evaluations"].items():
            values.update({f"{iou_type}/{k}": v for k, v in r.metrics.items()})  # defined metrics only
        values["eval/images_per_second"] = result["images_per_second"]
        self.writer.write(self.iteration, values)
        value = broadcast_object(values.get(TRACKED_METRIC))  # only rank 0 scored: every rank decides the same
        if value is None:
            return values
        saved = False
        if self.best_metric is None or value > self.best_metric:
            saved = self._save_best(value)
            if saved:  # the best recorded is the best written: a failed write is tried again at the next evaluation
                self.best_metric = value
        best = self.best_metric if self.best_metric is not None else float("nan")
        logger.info("iteration %d: %s %.4f (best %.4f%s)", self.iteration, TRACKED_METRIC, value, best,
                    f", saved {BEST}" if saved else "")
        return values

    def _save_best(self, value: float) -> bool:
        """Write `model_best.pth`: the weights that scored `value` on TRACKED_METRIC at this iteration. A full disk
        or non-finite weights cost this file only (the error is logged, training goes on). Returns whether it was
        written."""
        state = self.weights_state(metric=TRACKED_METRIC, value=float(value), iteration=self.iteration)
        try:
            self.save(BEST, weights=state)
        except NonFiniteStateError as e:
            logger.error("iteration %d: %s", self.iteration, e)
            return False
        except OSError as e:
            if e.errno not in DISK_FULL:
                raise
            logger.error("iteration %d: cannot write %s (%s); training goes on", self.iteration, BEST,
                         e.strerror or e)
            return False
        return True

    # -- the loop ------------------------------------------------------------------------------------------
    def train(self) -> dict:
        """Run to the end of the schedule.

        Returns:
            The final evaluation ({} when there is no val split), or {"stopped": "SIGTERM" | "SIGUSR1",
            "iteration": i, "checkpoint": path} when a signal stopped the run after saving.

        Raises:
            DivergenceError: the loss kept diverging (see `solver.divergence`).
        """
        try:
            return self._train()
        finally:
            self.close()

    def close(self) -> None:
        """Stop the evaluation loader's worker processes (the training loader's stop with the loop)."""
        if self._val is not None:
            self._val[1].close()

    def _train(self) -> dict:
        with StopRequest() as stop:
            self._stop_request = stop
            try:
                stopped = self._loop(stop)
            finally:
                self._stop_request = None
        if stopped is not None:
            return stopped
        # the last training checkpoint holds what --resume needs; model_final.pth the weights and config alone
        last_path = self.save()
        final_path = self.save(FINAL, weights=self.weights_state())
        logger.info("saved %s (the weights) and %s (the training state)", final_path, last_path.name)
        if self.dist.is_main and (self.ledger.num_unreadable_images or self.train_set.coco.report.num_invalid):
            logger.warning("%s", self.ledger.summary(self.out / "data_report.json"))
        result = {}
        if self.cfg.data.val.annotations:
            best_before = self.best_metric
            result = self.evaluate(self.out / "eval")
            self._log_evaluation(result)
            if self.best_metric != best_before:  # the training state records the best metric a resume continues
                self.save()
        self.writer.close()
        if self.dist.is_main:
            plot_loss_curve(self.out / "metrics.jsonl", self.out / "loss_curve.png")
        return result

    def _loop(self, stop: StopRequest) -> dict | None:
        """Steps until the end of the schedule (None) or a stop request (the stop's description)."""
        cfg, rt, solver = self.cfg, self.cfg.runtime, self.cfg.solver
        loader = build_train_loader(self.train_set, cfg.data, seed=rt.seed, rank=self.dist.rank,
                                    world_size=self.dist.world_size, accumulate=solver.accumulate,
                                    start_step=self.data_position,
                                    pin_memory=self.device.type == "cuda")
        data_iter = iter(loader)
        smoothed = MetricMeter(window=20)
        amp = resolve_amp(rt.amp, self.device)
        logger.info("training %s: %d iterations (%d per epoch) of %d images, lr %.4g, on %s%s",
                    cfg.name or "model", self.max_iter, self.iters_per_epoch, self.total_batch, self.lr,
                    self.device, "" if amp == "none" else f" with {amp} autocast")
        self._train_model.train()
        last_log = time.perf_counter()
        images_since_log = 0
        saved_at = None
        # a bar on a terminal only (log lines print above it); redirected output gets the periodic log lines
        with progress_bar(self.max_iter, "train", enabled=self.progress, initial=self.iteration) as bar, \
                contextlib.closing(loader):  # the workers end with the loop, not at interpreter exit
            while self.iteration < self.max_iter:
                step_start = time.perf_counter()
                losses = self._step(data_iter)
                self.iteration += 1
                self.data_position += 1
                action = self.guard.update(self._step_kind)
                if action in ("rollback", "stop"):
                    self._rollback(action)
                    smoothed = MetricMeter(window=20)
                    bar.n = self.iteration
                    bar.refresh()
                    continue
                images_since_log += self.total_batch
                smoothed.update(losses)
                if "loss" in smoothed.meters:
                    bar.set_postfix(loss=f"{smoothed['loss'].median:.3f}",
                                    lr=f"{self.optimizer.param_groups[0]['lr']:.2e}",
                                    img_s=f"{self.total_batch / (time.perf_counter() - step_start):.1f}",
                                    refresh=False)
                bar.update()
                if self.iteration % rt.log_period == 0 or self.iteration == self.max_iter:
                    self._sync_skips()
                    now = time.perf_counter()
                    speed = images_since_log / (now - last_log)
                    lr = self.optimizer.param_groups[0]["lr"]
                    medians = smoothed.medians()
                    self.writer.write(self.iteration, {**medians, "lr": lr, "images_per_second": speed,
                                                       "skipped_steps": self.skipped_steps})
                    if bar.disable and "loss" in smoothed.meters:  # no progress bar: one log line instead
                        eta = (self.max_iter - self.iteration) * self.total_batch / max(speed, 1e-9)
                        logger.info("iteration %d/%d: loss %.4f, lr %.3g, %.1f img/s, eta %s", self.iteration,
                                    self.max_iter, medians["loss"], lr, speed, _duration(eta))
                    last_log, images_since_log = now, 0
                # evaluation first: a checkpoint of the same iteration then records the best metric it found
                if cfg.eval.period and self.iteration % cfg.eval.period == 0 and self.iteration < self.max_iter \
                        and cfg.data.val.annotations:
                    self._log_evaluation(self.evaluate())
                if rt.checkpoint_period and self.iteration % rt.checkpoint_period == 0 \
                        and self.iteration < self.max_iter:
                    saved_at = self.iteration if self._save_or_roll_back() else None
                # the stop every rank agreed on in this step's all-reduce (a signal arriving later counts next step)
                if self._stop_agreed is not None and self.iteration < self.max_iter:
                    return self._stop(self._stop_agreed, saved_at)
        return None

    def _stop(self, signal_name: str, saved_at: int | None) -> dict:
        """Save (unless this iteration was just saved), close the logs, and describe the stop."""
        logger.warning("%s received: saving a checkpoint, then stopping", signal_name)
        path = self.out / f"model_{self.iteration:07d}.pth"
        if saved_at != self.iteration:
            path = self.save()
        self.writer.close()
        logger.warning("stopped by %s at iteration %d/%d; checkpoint %s; continue with --resume", signal_name,
                       self.iteration, self.max_iter, path.name)
        return {"stopped": signal_name, "iteration": self.iteration, "checkpoint": str(path)}

    def _save_or_roll_back(self) -> bool:
        """A periodic save; weights that became non-finite are never saved and count as divergence. Returns
        whether the checkpoint was written."""
        try:
            return self._save_periodic()
        except NonFiniteStateError as e:
            # finite losses but non-finite weights (e.g. an overflow in a buffer): training cannot go on from here
            logger.error("iteration %d: %s", self.iteration, e)
            self._rollback(self.guard.escalate(), "the weights became non-finite")
            return False

    def _rollback(self, action: str, reason: str = "") -> None:
        """Go back to the last good checkpoint (action "rollback") or stop with an explanation ("stop").

        Args:
            reason: what went wrong, for the messages (default: the guard's count of non-finite steps).
        """
        div = self.cfg.solver.divergence
        bad_at = self.iteration
        reason = reason or f"{self.guard.consecutive} consecutive non-finite steps"
        if action == "stop":
            raise DivergenceError(
                f"training diverged at iteration {bad_at}: {reason} after {self.guard.rollbacks} rollbacks "
                f"(solver.divergence.max_bad_steps: {div.max_bad_steps}, max_rollbacks: {div.max_rollbacks}). "
                f"The last good checkpoint is in {self.out}; lower solver.base_lr, lengthen solver.warmup_iters or "
                "set solver.clip_grad_norm, then resume with --resume")
        try:
            found = self._choose_checkpoint("roll back to")
        except CheckpointError as e:
            found, problem = None, f" ({e})"
        else:
            problem = ""
        if found is None:
            raise DivergenceError(f"training diverged at iteration {bad_at}, before its first usable checkpoint"
                                  f"{problem}; lower solver.base_lr or lengthen solver.warmup_iters")
        path, state = found
        self._load_state(state)
        scale = self.guard.rolled_back()
        self._apply_lr_scale()
        self.writer.truncate_after(self.iteration)
        logger.warning("iteration %d: %s; rolled back to %s (iteration %d), learning rate x%g (rollback %d of %d); "
                       "the batches that diverged are not replayed", bad_at, reason, path.name, self.iteration, scale,
                       self.guard.rollbacks, div.max_rollbacks)

    def _note_skips(self, batch) -> None:
        """Record (and, for a loader with workers, log) the images skipped to make a training batch."""
        report_skipped(batch, self.cfg.data.num_workers)
        self._new_skips.extend(batch.skipped)

    def _step(self, data_iter) -> dict[str, float]:
        """One optimiser step (see `TrainStep`); returns its losses as floats, averaged over ranks ({} when skipped).

        Sets `self._step_kind` ("ok", "overflow", "bad") and `self._stop_agreed` (a stop signal any rank got).
        """
        stop = self._stop_request.signal_name if self._stop_request is not None else None
        result = self.train_step(data_iter, stop=stop, on_batch=self._note_skips)
        self._step_kind, self._stop_agreed = result.kind, result.stop
        if result.kind != "ok":
            self.skipped_steps += 1
            logger.warning("iteration %d: non-finite loss or gradient %s, step skipped", self.iteration + 1,
                           result.raw)
        return result.values
