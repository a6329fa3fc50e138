"""`detkit benchmark`: one config's training speed and memory, inference fps, size and AP, as a JSON record.

Everything runs in one process, in this order: size (`flops.measure`), training (the trainer's own `TrainStep`
on synthetic batches of the loader's exact sizes), inference (eval mode, `inference_mode`, the config's autocast)
over a sweep of batch sizes, and AP when weights and a readable val split are given. The training model always
starts from random weights (speed does not depend on them); the inference model loads `--weights` when given, so
that post-processing sees the detections a trained model makes.

Timing excludes the warm-up and synchronises the device only at the edges of the timed window (see
`measure_loop`); the record (`schema: 1`) holds the device, versions, git commit and config hash beside the
figures, and `markdown_row` renders it in the seed model zoos' columns.
"""
from __future__ import annotations

import gc
import logging
import math
import platform
import resource
import statistics
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from itertools import cycle
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..config import Config, ConfigError
from ..data.loader import Batch, ImageMeta, collate
from ..data.synth import CATEGORIES, SynthSpec, render_image
from ..data.transforms import Sample, TransformPipeline, resize
from ..modeling.fold import FoldReport
from ..utils.progress import progress_bar
from .compile import compile_model
from .flops import input_size, measure, resolve_num_classes
from .inference import autocast, load_detector, prepare_for_inference, resolve_amp
from .environment import environment
from .zoo import GIB, SCHEMA, config_hash, describe, markdown_row

logger = logging.getLogger("detkit.benchmark")

MAX_RENDERS = 8  # distinct synthetic images, tiled up to the batch size
TRAIN_BATCHES = 4  # at most this many distinct training batches (resize_short shapes vary between them)
FIT_FRACTION = 0.8  # a CPU training batch must fit in this share of the available memory
# (warm-up, timed iterations) by device and phase
DEFAULT_ITERS = {("cuda", "train"): (5, 20), ("cuda", "inference"): (10, 50),
                 ("cpu", "train"): (1, 2), ("cpu", "inference"): (1, 3)}
DEFAULT_BATCH_SIZES = {"cuda": (1, 2, 4, 8, 16, 32, 64), "cpu": (1, 2)}


@dataclass
class BenchmarkOptions:
    """What `run_benchmark` measures, and how (the `detkit benchmark` options).

    Attributes:
        config_path, overrides: where the config came from (recorded; the config itself is passed built).
        weights: a checkpoint or weights file: inference runs on it and AP is measured when the val split exists.
        device: "cpu", "cuda", "cuda:1" or "auto"; default: the config's runtime.device.
        iters, warmup: timed and warm-up iterations of each phase; default by device (see DEFAULT_ITERS).
        train_batch: images per training step; default: data.batch_size, reduced on CPU to what fits in memory.
        batch_sizes: inference batch sizes to sweep; default by device (see DEFAULT_BATCH_SIZES).
        size: (height, width) replacing the config's train and test sizes (small runs and tests).
        train, inference: run these phases.
        eval_images: evaluate AP on the first N val images only (recorded as a subset).
        command: the command line, for the record.
    """

    config_path: str = ""
    overrides: Sequence[str] = ()
    weights: str | None = None
    device: str | None = None
    iters: int | None = None
    warmup: int | None = None
    train_batch: int | None = None
    batch_sizes: Sequence[int] | None = None
    size: tuple[int, int] | None = None
    train: bool = True
    inference: bool = True
    eval_images: int | None = None
    command: str = ""


# --- timing ------------------------------------------------------------------------------------------------------

@dataclass
class Timing:
    """A timed window of `iters` steps after `warmup` untimed ones.

    Attributes:
        seconds: wall time of the window, from one device synchronisation to the next.
        per_iter: each step's duration (CUDA events on a GPU, the clock on a CPU); for the median and p90 only,
            the headline is `seconds / iters`.
    """

    warmup: int
    iters: int
    seconds: float
    per_iter: list[float] = field(default_factory=list)

    @property
    def per_step(self) -> float:
        return self.seconds / self.iters

    @property
    def median(self) -> float | None:
        return statistics.median(self.per_iter) if self.per_iter else None

    @property
    def p90(self) -> float | None:
        if not self.per_iter:
            return None
        ordered = sorted(self.per_iter)
        return ordered[math.ceil(0.9 * len(ordered)) - 1]  # nearest rank

    @property
    def unsteady(self) -> bool | None:
        """The medians of the window's two halves differ by more than 10% (None under two iterations)."""
        if len(self.per_iter) < 2:
            return None
        half = len(self.per_iter) // 2
        first, second = statistics.median(self.per_iter[:half]), statistics.median(self.per_iter[half:])
        return abs(first - second) > 0.1 * min(first, second)


class CudaEvents:
    """Per-iteration marks as recorded CUDA events: they do not synchronise; read them after the window."""

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @staticmethod
    def durations(marks: list) -> list[float]:
        return [a.elapsed_time(b) / 1000 for a, b in zip(marks, marks[1:])]


def measure_loop(step: Callable[[], object], warmup: int, iters: int, sync: Callable[[], None],
                 clock: Callable[[], float] = time.perf_counter, events: CudaEvents | None = None,
                 after_warmup: Callable[[], None] | None = None) -> Timing:
    """Time `iters` calls of `step` after `warmup` untimed ones.

    `sync` (`torch.cuda.synchronize`, a no-op on a CPU) runs once before the clock starts and once before it
    stops, never inside the window: a per-iteration synchronisation would serialise the host's kernel launches
    with the device's work and understate throughput.

    Args:
        step: one iteration.
        warmup, iters: untimed and timed iterations (iters >= 1).
        sync: waits for the device's queued work.
        clock: seconds.
        events: on CUDA, per-iteration marks that cost no synchronisation; default: the clock (exact on a CPU,
            where every step has finished when it returns).
        after_warmup: called after the warm-up's synchronisation, before the clock starts (e.g. to reset the
            memory peaks).

    Returns:
        the window's wall time and per-iteration durations.
    """
    if iters < 1 or warmup < 0:
        raise ValueError(f"need iters >= 1 and warmup >= 0, got {iters} and {warmup}")
    for _ in range(warmup):
        step()
    sync()
    if after_warmup is not None:
        after_warmup()
    start = clock()
    marks = [events.mark() if events is not None else start]
    for _ in range(iters):
        step()
        marks.append(events.mark() if events is not None else clock())
    sync()
    seconds = clock() - start
    if events is not None:
        per_iter = events.durations(marks)
    else:
        per_iter = [b - a for a, b in zip(marks, marks[1:])]
    return Timing(warmup, iters, seconds, per_iter)


def device_sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


# --- memory ------------------------------------------------------------------------------------------------------

class CudaMemory:
    """Peak CUDA memory of a phase, and of its steady state (after `steady()`, called when the warm-up ends)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._early = (0, 0)

    def start(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def steady(self) -> None:
        self._early = (torch.cuda.max_memory_allocated(self.device), torch.cuda.max_memory_reserved(self.device))
        torch.cuda.reset_peak_memory_stats(self.device)

    def result(self) -> dict:
        allocated = torch.cuda.max_memory_allocated(self.device)
        reserved = torch.cuda.max_memory_reserved(self.device)
        return {"kind": "cuda", "peak_allocated": max(allocated, self._early[0]),
                "peak_reserved": max(reserved, self._early[1]), "steady_allocated": allocated,
                "steady_reserved": reserved}


def _status_kib(field_name: str) -> int | None:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM), None where there is no such file."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class RssMemory:
    """Peak resident memory of this process over a phase.

    Linux resets the peak (VmHWM) to the current RSS when 5 is written to /proc/self/clear_refs, which gives the
    peak of the phase alone; elsewhere the peak is `ru_maxrss`, the peak since the process started.
    """

    def __init__(self):
        self.baseline, self.method = 0, "ru_maxrss"

    def start(self) -> None:
        self.baseline = (_status_kib("VmRSS") or 0) * 1024
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "clear_refs" if _status_kib("VmHWM") is not None else "ru_maxrss"
        except OSError:
            self.method = "ru_maxrss"

    def steady(self) -> None:
        pass

    def result(self) -> dict:
        if self.method == "clear_refs":
            peak = _status_kib("VmHWM") * 1024
        else:  # kilobytes on Linux, bytes on macOS
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if platform.system() == "Darwin" else 1024)
        return {"kind": "rss", "peak_rss": peak, "baseline_rss": self.baseline, "method": self.method}


def memory_probe(device: torch.device) -> CudaMemory | RssMemory:
    return CudaMemory(device) if device.type == "cuda" else RssMemory()


def available_memory() -> int:
    """Bytes this process may still grow by, plus what it holds: MemAvailable and VmRSS (0 where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    except OSError:
        return 0
    return info.get("MemAvailable", 0) + (_status_kib("VmRSS") or 0) * 1024


def fit_train_batch(config_batch: int, probe: Callable[[int], int], available: int,
                    fraction: float = FIT_FRACTION) -> tuple[int, str | None, dict]:
    """The largest training batch, up to the config's, whose peak memory fits in `fraction` of `available`.

    The peak is extrapolated linearly from probe steps at batch 1 and 2 (which also warm the model up).

    Args:
        config_batch: data.batch_size.
        probe: runs one training step at a batch and returns its peak memory in bytes.
        available: the bytes the process may use (see `available_memory`).

    Returns:
        (batch, why it differs from the config's or None, {"probe_peaks", "per_image", "predicted"}).
    """
    peaks = {b: int(probe(b)) for b in (1, 2)}
    per_image = max(peaks[2] - peaks[1], 1)
    fixed = peaks[1] - per_image
    predicted = fixed + per_image * config_batch
    info = {"probe_peaks": {str(b): p for b, p in peaks.items()}, "per_image": per_image, "predicted": predicted}
    budget = fraction * available
    if predicted <= budget:
        return config_batch, None, info
    batch = int(max(1, min(config_batch, (budget - fixed) // per_image)))
    reason = (f"data.batch_size {config_batch} would need about {predicted / GIB:.1f} GiB (probe steps at batch 1 "
              f"and 2: {per_image / GIB:.2f} GiB per image), more than {fraction:.0%} of the "
              f"{available / GIB:.1f} GiB available; batch {batch} fits")
    return batch, reason, info


# --- synthetic batches -------------------------------------------------------------------------------------------

def _render_short_side(transform) -> int:
    return transform.output_size if transform.mode == "scale_jitter" else max(transform.short_sizes)


def synthetic_sample(index: int, short_side: int, *, num_classes: int, masks: bool) -> Sample:
    """A synthetic image (5-9 objects, some occluded, sometimes a crowd region) as an untransformed `Sample`.

    Labels are the shape classes taken modulo `num_classes`; crowd regions become ignore boxes; with `masks` each
    object carries its visible part as polygons, as the loader gives them.
    """
    spec = SynthSpec(min_size=short_side, max_size=short_side, min_objects=5, max_objects=9, gray_fraction=0.0,
                     seed=0)
    image, _, annotations = render_image(index, spec)
    index_of = {cat_id: k for k, (cat_id, _) in enumerate(CATEGORIES)}
    boxes, labels, ignore, polygons = [], [], [], []
    for ann in annotations:
        x, y, w, h = ann["bbox"]
        if ann["iscrowd"]:
            ignore.append([x, y, x + w, y + h])
            continue
        boxes.append([x, y, x + w, y + h])
        labels.append(index_of[ann["category_id"]] % num_classes)
        polygons.append([np.asarray(p, np.float32) for p in ann["segmentation"]])
    return Sample(image=image.convert("RGB"), boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
                  labels=np.asarray(labels, np.int64), ignore_boxes=np.asarray(ignore, np.float32).reshape(-1, 4),
                  masks=polygons if masks else None)


def synthetic_batches(cfg: Config, batch: int, count: int, *, train: bool, num_classes: int,
                      exact_size: tuple[int, int] | None = None, samples: list[Sample] | None = None) -> list[Batch]:
    """`count` batches of `batch` synthetic images through the config's transforms and the loader's `collate`.

    At most MAX_RENDERS distinct images are rendered (at the transform's largest short side) and tiled up to the
    batch. Training batches take the training transforms with a seeded rng per image, so resize_short batches
    differ in shape as the loader's do, and hold only landscape or only portrait images when
    data.aspect_ratio_grouping is set.

    Args:
        exact_size: (height, width) every image is resized to before the transforms (inference at one size).
        samples: already rendered samples to reuse.

    Returns:
        CPU batches, in the loader's layout (uint8 images padded as the loader pads them).
    """
    transform_cfg = cfg.data.train_transform if train else cfg.data.test_transform
    pipeline = TransformPipeline(transform_cfg, train=train, min_box_size=cfg.data.min_box_size)
    if samples is None:
        short = _render_short_side(transform_cfg)
        samples = [synthetic_sample(i, short, num_classes=num_classes, masks=cfg.data.load_masks)
                   for i in range(min(MAX_RENDERS, batch * count))]
    # with aspect-ratio grouping the loader never mixes landscape and portrait images in a batch (which would pad
    # both to a square); the batches alternate between the groups, landscape first
    groups = [samples]
    if train and cfg.data.aspect_ratio_grouping:
        landscape = [s for s in samples if s.size[1] >= s.size[0]]
        portrait = [s for s in samples if s.size[1] < s.size[0]]
        groups = [g for g in (landscape, portrait) if g]
    out = []
    for j in range(count):
        group = groups[j % len(groups)]
        items = []
        for i in range(batch):
            sample = group[(j * batch + i) % len(group)]
            if exact_size is not None:
                sample = resize(sample, exact_size[1], exact_size[0])
            rng = np.random.default_rng([0, j, i]) if train else None
            transformed = pipeline(sample, rng)
            meta = ImageMeta(index=i, image_id=i, orig_size=sample.size, affine=transformed.affine)
            items.append((transformed, meta))
        out.append(collate(items, transform_cfg.size_divisibility, pipeline.fixed_size))
    return out


def _to_device(batch: Batch, device: torch.device) -> Batch:
    if device.type == "cuda":
        batch = batch.pin_memory()
    return batch.to(device, non_blocking=True)


def with_size(cfg: Config, size: tuple[int, int]) -> Config:
    """`cfg` with its train and test transforms producing (height, width) images: resize_short gets the short
    side min(size) and max_size max(size); scale_jitter the output_size max(size)."""
    short, long = min(size), max(size)

    def resized(t):
        if t.mode == "scale_jitter":
            return replace(t, output_size=long)
        return replace(t, short_sizes=(short,), max_size=long)

    data = replace(cfg.data, train_transform=resized(cfg.data.train_transform),
                   test_transform=resized(cfg.data.test_transform))
    return replace(cfg, data=data)


# --- the phases --------------------------------------------------------------------------------------------------

def _iters(options: BenchmarkOptions, device: torch.device, phase: str) -> tuple[int, int]:
    warmup, iters = DEFAULT_ITERS[("cuda" if device.type == "cuda" else "cpu", phase)]
    return (warmup if options.warmup is None else options.warmup), (iters if options.iters is None else options.iters)


def build_train_step(cfg: Config, num_classes: int, batch: int, device: torch.device):
    """The trainer's step for one process (`TrainStep`), around a freshly built model, at the LR of `batch`.

    It runs one micro-batch per call: with `solver.accumulate` > 1 a training iteration is that many calls, and
    RetinaNet then uses the step-wide loss normaliser, as the trainer does.
    """
    from ..modeling.build import build_model
    from .optim import build_optimizer
    from .schedule import build_scheduler, scaled_lr
    from .train_step import TrainStep

    rt, solver = cfg.runtime, cfg.solver
    model = build_model(cfg.model, num_classes).to(device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    compile_model(model, rt)
    model.train()
    optimizer = build_optimizer(model, solver, scaled_lr(solver.base_lr, batch, solver.reference_batch_size))
    scheduler = build_scheduler(optimizer, solver, iters_per_epoch=1)  # the schedule's shape does not matter here
    scaler = torch.amp.GradScaler(device.type, enabled=rt.amp == "fp16")
    return TrainStep(model, model, optimizer, scheduler, scaler, device=device, amp=rt.amp, accumulate=1,
                     clip_grad_norm=solver.clip_grad_norm,
                     step_normalized=solver.accumulate > 1 and hasattr(model, "step_normalizer"))


def benchmark_training(cfg: Config, options: BenchmarkOptions, num_classes: int, device: torch.device) -> dict:
    """Time the trainer's step on synthetic batches at the per-device batch, with its peak memory."""
    config_batch = cfg.data.batch_size
    warmup, iters = _iters(options, device, "train")
    # built once, at the learning rate of the asked batch: a batch reduced to fit changes the speed, not the LR's
    step = build_train_step(cfg, num_classes, options.train_batch or config_batch, device)
    compile_seconds = None
    # the warm-up visits every distinct batch shape once, so that no timed step builds new kernels
    count = max(1, min(TRAIN_BATCHES, warmup))
    probing = options.train_batch is None and device.type == "cpu" and config_batch > 2
    # rendered once for every batch below (the batch that fits is at most the config's)
    renders = min(MAX_RENDERS, max(2 if probing else 1, (options.train_batch or config_batch) * count))
    short = _render_short_side(cfg.data.train_transform)
    samples = [synthetic_sample(i, short, num_classes=num_classes, masks=cfg.data.load_masks)
               for i in range(renders)]

    def train_batches(b: int, c: int) -> list[Batch]:
        """What synthetic_batches(cfg, b, c) renders itself: the first min(MAX_RENDERS, b * c) samples."""
        return [_to_device(b_, device) for b_ in synthetic_batches(
            cfg, b, c, train=True, num_classes=num_classes, samples=samples[:min(MAX_RENDERS, b * c)])]

    batch, reason, fit = config_batch, None, None
    if options.train_batch is not None:
        batch = options.train_batch
        reason = None if batch == config_batch else "--train-batch"
    if cfg.runtime.compile:
        # compilation happens in the first step at a shape: an untimed step at each probe batch and at the timed
        # one, so that neither the timing nor the memory probes include it
        start = time.perf_counter()
        for b in sorted({1, 2, batch} if probing else {batch}):
            step(iter(train_batches(b, 1)))
        compile_seconds = time.perf_counter() - start
    if probing:
        # one untimed step first: the optimiser's state (momentum) then exists before either probe, and does not
        # count as memory per image
        step(iter(train_batches(1, 1)))

        def probe(b: int) -> int:
            batches = train_batches(b, 1)
            memory = RssMemory()
            memory.start()
            step(iter(batches))
            return memory.result()["peak_rss"]

        batch, reason, fit = fit_train_batch(config_batch, probe, available_memory())
    batches = train_batches(batch, count)
    stream = cycle(batches)
    kinds: list[str] = []
    memory = memory_probe(device)
    memory.start()
    timing = measure_loop(lambda: kinds.append(step(stream).kind), warmup, iters, device_sync(device),
                          events=CudaEvents() if device.type == "cuda" else None, after_warmup=memory.steady)
    shapes = sorted({tuple(b.images.shape[-2:]) for b in batches})  # padded (height, width) of the batches
    result = {"batch": batch, "config_batch": config_batch, "config_accumulate": cfg.solver.accumulate,
              "batch_reason": reason, "image_sizes": [list(hw) for hw in shapes],
              "warmup": warmup, "iters": iters, "s_per_iter": timing.per_step, "s_per_iter_median": timing.median,
              "s_per_iter_p90": timing.p90, "img_per_s": batch / timing.per_step, "unsteady": timing.unsteady,
              "bad_steps": sum(k != "ok" for k in kinds), "compile_seconds": compile_seconds,
              "memory": memory.result()}
    if fit is not None:
        result["fit"] = fit
    return result


def inference_sweep(run_at: Callable[[int], Timing], batch_sizes: Sequence[int],
                    on_oom: Callable[[], None] = lambda: None) -> tuple[list[dict], dict | None]:
    """Time inference at each batch size in turn.

    The sweep stops at the first out-of-memory error (recorded as `{"batch", "error": "oom"}`, after `on_oom`
    frees the cache) or after two sizes in a row slower than the best so far.

    Args:
        run_at: times the model at one batch size.

    Returns:
        (one entry per batch size tried, the best {"batch", "fps"} or None).
    """
    per_batch, best, slower = [], None, 0
    for batch in batch_sizes:
        try:
            timing = run_at(batch)
        except (torch.OutOfMemoryError, MemoryError):
            on_oom()
            per_batch.append({"batch": batch, "error": "oom"})
            break
        fps = batch / timing.per_step
        per_batch.append({"batch": batch, "fps": fps, "s_per_batch": timing.per_step,
                          "s_per_batch_median": timing.median, "iters": timing.iters})
        if best is None or fps > best["fps"]:
            best, slower = {"batch": batch, "fps": fps}, 0
        else:
            slower += 1
            if slower == 2:
                break
    return per_batch, best


def benchmark_inference(cfg: Config, options: BenchmarkOptions, model: torch.nn.Module, num_classes: int,
                        device: torch.device, fold_report: FoldReport | None = None) -> dict:
    """Frames per second of `model` (in eval mode, post-processing included) at each batch size.

    The images are synthetic, resized to the config's test size (`flops.input_size`: the size MACs are counted
    at) and already on the device.

    Args:
        fold_report: what `prepare_for_inference` folded in `model` (None: folding was off).

    Returns:
        the record's "inference" entry: "image_size" (padded), "per_batch", "fps_batch1" and "best".
    """
    warmup, iters = _iters(options, device, "inference")
    sizes = options.batch_sizes or DEFAULT_BATCH_SIZES["cuda" if device.type == "cuda" else "cpu"]
    (h, w), padded, _ = input_size(cfg.data.test_transform)
    short = _render_short_side(cfg.data.test_transform)
    samples = [synthetic_sample(i, short, num_classes=num_classes, masks=False)
               for i in range(min(MAX_RENDERS, max(sizes)))]
    model.eval()
    fold = None if fold_report is None else {"folded": fold_report.folded, "kept": fold_report.kept}

    def run_at(batch: int) -> Timing:
        data = _to_device(synthetic_batches(cfg, batch, 1, train=False, num_classes=num_classes,
                                            exact_size=(h, w), samples=samples)[0], device)

        def forward():
            with torch.inference_mode(), autocast(device, cfg.runtime.amp):
                model(data.images, data.image_sizes, image_scales=data.image_scales)

        if cfg.runtime.compile:
            forward()  # compiles at this batch's shape, untimed whatever --warmup says
        timing = measure_loop(forward, warmup, iters, device_sync(device),
                              events=CudaEvents() if device.type == "cuda" else None)
        logger.info("inference at batch %d: %.1f images/s", batch, batch / timing.per_step)
        return timing

    per_batch, best = inference_sweep(run_at, sizes,
                                      on_oom=torch.cuda.empty_cache if device.type == "cuda" else lambda: None)
    fps1 = next((e["fps"] for e in per_batch if e["batch"] == 1 and "fps" in e), None)
    return {"image_size": list(padded), "fold_bn": fold, "warmup": warmup, "iters": iters, "per_batch": per_batch,
            "fps_batch1": fps1, "best": best}


class _FirstImages(torch.utils.data.Dataset):
    """The first `n` images of a DetectionDataset (same transform and reader), for a subset evaluation."""

    def __init__(self, dataset, n: int):
        self.dataset, self.n, self.transform, self.coco = dataset, n, dataset.transform, dataset.coco

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key):
        return self.dataset[key]


def benchmark_accuracy(cfg: Config, model: torch.nn.Module, categories: list[dict], weights: str,
                       device: torch.device, eval_images: int | None = None) -> dict:
    """COCO box (and mask) AP of `model` on the config's val split, or on its first `eval_images` images."""
    from ..data.loader import build_dataset, build_test_loader
    from ..evaluation.coco_eval import evaluate
    from .checkpoint import file_sha256
    from .inference import evaluate_model

    dataset = build_dataset(cfg.data, "val")
    subset = eval_images is not None and eval_images < len(dataset)
    view = _FirstImages(dataset, eval_images) if subset else dataset
    # evaluate_model detects and maps back to the original images; the scoring below restricts it to the subset
    with build_test_loader(view, cfg.data, pin_memory=device.type == "cuda") as loader:
        detected = evaluate_model(model, dataset, loader, device, amp=cfg.runtime.amp, iou_types=(),
                                  category_ids=np.array([c["id"] for c in categories]))
    image_ids = [int(i) for i in dataset.coco.image_ids[:len(view)]] if subset else None
    out = {"annotations": cfg.data.val.annotations, "weights": str(weights), "weights_sha256": file_sha256(weights),
           "images": len(view), "subset": subset}
    for iou_type in cfg.eval.iou_types:
        result = evaluate(dataset.coco.annotation_file, detected["results"], iou_type, image_ids=image_ids)
        # fractions, as everywhere in detkit; COCO's undefined metrics (-1, e.g. AP small without small objects)
        # are null, not values
        out[iou_type] = {"AP": float(result.stats[0]),
                         "stats": [float(s) if s >= 0 else None for s in result.stats], "summary": result.summary}
    return out


# --- the record --------------------------------------------------------------------------------------------------

def run_benchmark(cfg: Config, options: BenchmarkOptions) -> dict:
    """Measure `cfg` (size, training, inference, AP) and return its schema-1 record (see the module docstring).

    Args:
        cfg: the config, overrides applied.
        options: what to measure.

    Returns:
        the record, its "markdown_row" included; nothing is written.
    """
    from .trainer import resolve_device

    device = resolve_device(options.device or cfg.runtime.device)
    stem = Path(options.config_path).stem if options.config_path else cfg.name
    labels = describe(cfg, stem)
    digest = config_hash(cfg)
    full_size_cfg = cfg  # AP is measured at the config's own test size, whatever --size says
    if options.size is not None:
        cfg = with_size(cfg, options.size)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # CUDA events and peak statistics follow the current device
    torch.manual_seed(cfg.runtime.seed)
    num_classes, num_classes_source = resolve_num_classes(cfg)
    record = {"schema": SCHEMA, "command": options.command,
              "timestamp": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), **environment(device)}
    record["config"] = {"path": options.config_path, "name": cfg.name, "overrides": list(options.overrides),
                        "sha256": digest, "arch": cfg.model.arch, "backbone": labels["backbone"],
                        "schedule": labels["schedule"], "num_classes": num_classes,
                        "num_classes_source": num_classes_source}
    record["settings"] = {"amp": resolve_amp(cfg.runtime.amp, device), "channels_last": cfg.runtime.channels_last,
                          "compile": cfg.runtime.compile,
                          "fold_bn": cfg.runtime.fold_bn, "input": "synthetic",
                          # training always starts from a random init; --weights serve inference and AP
                          "init": "random", "inference_weights": bool(options.weights), "seed": cfg.runtime.seed,
                          "size": list(options.size) if options.size else None}
    annotations = cfg.data.val.annotations
    measure_ap = bool(options.weights and annotations and Path(annotations).is_file())
    phases = ["size", *["training"] * options.train, *["inference"] * options.inference, *["accuracy"] * measure_ap]
    # one bar step per phase on a terminal; elsewhere a log line as each phase begins
    with progress_bar(len(phases), "benchmark", unit="phase") as bar:
        def phase(name: str) -> None:
            done = phases.index(name)
            bar.n = done
            bar.set_description(f"benchmark: {name}")
            if bar.disable:
                logger.info("phase %d of %d: %s", done + 1, len(phases), name)

        phase("size")
        record["size"] = measure(cfg, num_classes=num_classes).to_dict()
        logger.info("size: %.2f M parameters, %.1f G MACs at %s", record["size"]["params"] / 1e6,
                    record["size"]["macs"] / 1e9, "x".join(map(str, record["size"]["padded_size"])))

        record["train"] = None
        if options.train:
            phase("training")
            try:
                record["train"] = benchmark_training(cfg, options, num_classes, device)
            except ValueError as e:
                if "more than 1 value per channel" not in str(e) or options.size is None:
                    raise
                raise ConfigError(f"--size {options.size[0]} {options.size[1]} is too small for this model's "
                                  "coarsest level with batch norm in training: use a larger --size (256 for "
                                  "SpineNet)") from None
            except torch.OutOfMemoryError:
                # the record still gets the size and inference figures; the row says what happened
                batch = options.train_batch or cfg.data.batch_size
                logger.error("training at batch %d ran out of device memory; pass --train-batch N with a smaller N",
                             batch)
                record["train"] = {"error": "oom", "batch": batch, "config_batch": cfg.data.batch_size,
                                   "config_accumulate": cfg.solver.accumulate}
            t = record["train"]
            if "error" not in t:
                logger.info("training at batch %d: %.3f s/iter, %.1f images/s", t["batch"], t["s_per_iter"],
                            t["img_per_s"])
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

        model = categories = fold_report = None
        if options.weights:
            model, categories = load_detector(cfg, options.weights, device, prepare=False)
        elif options.inference:  # random weights, prepared for inference as a trained model is
            from ..modeling.build import build_model

            model = build_model(cfg.model, num_classes)
        if model is not None:
            model, fold_report = prepare_for_inference(model, cfg.runtime, device)
        record["inference"] = None
        if options.inference:
            phase("inference")
            record["inference"] = benchmark_inference(cfg, options, model, num_classes, device, fold_report)

        record["accuracy"] = None
        if measure_ap:
            phase("accuracy")
            record["accuracy"] = benchmark_accuracy(full_size_cfg, model, categories, options.weights, device,
                                                    options.eval_images)
        elif options.weights:
            logger.warning("no AP: data.val.annotations (%s) is not readable", annotations or "unset")
        elif annotations and Path(annotations).is_file():
            logger.info("AP needs --weights")
        bar.n = len(phases)
        bar.refresh()
    record["markdown_row"] = markdown_row(record)
    return record
