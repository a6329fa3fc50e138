"""How much of a RetinaNet R50-FPN 640x640 training step is spent outside convolutions and matrix products (CPU).

    python benchmarks/step_share.py [--config configs/retinanet-resnet50-fpn-640-3x.yaml] [--batch 2]
        [--variants nchw channels_last channels_last+compile]

Runs the real training step (`TrainStep`, SGD with clipping) on synthetic 640x640 batches through the config's
transforms, times unprofiled steps, then profiles 3 (see `detkit.engine.profiling.op_time_split`), for each
variant: NCHW, channels_last, and channels_last with `runtime.compile` (inductor: the trunk, FPN, head and the
losses over every anchor compiled, their norm, activation, residual and loss passes fused; the warm-up step
compiles). Writes the `step-share` section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import shlex
from itertools import cycle
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_section  # noqa: E402

from detkit.config import Config, load_config  # noqa: E402
from detkit.engine.benchmark import build_train_step, synthetic_batches  # noqa: E402
from detkit.engine.profiling import op_time_split  # noqa: E402


VARIANTS = {"nchw": ("NCHW", False, False), "channels_last": ("channels_last", True, False),
            "channels_last+compile": ("channels_last + compile", True, True)}


def measure(config: str, batch: int, channels_last: bool, compiled: bool, warmup: int, timed: int, active: int):
    cfg = load_config(Config, config, [f"runtime.channels_last={str(channels_last).lower()}", "runtime.amp=none",
                                       f"runtime.compile={str(compiled).lower()}"])
    torch.manual_seed(0)
    batches = synthetic_batches(cfg, batch, 2, train=True, num_classes=91)
    step = build_train_step(cfg, 91, batch, torch.device("cpu"))
    stream = cycle(batches)
    return op_time_split(lambda: step(stream), warmup=warmup, timed=timed, active=active)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/retinanet-resnet50-fpn-640-3x.yaml")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--timed", type=int, default=2)
    parser.add_argument("--active", type=int, default=3)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args()
    rows = []
    for variant in args.variants:
        layout, channels_last, compiled = VARIANTS[variant]
        split = measure(args.config, args.batch, channels_last, compiled, args.warmup, args.timed, args.active)
        print(f"{layout}: {split.format()}", flush=True)
        top = ", ".join(f"{k} {v:.1%}" for k, v in sorted(split.buckets.items(), key=lambda kv: -kv[1])[:4])
        rows.append(f"| {layout} | {split.step_seconds:.2f} | {split.outside:.1%} | {split.outside_unprofiled:.1%} "
                    f"| {top} |")
    text = "\n".join([
        "## Training step outside convolutions and matrix products (CPU)",
        "",
        f"`{shlex.join(['python', 'benchmarks/step_share.py', *sys.argv[1:]])}` on {machine()}, "
        f"{torch.get_num_threads()} threads: "
        f"`{Path(args.config).name}` (trainable BN, fp32), synthetic 640x640 batch of {args.batch}, the real "
        f"`TrainStep` (SGD, clipping); {args.warmup} untimed warm-up step(s), the median of {args.timed} "
        f"unprofiled steps, then {args.active} profiled. "
        "*Outside* is 1 - (time in the outermost aten convolution / convolution_backward / addmm / mm / bmm calls, "
        "from the profiled steps) / wall time: the profiled steps' wall, or the unprofiled steps' (which leaves "
        "the profiler's per-op overhead out of the wall but not out of the convolution time, and carries the "
        "step-to-step noise of a few steps); detkit aims for under 10%. Compiled kernels (fused norms, activations, sums) are "
        "not aten ops: their time is in *unattributed*, the part of *outside* no aten op claims (with Python and "
        "the profiler's own work). *compile* is `runtime.compile: true` (inductor: the trunk, FPN, head and the "
        "losses over every anchor); its warm-up step compiles.",
        "",
        "| variant | s/step | outside (profiled wall) | outside (unprofiled wall) | largest other kinds (share of the "
        "profiled wall) |",
        "|---|---|---|---|---|",
        *rows,
    ])
    print(write_section("step-share", text))


if __name__ == "__main__":
    main()
