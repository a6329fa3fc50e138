"""Measure RetinaNet and write its section of docs/benchmarks.md.

1. RetinaNet R50-FPN (91 classes, torchvision's layout) at 640x640: parameters, inference time at batch 1 and
   training step time at batch 2 (forward, backward, SGD step), each beside the same network's convolutional
   part alone (backbone + FPN + head) measured in the same run, and the PyTorch profiler's split of the time:
   the named stages (anchors, target assignment, losses, post-processing) and the convolution operators.
2. The demo: the README's demo config trained with evaluation every `--eval-every` iterations; the training
   wall time (evaluation excluded) at which bbox AP first reaches 0.5, and the final AP.

Usage: python benchmarks/retinanet.py [--quick] [--skip-demo]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from common import ROOT, machine, write_section  # noqa: E402 (benchmarks/ is the script dir)

STAGES = ("detkit.backbone", "detkit.neck", "detkit.head", "detkit.anchors", "detkit.assign_targets",
          "detkit.losses", "detkit.postprocess")
CONV_OPS = ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::_convolution", "aten::cudnn_convolution",
            "aten::thnn_conv2d", "aten::_slow_conv2d_forward", "aten::_slow_conv2d_backward")


def r50_fpn_retinanet():
    from detkit.config.schema import AnchorConfig, FPNConfig, ModelConfig
    from detkit.modeling.build import build_model

    cfg = ModelConfig(fpn=FPNConfig(extra_source="p5"), anchors=AnchorConfig(truncate_sizes=True, round_base=True))
    return build_model(cfg, 91)


def fake_batch(n: int, size: int, seed: int = 0):
    from detkit.data.loader import Targets

    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    sizes = torch.tensor([[size, size]] * n)
    targets = []
    for _ in range(n):  # 7 objects per image, COCO's mean
        xy = torch.rand(7, 2, generator=g) * size * 0.7
        wh = 16 + torch.rand(7, 2, generator=g) * size * 0.3
        targets.append(Targets(torch.cat([xy, xy + wh], 1), torch.randint(0, 91, (7,), generator=g),
                               torch.zeros(0, 4)))
    return images, sizes, targets


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, anchor cache, oneDNN primitives
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def profile_split(fn) -> dict[str, float]:
    """Share of the profiled wall time in each named stage and in convolution operators."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        fn()
        wall_us = (time.perf_counter() - start) * 1e6
    totals = {e.key: e.cpu_time_total for e in prof.key_averages()}
    self_totals = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    split = {name.split(".", 1)[1]: totals.get(name, 0.0) / wall_us for name in STAGES}
    split["convolutions"] = sum(self_totals.get(op, 0.0) for op in CONV_OPS) / wall_us
    return split


def measure_model(repeats: int, size: int) -> dict:
    torch.manual_seed(0)
    model = r50_fpn_retinanet()
    params = sum(p.numel() for p in model.parameters())
    from detkit.data.transforms import normalize

    def convnet(images, sizes):
        x = normalize(images, sizes, model.input_cfg)
        return model.head(list(model.neck(model.backbone(x)).values()))

    images, sizes, _ = fake_batch(1, size)
    model.eval()
    with torch.no_grad():
        infer = timed(lambda: model(images, sizes), repeats)
        infer_conv = timed(lambda: convnet(images, sizes), repeats)
        infer_split = profile_split(lambda: model(images, sizes))

    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    images2, sizes2, targets2 = fake_batch(2, size, seed=1)

    def train_step():
        losses = model(images2, sizes2, targets2)
        loss = losses["loss_cls"] + losses["loss_box"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def conv_step():
        logits, deltas = convnet(images2, sizes2)
        loss = sum(x.float().mean() for x in logits + deltas)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    train = timed(train_step, repeats)
    train_conv = timed(conv_step, repeats)
    train_split = profile_split(train_step)
    return {"params": params, "infer": infer, "infer_conv": infer_conv, "infer_split": infer_split,
            "train": train, "train_conv": train_conv, "train_split": train_split}


def measure_demo(eval_every: int, quick: bool) -> dict:
    """Train the demo config, evaluating every `eval_every` iterations; AP against training seconds."""
    from detkit.cli import DEMO_CONFIGS, DEMO_DATA, DEMO_IMAGE_SIZES, DEMO_SPLITS, demo_overrides, shipped_config
    from detkit.config import Config, load_config
    from detkit.data.synth import generate
    from detkit.engine import trainer as trainer_module

    root = ROOT / DEMO_DATA
    if not (root / "annotations" / "instances_val.json").is_file():
        generate(root, dict(DEMO_SPLITS), min_size=DEMO_IMAGE_SIZES[0], max_size=DEMO_IMAGE_SIZES[1])
    overrides = [*demo_overrides(root, "/tmp/detkit-bench/demo"), f"eval.period={eval_every}", "eval.plots=false"]
    if quick:
        overrides.append("solver.max_length=1")
    cfg = load_config(Config, shipped_config(DEMO_CONFIGS["retinanet"]), overrides)
    trainer = trainer_module.Trainer(cfg, progress=False)
    curve, eval_seconds = [], 0.0
    evaluate = trainer.evaluate
    start = time.perf_counter()

    def timed_evaluate(*args, **kwargs):
        nonlocal eval_seconds
        t0 = time.perf_counter()
        result = evaluate(*args, **kwargs)
        eval_seconds += time.perf_counter() - t0
        curve.append((trainer.iteration, time.perf_counter() - start - eval_seconds,
                      result["evaluations"]["bbox"].stats[0]))
        return result

    trainer.evaluate = timed_evaluate
    final = trainer.train()
    total = time.perf_counter() - start
    reached = next(((it, s) for it, s, ap in curve if ap >= 0.5), None)
    return {"curve": curve, "reached": reached, "final_ap": final["evaluations"]["bbox"].stats[0],
            "total_seconds": total, "eval_seconds": eval_seconds, "iterations": trainer.max_iter,
            "summary": final["evaluations"]["bbox"].summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the script itself")
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--eval-every", type=int, default=75)
    args = parser.parse_args()
    import detkit

    print(f"machine: {machine()}")
    m = measure_model(repeats=1 if args.quick else 5, size=256 if args.quick else 640)
    print({k: v for k, v in m.items()})

    def split_line(split: dict) -> str:
        return ", ".join(f"{k} {100 * v:.1f}%" for k, v in split.items() if v > 0)

    outside = ("anchors", "assign_targets", "losses", "postprocess")
    text = f"""## RetinaNet (`python benchmarks/retinanet.py`)

Machine: {machine()}; detkit {detkit.__version__}; measured {time.strftime('%Y-%m-%d')}.

**RetinaNet R50-FPN, 91 classes** (torchvision's layout: P6 from P5, FrozenBN): **{m['params']:,} parameters**
(torchvision's `retinanet_resnet50_fpn`: 34,014,999). Median of 5 runs at 640x640, float32, on this CPU:

| measurement | detkit RetinaNet | its convolutional part alone (same run) | ratio |
|---|---:|---:|---:|
| inference, batch 1 (s) | {m['infer']:.3f} | {m['infer_conv']:.3f} | {m['infer'] / m['infer_conv']:.2f}x |
| training step, batch 2 (s) | {m['train']:.3f} | {m['train_conv']:.3f} | {m['train'] / m['train_conv']:.2f}x |

Profiler split (share of one call's wall time; stages are nested ranges, so backbone/neck/head include their
convolutions; "convolutions" is the self time of the convolution operators, forward and backward):
- inference: {split_line(m['infer_split'])}
- training step: {split_line(m['train_split'])}

Outside the convolutional network (anchors, target assignment, losses, post-processing):
**{100 * sum(m['infer_split'][k] for k in outside):.1f}%** of inference and
**{100 * sum(m['train_split'][k] for k in outside):.1f}%** of the training step's wall time (their forward
passes only; the step takes {m['train'] / m['train_conv']:.2f}x its convolutional part alone, backward included).
"""
    if not args.skip_demo:
        d = measure_demo(args.eval_every, args.quick)
        print(d)
        rows = "\n".join(f"| {it} | {s / 60:.1f} | {ap:.3f} |" for it, s, ap in d["curve"])
        reached = (f"bbox AP reached 0.5 after **{d['reached'][1] / 60:.1f} min** of training "
                   f"(iteration {d['reached'][0]})" if d["reached"] else "bbox AP did not reach 0.5")
        text += f"""
**The demo** (`configs/retinanet-resnet18-fpn-demo.yaml`, synthetic dataset, {d['iterations']} iterations):
{reached}; final bbox AP **{d['final_ap']:.3f}**; whole run {d['total_seconds'] / 60:.1f} min including
{d['eval_seconds'] / 60:.1f} min of evaluation every {args.eval_every} iterations.

| iteration | training minutes (evaluation excluded) | bbox AP |
|---:|---:|---:|
{rows}
"""
    if args.quick:
        print(text)
    else:
        print(f"wrote {write_section('retinanet', text)}")


if __name__ == "__main__":
    sys.exit(main())
