"""detkit against torchvision on the GPU, side by side in one run: detkit's speed targets, judged.

    python benchmarks/vs_torchvision.py --models retinanet faster mask --modes train infer [--batch 32] \\
        [--size 640] [--precision bf16|fp32] [--rounds 3] [--warmup N] [--iters N] [--override KEY=VALUE ...] \\
        [--allow-cpu] [--out docs/benchmarks.md] [--json PATH]

Same network: detkit's `configs/*-resnet50-fpn-torchvision.yaml` against torchvision's RetinaNet / FasterRCNN /
MaskRCNN built without downloading weights (FrozenBN trunk, conv1 and layer1 frozen); torchvision's random weights
are copied into detkit (`detkit.modeling.weights.convert`) once the parameter counts, all and trainable, agree (a
mismatch aborts with both counts). Training: the same synthetic batches through the same loop (forward, loss sum,
backward, SGD step) under the same autocast, and detkit's own `TrainStep` beside it; inference: batch 1 at
800x1333. Windows (`detkit.engine.benchmark.measure_loop`: a sync only at their edges) alternate between the sides
for `--rounds` rounds; the medians' ratio detkit / torchvision is judged against each target. On CUDA the run writes
the gpu-targets section of docs/benchmarks.md and a JSON record, whose rows for the pairs a later run with the same
settings skips are kept (one model per run fills the table too). Without torchvision, or without CUDA and
`--allow-cpu`, it says why and exits 0 writing nothing; a CPU smoke run (`--allow-cpu --batch 1 --size 128
--rounds 1`) writes only where `--out` / `--json` say.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402 (benchmarks/ is the script dir)

SECTION = "gpu-targets"
RECORDS = common.ROOT / "benchmarks" / "records-vs-torchvision"  # benchmarks/records holds schema-1 records only
NOT_LENT = "not yet measured"  # every measured cell until a GPU run fills it
NOT_RUN = "not measured in this run"
INFER_SIZE = (800, 1333)  # the batch-1 inference size of the targets; both sides pad it to 800x1344
NUM_CLASSES = 91  # COCO's ids, as torchvision's weights and the *-torchvision configs number them
LR = 1e-4  # small: random weights must stay finite over the windows; the speed does not depend on it
TRAIN_BATCHES = 2  # distinct training batches, cycled
DEFAULT_COMMAND = ("python benchmarks/vs_torchvision.py --models retinanet faster mask --modes train infer "
                   "--batch 32 --size 640 --precision bf16 --rounds 3")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config: str
    # detkit settings that make its training do torchvision's work (torchvision keeps 2000 RPN proposals per image
    # in training, detkit's default is detectron2's 1000)
    overrides: tuple[str, ...] = ()


MODELS = {
    "retinanet": ModelSpec("RetinaNet R50-FPN", "configs/retinanet-resnet50-fpn-torchvision.yaml"),
    "faster": ModelSpec("Faster R-CNN R50-FPN", "configs/faster-rcnn-resnet50-fpn-torchvision.yaml",
                        ("model.rpn.post_nms_topk_train=2000",)),
    "mask": ModelSpec("Mask R-CNN R50-FPN", "configs/mask-rcnn-resnet50-fpn-torchvision.yaml",
                      ("model.rpn.post_nms_topk_train=2000",)),
}
MODES = ("train", "infer")
AMP = {"bf16": "bf16", "fp32": "none"}


# --- the targets and the report (pure: tested with fakes) -------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """One of detkit's speed targets: detkit / torchvision >= min_ratio (and >= min_img_per_s for detkit), on a GPU;
    `precision` and `size`, where set, are the settings the target is stated at."""

    model: str
    mode: str
    min_ratio: float
    min_img_per_s: float | None = None
    precision: str | None = None
    size: int | None = None

    def label(self) -> str:
        what = "training" if self.mode == "train" else f"inference, batch 1, {INFER_SIZE[0]}x{INFER_SIZE[1]}"
        if self.size is not None:
            what += f", {self.size}x{self.size}"
        if self.precision is not None:
            what += f", {self.precision}"
        goals = [f">= {self.min_img_per_s:g} img/s"] if self.min_img_per_s is not None else []
        goals.append(f">= {self.min_ratio:g}x torchvision")
        return f"{MODELS[self.model].name} {what}: {' and '.join(goals)}"


TARGETS = (Target("retinanet", "train", 2.0, min_img_per_s=400.0, precision="bf16", size=640),
           Target("faster", "train", 1.5), Target("mask", "train", 1.5),
           *(Target(model, "infer", 1.0) for model in ("retinanet", "faster", "mask")))


@dataclass
class Comparison:
    """One (model, mode): images/s of each side per round (batch 1 in inference: frames/s), peak memory in bytes."""

    model: str
    mode: str
    batch: int
    image_size: tuple[int, int]  # (height, width) before padding
    detkit: list[float]
    torchvision: list[float]
    train_step: list[float] = field(default_factory=list)  # detkit's TrainStep on the same batches (training)
    peak_memory: dict[str, int] = field(default_factory=dict)  # side -> bytes (CUDA only)
    params: dict[str, dict] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return statistics.median(self.detkit) / statistics.median(self.torchvision)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["image_size"] = list(self.image_size)
        out["median"] = {side: statistics.median(v) for side, v in
                         (("detkit", self.detkit), ("torchvision", self.torchvision), ("train_step", self.train_step))
                         if v}
        out["ratio"] = self.ratio
        return out

    @classmethod
    def from_dict(cls, record: dict) -> "Comparison":
        fields = ("model", "mode", "batch", "detkit", "torchvision", "train_step", "peak_memory", "params")
        return cls(**{k: record[k] for k in fields}, image_size=tuple(record["image_size"]))


def with_earlier(comparisons: Sequence[Comparison], earlier: dict | None, settings: dict) -> list[Comparison]:
    """This run's comparisons, plus those of `earlier` (the JSON record of a run with the same settings on the same
    device) for the (model, mode) pairs this run did not measure: one model per run then fills the table too."""
    if not earlier or earlier.get("settings") != settings:
        return list(comparisons)
    done = {(c.model, c.mode) for c in comparisons}
    return [*comparisons, *(Comparison.from_dict(r) for r in earlier.get("results", [])
                            if (r["model"], r["mode"]) not in done)]


def judge(target: Target, comparison: Comparison, *, precision: str, size: int, device_type: str) -> str:
    """"pass", "fail: <what missed>", or "not comparable: <why>" when the run's settings are not the target's."""
    if device_type != "cuda":
        return "not comparable: the targets are for a GPU"
    if target.precision is not None and precision != target.precision:
        return f"not comparable: the target is at {target.precision}, this run at {precision}"
    if target.size is not None and size != target.size:
        return f"not comparable: the target is at {target.size}x{target.size}, this run at {size}x{size}"
    misses = []
    # training is judged on the slower of detkit's two figures: the same plain loop as torchvision's, and the
    # TrainStep `detkit train` runs (clipping, scheduler, its one host read)
    detkit = min(statistics.median(v) for v in (comparison.detkit, comparison.train_step) if v)
    ratio = detkit / statistics.median(comparison.torchvision)
    if ratio < target.min_ratio:
        misses.append(f"{ratio:.2f}x < {target.min_ratio:g}x")
    if target.min_img_per_s is not None and detkit < target.min_img_per_s:
        misses.append(f"{detkit:.1f} img/s < {target.min_img_per_s:g}")
    return "pass" if not misses else "fail: " + "; ".join(misses)


def _cell(values: list[float], memory: int | None, unit: str) -> str:
    text = f"{statistics.median(values):.1f} {unit}"
    return text if memory is None else f"{text}, {memory / 2**30:.1f} GiB"


def target_rows(comparisons: Sequence[Comparison] | None, *, precision: str, size: int,
                device_type: str) -> list[str]:
    """One markdown row per target: | target | detkit | torchvision | ratio | result |; `comparisons=None` (before any
    GPU run) fills every measured cell with NOT_LENT."""
    found = {(c.model, c.mode): c for c in comparisons or ()}
    rows = []
    for target in TARGETS:
        c = found.get((target.model, target.mode))
        if comparisons is None:
            cells = [NOT_LENT, NOT_LENT, NOT_LENT, "-"]
        elif c is None:
            cells = [NOT_RUN, NOT_RUN, NOT_RUN, "-"]
        else:
            unit = "img/s" if c.mode == "train" else "fps"
            detkit = _cell(c.detkit, c.peak_memory.get("detkit"), unit)
            if c.train_step:
                detkit += f" (TrainStep {statistics.median(c.train_step):.1f})"
            cells = [detkit, _cell(c.torchvision, c.peak_memory.get("torchvision"), unit), f"{c.ratio:.2f}x",
                     judge(target, c, precision=precision, size=size, device_type=device_type)]
        rows.append("| " + " | ".join([target.label(), *cells]) + " |")
    return rows


def render_section(comparisons: Sequence[Comparison] | None, *, command: str, machine: str | None,
                   batch: int, size: int, precision: str, rounds: int, device_type: str = "cuda") -> str:
    """The gpu-targets section of docs/benchmarks.md; `comparisons=None` renders it before any GPU run."""
    when = (f"Machine: {machine}; measured {time.strftime('%Y-%m-%d')}." if comparisons is not None else
            f"{NOT_LENT[0].upper()}{NOT_LENT[1:]}: the command above, run on a GPU, fills every cell.")
    rows = "\n".join(target_rows(comparisons, precision=precision, size=size, device_type=device_type))
    return f"""## GPU targets: detkit against torchvision (`python benchmarks/vs_torchvision.py`)

detkit's speed targets on one H200 GPU, measured side by side with torchvision in one run:

    {command}

{when}

Both sides run the same network (R50-FPN, FrozenBN trunk with conv1 and layer1 frozen, 91 classes; the
parameter counts are checked equal before timing) from the same random weights (torchvision's, copied into
detkit).
- Training: the same synthetic batches ({batch} images of {size}x{size}; uint8 for detkit, float / 255 lists for
  torchvision, made before timing; Mask R-CNN's masks as full-image bitmaps for both) through the same loop
  (forward, sum of the losses, backward, SGD step) under {precision}. "TrainStep" is detkit's own training step
  (the config's optimiser and clipping, one host read per step) on the same batches.
- Inference: batch 1 at {INFER_SIZE[0]}x{INFER_SIZE[1]}, eval mode, `inference_mode`, {precision}; detkit's model
  prepared as `detkit eval` prepares it (frozen BN folded). Random weights: post-processing sees few detections
  on either side.
- Timing: each window is warm-up steps, a synchronisation, the timed steps and a synchronisation; the windows
  alternate detkit, torchvision (and TrainStep) for {rounds} rounds. Cells give the medians and the memory
  a window added at its peak in the last round (peak allocated minus the allocation at its start: both sides'
  models, batches and optimiser states stay resident, so this is activations, gradients and workspace);
  ratio = detkit / torchvision.

| target | detkit | torchvision | ratio | result |
|---|---:|---:|---:|---|
{rows}
"""


def write_doc_section(text: str, out: Path) -> Path:
    """Write `text` between the gpu-targets markers of `out` with benchmarks/common.py's section writer."""
    return common.write_section(SECTION, text, doc=Path(out))


# --- the same-architecture check (pure: tested with fakes) --------------------------------------------------------

@dataclass(frozen=True)
class ParamCount:
    total: int
    trainable: int

    def __str__(self) -> str:
        return f"{self.total:,} parameters ({self.trainable:,} trainable)"


def count_parameters(named: Iterable[tuple[str, object]]) -> ParamCount:
    """Parameters of (name, tensor) pairs: all of them, and those that require gradients."""
    tensors = [t for _, t in named]
    return ParamCount(sum(t.numel() for t in tensors), sum(t.numel() for t in tensors if t.requires_grad))


class ArchitectureMismatch(SystemExit):
    """The two sides are not the same network: the script stops before timing (exit status 1, with the message)."""


def check_same_architecture(model: str, detkit: ParamCount, torchvision: ParamCount,
                            torchvision_raw: ParamCount | None = None) -> None:
    """Abort unless detkit's counts equal torchvision's in detkit's layout (`detkit.modeling.weights.convert`: the
    R-CNN classifier gains detkit's unused class-0 row); `torchvision_raw`, its own count, goes in the message."""
    if detkit == torchvision:
        return
    raw = f" (as torchvision lays them out: {torchvision_raw})" if torchvision_raw is not None else ""
    raise ArchitectureMismatch(f"{MODELS[model].name}: not the same architecture, nothing was timed: detkit has "
                               f"{detkit}, torchvision {torchvision} in detkit's layout{raw}")


# --- inputs (pure torch/PIL: tested here) ------------------------------------------------------------------------

def polygons_to_bitmap(polygons: Sequence, height: int, width: int):
    """An object's polygons (flat float arrays x0, y0, x1, y1, ... in pixels) filled into an (height, width) uint8
    bitmap of 0s and 1s (PIL; polygons of fewer than 3 points are skipped)."""
    import numpy as np
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in polygons:
        points = np.asarray(polygon, dtype=np.float64).reshape(-1).tolist()
        if len(points) >= 6:
            draw.polygon(points, fill=1)
    return np.asarray(canvas, dtype=np.uint8)


def prepare_batch(batch, *, bitmaps: bool):
    """A detkit batch ready for both sides: labels shifted to 1..K (torchvision's 0 is background, and detkit's
    coco91 output k is category k too), and with `bitmaps` each object's polygons rasterised at its image's size."""
    from detkit.data.loader import Batch, Targets

    targets = []
    for t, (h, w) in zip(batch.targets, batch.image_sizes.tolist()):
        masks = t.masks
        if bitmaps and masks is not None:
            masks = [m if not isinstance(m, list) else polygons_to_bitmap(m, h, w) for m in masks]
        targets.append(Targets(t.boxes, t.labels + 1, t.ignore_boxes, masks))
    return Batch(batch.images, batch.image_sizes, targets, batch.metas, batch.image_scales)


def torchvision_inputs(batch, device, *, train: bool):
    """torchvision's inputs for a detkit batch (see `prepare_batch`): unpadded float images in [0, 1] on `device`
    and, in training, target dicts (boxes, labels, and masks (N, H, W) uint8 when the batch has bitmaps)."""
    import numpy as np
    import torch

    images, targets = [], []
    for i, (h, w) in enumerate(batch.image_sizes.tolist()):
        images.append(batch.images[i, :, :h, :w].to(device).float().div_(255))
        if not train:
            continue
        t = batch.targets[i]
        target = {"boxes": t.boxes.to(device).float(), "labels": t.labels.to(device)}
        if t.masks is not None:
            stacked = np.stack(t.masks) if len(t.masks) else np.zeros((0, h, w), np.uint8)
            target["masks"] = torch.from_numpy(stacked).to(device)
        targets.append(target)
    return images, (targets if train else None)


# --- timing ------------------------------------------------------------------------------------------------------

def alternate(windows: Mapping[str, Callable[[], tuple[float, int | None]]], rounds: int):
    """Run every window (side -> () -> (images/s, peak bytes or None)) once per round, in order, `rounds` times.
    Returns (side -> images/s per round, side -> the peak of its last round, sides without one left out): by then
    its gradients and optimiser state exist before the window starts, so the peak is the step's own memory."""
    rates: dict[str, list[float]] = {side: [] for side in windows}
    peaks: dict[str, int] = {}
    for _ in range(rounds):
        for side, window in windows.items():
            rate, peak = window()
            rates[side].append(rate)
            if peak is not None:
                peaks[side] = peak
    return rates, peaks


def window_peak(peak: int, at_start: int) -> int:
    """The memory a window itself added: its peak allocation minus what was allocated when it began.

    Both sides' models, optimisers and prepared batches stay on the device for the whole run, so the raw peak of
    one side's window also counts the other side's tensors; the difference does not."""
    return max(0, peak - at_start)


def timed_window(step: Callable[[], object], batch: int, warmup: int, iters: int, device):
    """One window of `step` (see `measure_loop`): (images/s, on CUDA the bytes the window added at its peak, see
    `window_peak`, else None)."""
    import torch

    from detkit.engine.benchmark import CudaEvents, device_sync, measure_loop

    cuda = device.type == "cuda"
    at_start = 0
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        at_start = torch.cuda.memory_allocated(device)
    timing = measure_loop(step, warmup, iters, device_sync(device), events=CudaEvents() if cuda else None)
    peak = window_peak(torch.cuda.max_memory_allocated(device), at_start) if cuda else None
    return batch / timing.per_step, peak


# --- the two sides -----------------------------------------------------------------------------------------------

def detkit_config(model: str, precision: str, overrides: Sequence[str], size: int | None = None):
    """detkit's config for `model`: its *-torchvision config, the spec's and the command line's overrides, amp set
    by `precision`, and with `size` the train and test transforms giving size x size images."""
    from detkit.config import Config, load_config
    from detkit.engine.benchmark import with_size

    spec = MODELS[model]
    cfg = load_config(Config, common.ROOT / spec.config,
                      [*spec.overrides, f"runtime.amp={AMP[precision]}", *overrides])
    return cfg if size is None else with_size(cfg, (size, size))


def build_torchvision(model: str, min_size: int, max_size: int):
    """torchvision's model as its `*_resnet50_fpn` builders make it for COCO weights, none downloaded: ResNet-50
    with FrozenBatchNorm2d (eps 0, as those weights run), conv1 and layer1 frozen (3 trainable layers). Built by
    hand: without weights the builders switch to trainable BatchNorm and all 5 layers."""
    from functools import partial

    from torchvision.models import resnet50
    from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import FrozenBatchNorm2d
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    trunk = resnet50(weights=None, norm_layer=partial(FrozenBatchNorm2d, eps=0.0))
    if model == "retinanet":
        backbone = _resnet_fpn_extractor(trunk, 3, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
        return RetinaNet(backbone, NUM_CLASSES, min_size=min_size, max_size=max_size)
    detector = MaskRCNN if model == "mask" else FasterRCNN
    return detector(_resnet_fpn_extractor(trunk, 3), NUM_CLASSES, min_size=min_size, max_size=max_size)


def build_pair(model: str, cfg, min_size: int, max_size: int):
    """detkit's and torchvision's `model` with the same weights (torchvision's random ones), on the CPU, after the
    same-architecture check; returns (detkit model, torchvision model, {"detkit", "torchvision"} counts)."""
    import torch

    from detkit.modeling.build import build_model
    from detkit.modeling.weights import WeightsError, convert, load_weights

    torch.manual_seed(0)
    tv_model = build_torchvision(model, min_size, max_size)
    detkit_model = build_model(cfg.model, NUM_CLASSES)
    detkit_count = count_parameters(detkit_model.named_parameters())
    tv_raw = count_parameters(tv_model.named_parameters())
    tv_count = count_parameters(convert(dict(tv_model.named_parameters())).items())
    check_same_architecture(model, detkit_count, tv_count, tv_raw)
    report = load_weights(detkit_model, convert(tv_model.state_dict()), skip_mismatched=False)
    if report.unexpected or any(not k.endswith("loss_normalizer") for k in report.missing):
        raise WeightsError(f"torchvision's {model} weights do not fit detkit's model:\n{report.summary()}")
    counts = {"detkit": asdict(detkit_count), "torchvision": {**asdict(tv_raw), "detkit_layout": asdict(tv_count)}}
    return detkit_model, tv_model, counts


def sgd_step(forward_loss: Callable[[object], object], params, batches: Iterable, device, amp: str):
    """One step of the loop both sides share: forward under autocast, loss sum, backward, plain SGD step."""
    import itertools

    import torch

    from detkit.engine.inference import autocast

    optimizer = torch.optim.SGD([p for p in params if p.requires_grad], lr=LR, momentum=0.9, weight_decay=1e-4)
    stream = itertools.cycle(list(batches))

    def step() -> None:
        with autocast(device, amp):
            loss = forward_loss(next(stream))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def compare_training(model: str, args, device) -> Comparison:
    """Training images/s of detkit (plain loop and TrainStep) and torchvision on the same batches."""
    import itertools

    import torch

    from detkit.engine.benchmark import build_train_step, synthetic_batches

    cfg = detkit_config(model, args.precision, args.override, args.size)
    detkit_model, tv_model, params = build_pair(model, cfg, args.size, args.size)
    detkit_model = detkit_model.to(device).train()
    tv_model = tv_model.to(device).train()
    if cfg.runtime.channels_last:  # as the trainer does
        detkit_model = detkit_model.to(memory_format=torch.channels_last)
    batches = [prepare_batch(b, bitmaps=cfg.data.load_masks).to(device) for b in synthetic_batches(
        cfg, args.batch, TRAIN_BATCHES, train=True, num_classes=NUM_CLASSES, exact_size=(args.size, args.size))]
    tv_batches = [torchvision_inputs(b, device, train=True) for b in batches]
    amp = AMP[args.precision]

    def detkit_loss(b):
        losses = detkit_model(b.images, b.image_sizes, b.targets, image_scales=b.image_scales)
        return sum(v for k, v in losses.items() if k.startswith("loss"))

    def tv_loss(inputs):
        return sum(tv_model(*inputs).values())

    train_step = build_train_step(cfg, NUM_CLASSES, args.batch, device)
    trainer_stream = itertools.cycle(batches)
    steps = {"detkit": sgd_step(detkit_loss, detkit_model.parameters(), batches, device, amp),
             "torchvision": sgd_step(tv_loss, tv_model.parameters(), tv_batches, device, amp),
             "train_step": lambda: train_step(trainer_stream)}
    windows = {side: (lambda s=step: timed_window(s, args.batch, args.warmup_train, args.iters_train, device))
               for side, step in steps.items()}
    rates, peaks = alternate(windows, args.rounds)
    return Comparison(model, "train", args.batch, (args.size, args.size), rates["detkit"], rates["torchvision"],
                      rates["train_step"], peaks, params)


def compare_inference(model: str, args, device) -> Comparison:
    """Batch-1 frames/s at 800x1333 of detkit (prepared by `prepare_for_inference`, as eval runs it) and torchvision."""
    import torch

    from detkit.engine.benchmark import synthetic_batches
    from detkit.engine.inference import autocast, prepare_for_inference

    cfg = detkit_config(model, args.precision, args.override)
    detkit_model, tv_model, params = build_pair(model, cfg, *INFER_SIZE)
    detkit_model, _ = prepare_for_inference(detkit_model, cfg.runtime, device)
    tv_model = tv_model.to(device).eval()
    batch = prepare_batch(synthetic_batches(cfg, 1, 1, train=False, num_classes=NUM_CLASSES,
                                            exact_size=INFER_SIZE)[0], bitmaps=False).to(device)
    images, _ = torchvision_inputs(batch, device, train=False)
    amp = AMP[args.precision]

    def detkit_forward():
        with torch.inference_mode(), autocast(device, amp):
            detkit_model(batch.images, batch.image_sizes, image_scales=batch.image_scales)

    def tv_forward():
        with torch.inference_mode(), autocast(device, amp):
            tv_model(images)

    windows = {side: (lambda s=step: timed_window(s, 1, args.warmup_infer, args.iters_infer, device))
               for side, step in (("detkit", detkit_forward), ("torchvision", tv_forward))}
    rates, peaks = alternate(windows, args.rounds)
    h, w = batch.image_sizes[0].tolist()
    return Comparison(model, "infer", 1, (h, w), rates["detkit"], rates["torchvision"], peak_memory=peaks,
                      params=params)


# --- the command -------------------------------------------------------------------------------------------------

def skip_reason(allow_cpu: bool) -> str | None:
    """Why this machine cannot run the comparison (printed, exit 0, nothing written), or None."""
    try:
        importlib.import_module("torchvision")
    except ImportError:
        return ("torchvision is not importable here; this script runs on the GPU machine "
                "(CUDA torch + torchvision). Nothing was measured or written.")
    import torch

    if not torch.cuda.is_available() and not allow_cpu:
        return ("no CUDA device here; this script runs on the GPU machine (--allow-cpu makes a CPU smoke run). "
                "Nothing was measured or written.")
    return None


def parse_args(argv: Sequence[str] | None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--batch", type=int, default=32, help="training images per step (inference: 1)")
    parser.add_argument("--size", type=int, default=640, help="training images are size x size")
    parser.add_argument("--precision", choices=list(AMP), default="bf16")
    parser.add_argument("--rounds", type=int, default=3, help="alternating windows per side; medians reported")
    parser.add_argument("--warmup", type=int, help="untimed steps per window (default: detkit benchmark's)")
    parser.add_argument("--iters", type=int, help="timed steps per window (default: detkit benchmark's)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a detkit config override for both of its figures (e.g. runtime.channels_last=true)")
    parser.add_argument("--allow-cpu", action="store_true", help="run without CUDA (a smoke run of the script)")
    parser.add_argument("--out", type=Path, help="markdown file for the gpu-targets section (default on CUDA: "
                                                 "docs/benchmarks.md; a CPU run writes only where this says)")
    parser.add_argument("--json", type=Path, help="the JSON record (default on CUDA: "
                                                  "benchmarks/records-vs-torchvision/<device>.json)")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.rounds < 1 or args.size < 32:
        parser.error("--batch and --rounds must be >= 1 and --size >= 32")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    reason = skip_reason(args.allow_cpu)
    if reason is not None:
        print(reason)
        return 0
    import torch
    import torchvision

    from detkit.engine.benchmark import BenchmarkOptions, _iters
    from detkit.engine.environment import device_slug, environment
    from detkit.utils.fileio import write_json_atomic

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind = device.type
    counts = BenchmarkOptions(warmup=args.warmup, iters=args.iters)  # the benchmark's defaults and overrides
    args.warmup_train, args.iters_train = _iters(counts, device, "train")
    args.warmup_infer, args.iters_infer = _iters(counts, device, "inference")
    command = "python benchmarks/vs_torchvision.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    env = environment(device)
    gpu = ""
    if kind == "cuda":
        gpu = (f", {env['device']['name']}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    machine = f"{common.machine()}{gpu}, torchvision {torchvision.__version__}"
    print(f"machine: {machine}")

    settings = {"device": env["device"]["name"], "batch": args.batch, "size": args.size,
                "precision": args.precision, "rounds": args.rounds, "overrides": args.override,
                "train": [args.warmup_train, args.iters_train], "infer": [args.warmup_infer, args.iters_infer]}
    comparisons = []
    for model in args.models:
        for mode in args.modes:
            comparison = (compare_training if mode == "train" else compare_inference)(model, args, device)
            print(f"{model} {mode}: images/s detkit {comparison.detkit}, torchvision {comparison.torchvision}"
                  + (f", TrainStep {comparison.train_step}" if comparison.train_step else "")
                  + f"; ratio {comparison.ratio:.2f}x")
            comparisons.append(comparison)
            gc.collect()  # the models of this comparison, before the next one is built
            if kind == "cuda":
                torch.cuda.empty_cache()

    json_path = args.json
    if json_path is None and kind == "cuda":
        json_path = RECORDS / f"{device_slug(env['device'])}.json"
    if json_path is not None and json_path.is_file():
        comparisons = with_earlier(comparisons, json.loads(json_path.read_text()), settings)
    text = render_section(comparisons, command=command, machine=machine, batch=args.batch, size=args.size,
                          precision=args.precision, rounds=args.rounds, device_type=kind)
    print(text)
    verdicts = {f"{t.model}/{t.mode}": judge(t, c, precision=args.precision, size=args.size, device_type=kind)
                for t in TARGETS for c in comparisons if (c.model, c.mode) == (t.model, t.mode)}
    record = {"schema": "vs-torchvision/1", "command": command,
              "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **env,
              "torchvision": torchvision.__version__, "settings": settings,
              "results": [c.to_dict() for c in comparisons], "verdicts": verdicts}
    out = args.out if args.out is not None or kind != "cuda" else common.DOC
    if out is not None:
        print(f"wrote {write_doc_section(text, out)}")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        print(f"wrote {write_json_atomic(record, json_path)}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
