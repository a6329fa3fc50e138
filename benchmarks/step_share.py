"""How much of a RetinaNet R50-FPN 640x640 training step is spent outside convolutions and matrix products (CPU).

    python benchmarks/step_share.py [--config configs/retinanet-resnet50-fpn-640-3x.yaml] [--batch 2]

Runs the real training step (`TrainStep`, SGD with clipping) on synthetic 640x640 batches through the config's
transforms, times unprofiled steps, then profiles 3 (see `detkit.engine.profiling.op_time_split`), in NCHW and in
channels_last, and writes the `step-share` section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_section  # noqa: E402

from detkit.config import Config, load_config  # noqa: E402
from detkit.engine.benchmark import build_train_step, synthetic_batches  # noqa: E402
from detkit.engine.profiling import op_time_split  # noqa: E402


def measure(config: str, batch: int, channels_last: bool, warmup: int, timed: int, active: int):
    cfg = load_config(Config, config, [f"runtime.channels_last={str(channels_last).lower()}", "runtime.amp=none"])
    torch.manual_seed(0)
    batches = synthetic_batches(cfg, batch, 2, train=True, num_classes=91)
    step = build_train_step(cfg, 91, batch, torch.device("cpu"))
    index = [0]

    def one_step():
        index[0] += 1
        return step(iter([batches[index[0] % len(batches)]]))

    return op_time_split(one_step, warmup=warmup, timed=timed, active=active)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/retinanet-resnet50-fpn-640-3x.yaml")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--timed", type=int, default=2)
    parser.add_argument("--active", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for channels_last in (False, True):
        split = measure(args.config, args.batch, channels_last, args.warmup, args.timed, args.active)
        layout = "channels_last" if channels_last else "NCHW"
        print(f"{layout}: {split.format()}", flush=True)
        top = ", ".join(f"{k} {v:.1%}" for k, v in sorted(split.buckets.items(), key=lambda kv: -kv[1])[:4])
        rows.append(f"| {layout} | {split.step_seconds:.2f} | {split.outside:.1%} | {split.outside_unprofiled:.1%} "
                    f"| {top} |")
    text = "\n".join([
        "## Training step outside convolutions and matrix products (CPU)",
        "",
        f"`python benchmarks/step_share.py` on {machine()}, {torch.get_num_threads()} threads: "
        f"`{Path(args.config).name}` (trainable BN, fp32), synthetic 640x640 batch of {args.batch}, the real "
        f"`TrainStep` (SGD, clipping); {args.warmup} untimed warm-up step(s), the median of {args.timed} "
        f"unprofiled steps, then {args.active} profiled. "
        "*Outside* is 1 - (time in the outermost aten convolution / convolution_backward / addmm / mm / bmm calls) "
        "/ wall time; the issue's target is under 10%.",
        "",
        "| layout | s/step | outside (profiled wall) | outside (unprofiled wall) | largest other kinds (self time) |",
        "|---|---|---|---|---|",
        *rows,
    ])
    print(write_section("step-share", text))


if __name__ == "__main__":
    main()
