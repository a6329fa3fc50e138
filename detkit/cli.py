"""The `detkit` command: train, eval, predict, flops, benchmark, zoo-table, demo, synth, check-data."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

DEMO_DATA = Path("datasets/synth-demo")
DEMO_SPLITS = {"train": 600, "val": 100}
DEMO_IMAGE_SIZES = (128, 192)  # short side range: small images, so that a CPU trains the demo in minutes
DEMO_CONFIG = "retinanet-resnet18-fpn-demo.yaml"
DEMO_OUT = Path("runs/demo")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def cmd_synth(args: argparse.Namespace) -> int:
    from .data.synth import generate

    splits = {"train": args.train, "val": args.val}
    splits = {k: v for k, v in splits.items() if v > 0}
    if not splits:
        print("error: nothing to generate (--train and --val are both 0)", file=sys.stderr)
        return 2
    start = time.perf_counter()
    paths = generate(args.out, splits, seed=args.seed, workers=args.workers, min_size=args.min_size,
                     max_size=args.max_size, max_objects=args.max_objects)
    elapsed = time.perf_counter() - start
    total = sum(splits.values())
    print(f"wrote {total:,} images in {elapsed:.1f} s ({total / elapsed:.0f} images/s) to {args.out}")
    for split, path in paths.items():
        print(f"  {split}: {path}  (images in {Path(args.out) / split})")
    return 0


def _check_files(coco, decode: bool, workers: int, max_pixels: int) -> dict:
    """Check that every image file exists (and, with decode, reads at its annotated size)."""
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    paths = [coco.image_path(i) for i in range(len(coco))]
    missing = [p for p in paths if not os.path.isfile(p)]
    out = {"missing image files": len(missing)}
    for p in missing[:5]:
        print(f"  missing: {p}")
    if decode:
        present = [i for i, p in enumerate(paths) if os.path.isfile(p)]
        sizes = [(int(coco.widths[i]), int(coco.heights[i])) for i in present]
        jobs = [(paths[i], s, max_pixels) for i, s in zip(present, sizes)]
        bad = []
        with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
            for path, error in tqdm(pool.map(_decode_one, jobs, chunksize=32), total=len(jobs), desc="decoding",
                                    unit="img", disable=not sys.stderr.isatty()):
                if error:
                    bad.append(error)
        for error in bad[:5]:
            print(f"  unreadable: {error}")
        out["unreadable images"] = len(bad)
    return out


def _decode_one(job: tuple[str, tuple[int, int], int]) -> tuple[str, str | None]:
    from .data.image_io import ImageDecodeError, read_annotated_image

    path, size, max_pixels = job
    try:
        read_annotated_image(path, size, max_pixels)
    except ImageDecodeError as exc:
        return path, str(exc)
    return path, None


def _splits_from_target(target: str, images: str | None) -> list[tuple[str, str, str]]:
    """(name, annotations, image root) for a config file or an annotations JSON."""
    if target.endswith((".yaml", ".yml")):
        from .config import Config, load_config

        cfg = load_config(Config, target)
        out = [(name, ds.annotations, ds.images) for name, ds in (("train", cfg.data.train), ("val", cfg.data.val))
               if ds.annotations]
        if not out:
            raise SystemExit(f"error: {target} sets neither data.train.annotations nor data.val.annotations")
        return out
    if images is None:
        raise SystemExit("error: give the image folder with --images when checking an annotations file")
    return [(Path(target).name, target, images)]


def cmd_check_data(args: argparse.Namespace) -> int:
    from .data.coco import CocoDataset, DatasetError

    problems = 0
    splits = _splits_from_target(args.target, args.images)
    for name, annotation_file, images in splits:
        start = time.perf_counter()
        try:
            coco = CocoDataset.load(annotation_file, images, filter_empty=args.filter_empty, load_masks=args.masks,
                                    min_box_size=args.min_box_size)
        except (DatasetError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        elapsed = time.perf_counter() - start
        report = coco.report
        report.extra.update(_check_files(coco, args.decode, args.workers, args.max_pixels))
        report.extra["read in"] = f"{elapsed:.2f} s"
        print(f"[{name}]")
        print(report.format())
        problems += report.num_invalid + sum(v for k, v in report.extra.items() if isinstance(v, int))
        if args.json:
            from .utils.fileio import write_json_atomic

            path = Path(args.json)
            if len(splits) > 1:
                path = path.with_name(f"{path.stem}_{name}{path.suffix}")
            write_json_atomic(report.to_dict(), path)
            print(f"  report written to {path}")
    print("result: no problems found" if not problems else f"result: {problems:,} problems found (see above)")
    return 1 if problems and args.strict else 0


def _load_config(args: argparse.Namespace):
    from .config import Config, load_config

    cfg = load_config(Config, args.config, args.overrides)
    if not cfg.name:
        cfg.name = Path(args.config).stem
    return cfg


def shipped_config(name: str) -> Path:
    """A config shipped in the repository's configs/ folder."""
    root = Path(__file__).resolve().parents[1] / "configs"
    return root / name


def _launch_on_gpus(args: argparse.Namespace) -> int:
    """`detkit train --gpus N`: replace this process by torchrun running N copies of the same command."""
    import torch

    from .engine.distributed import launch_command

    if not torch.cuda.is_available():
        print(f"error: --gpus needs CUDA; for CPU processes run: torchrun --nproc_per_node {args.gpus} -m detkit "
              f"train {args.config} runtime.device=cpu", file=sys.stderr)
        return 2
    if args.gpus > torch.cuda.device_count():
        print(f"error: --gpus {args.gpus} but this machine has {torch.cuda.device_count()} GPUs", file=sys.stderr)
        return 2
    command = launch_command(args.argv, args.gpus)
    print("running:", " ".join(command), file=sys.stderr, flush=True)
    os.execv(command[0], command)  # signals now reach torchrun directly, which forwards them to the ranks
    return 0  # not reached


def cmd_train(args: argparse.Namespace) -> int:
    from .engine.distributed import shutdown
    from .engine.trainer import Trainer

    if args.gpus < 1:
        print("error: --gpus must be >= 1", file=sys.stderr)
        return 2
    if args.gpus > 1 and "LOCAL_RANK" not in os.environ:
        return _launch_on_gpus(args)
    if isinstance(args.resume, str) and "=" in args.resume and not Path(args.resume).exists():
        # `--resume key=value`: argparse took an override for the optional checkpoint path
        args.overrides.append(args.resume)
        args.resume = True
    cfg = _load_config(args)
    if args.output_dir:
        cfg.runtime.output_dir = args.output_dir
    try:
        trainer = Trainer(cfg, resume=args.resume or False, progress=not args.no_progress,
                          allow_changes=args.allow_changes)
        result = trainer.train()
    finally:
        shutdown()
    if not trainer.dist.is_main:
        return 0
    if "stopped" in result:
        print(f"stopped by {result['stopped']} at iteration {result['iteration']}; saved {result['checkpoint']}. "
              "Continue with the same command and --resume.")
        return 0
    for iou_type, r in result.get("evaluations", {}).items():
        print(f"Evaluate annotation type *{iou_type}*")
        print(r.summary, end="")
    print(f"outputs in {trainer.out}: model_final.pth, metrics.jsonl, loss_curve.png, tensorboard/"
          + (", eval/" if result else ""))
    return 0


def _eval_weights(args: argparse.Namespace) -> int:
    """`detkit eval CONFIG --weights W`: detect on the config's val split and evaluate."""
    import numpy as np

    from .data.loader import build_dataset, build_test_loader
    from .engine.inference import evaluate_model, load_detector
    from .engine.trainer import resolve_device

    cfg = _load_config(args)
    device = resolve_device(cfg.runtime.device)
    model, categories = load_detector(cfg, args.weights, device)
    dataset = build_dataset(cfg.data, "val")
    with build_test_loader(dataset, cfg.data, pin_memory=device.type == "cuda") as loader:
        result = evaluate_model(model, dataset, loader, device, amp=cfg.runtime.amp, iou_types=args.iou_types,
                                out_dir=args.out, plots=not args.no_plots,
                                category_ids=np.array([c["id"] for c in categories]))
    for iou_type, r in result["evaluations"].items():
        print(f"Evaluate annotation type *{iou_type}*  ({r.num_detections:,} detections, "
              f"{result['images_per_second']:.1f} images/s)")
        print(r.summary, end="")
        print(r.per_category_table())
    if args.out:
        print(f"wrote {args.out}/metrics.json, results.json and plots")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation.coco_eval import ResultsError, evaluate, save_evaluation
    from .utils.fileio import write_json_atomic

    if args.weights:
        if not args.config:
            print("error: --weights needs a config (the model to build and the val split)", file=sys.stderr)
            return 2
        return _eval_weights(args)
    gt = args.gt
    if gt is None and args.config:
        from .config import Config, load_config

        cfg = load_config(Config, args.config, args.overrides)
        gt = cfg.data.val.annotations
    if not gt:
        print("error: give the ground truth with --gt (or a config whose data.val.annotations is set)",
              file=sys.stderr)
        return 2
    if not args.results:
        print("error: give the detections with --results (a COCO results JSON) or a model with --weights",
              file=sys.stderr)
        return 2
    from .data.coco import load_json

    results = load_json(args.results)
    out = {}
    for iou_type in args.iou_types:
        try:
            result = evaluate(gt, results, iou_type)
        except ResultsError as exc:
            print(f"error: {args.results}: {exc}", file=sys.stderr)
            return 2
        print(f"Evaluate annotation type *{iou_type}*  ({result.num_detections:,} detections)")
        print(result.summary, end="")
        print(result.per_category_table())
        out[iou_type] = result
    if args.out:
        files = save_evaluation(out, args.out, plots=not args.no_plots)
        files["results"] = write_json_atomic(results, Path(args.out) / "results.json")
        print("wrote: " + ", ".join(str(p) for p in files.values()))
    return 0


def _image_paths(inputs: Sequence[str]) -> list[Path]:
    paths = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths.extend(sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file():
            paths.append(p)
        else:
            raise FileNotFoundError(f"no such image or folder: {item}")
    return paths


def run_predict(cfg, weights: str, inputs: Sequence[str], out_dir: str | Path, score_threshold: float) -> list[Path]:
    """Detect on images, draw boxes, names and scores, write one PNG per image and predictions.json."""
    import numpy as np
    import torch

    from .data.image_io import ImageDecodeError, read_image
    from .data.loader import ImageMeta, collate
    from .data.transforms import Sample, TransformPipeline
    from .engine.inference import autocast, load_detector, to_original
    from .engine.trainer import resolve_device
    from .utils.fileio import write_json_atomic
    from .utils.visualize import draw_detections, save_image_atomic

    device = resolve_device(cfg.runtime.device)
    model, categories = load_detector(cfg, weights, device)
    names = [c["name"] for c in categories]
    transform = TransformPipeline(cfg.data.test_transform, train=False)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, records, used_names = [], [], set()
    for i, path in enumerate(_image_paths(inputs)):
        try:
            image = read_image(path, cfg.data.max_image_pixels)
        except ImageDecodeError as exc:
            print(f"skipping {path}: {exc}", file=sys.stderr)
            continue
        empty = np.zeros((0, 4), np.float32)
        sample = transform(Sample(image=image, boxes=empty, labels=np.zeros(0, np.int64), ignore_boxes=empty))
        meta = ImageMeta(index=i, image_id=i, orig_size=(image.height, image.width), affine=sample.affine)
        batch = collate([(sample, meta)], cfg.data.test_transform.size_divisibility, transform.fixed_size)
        batch = batch.to(device)
        with torch.no_grad(), autocast(device, cfg.runtime.amp):
            detections = model(batch.images, batch.image_sizes, image_scales=batch.image_scales)
        det = to_original(detections, batch.metas)[0]
        picture = draw_detections(image, det["boxes"], det["labels"], det["scores"], names,
                                  score_threshold=score_threshold)
        name = path.stem if path.stem not in used_names else f"{path.stem}_{i}"  # same stem in two folders
        used_names.add(name)
        target = out_dir / f"{name}.png"
        written.append(save_image_atomic(picture, target))
        keep = det["scores"] >= score_threshold
        records.append({"file": str(path), "picture": target.name, "detections": [
            {"box_xyxy": [round(float(v), 2) for v in b], "category_id": int(categories[lab]["id"]),
             "name": names[lab], "score": round(float(s), 4)}
            for b, lab, s in zip(det["boxes"][keep], det["labels"][keep], det["scores"][keep])]})
    write_json_atomic(records, out_dir / "predictions.json")
    return written


def cmd_predict(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    written = run_predict(cfg, args.weights, args.images, args.out, args.score_threshold)
    print(f"wrote {len(written)} pictures and predictions.json to {args.out}")
    return 0


def cmd_flops(args: argparse.Namespace) -> int:
    """`detkit flops CONFIG`: parameters and multiply-adds of one inference forward, by part."""
    from .engine.flops import measure

    cfg = _load_config(args)
    try:
        cost = measure(cfg, size=args.size, num_classes=args.num_classes)
    except (TypeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(cost.format())
    if args.json:
        from .utils.fileio import write_json_atomic

        print(f"written to {write_json_atomic(cost.to_dict(), args.json)}")
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    """`detkit benchmark CONFIG`: training and inference speed, memory, size and AP; a JSON record and a row."""
    import shlex

    from .engine.benchmark import BenchmarkOptions, run_benchmark
    from .engine.environment import device_slug
    from .engine.zoo import table_header
    from .utils.fileio import write_json_atomic

    counts = {"--iters": (args.iters, 1), "--warmup": (args.warmup, 0), "--train-batch": (args.train_batch, 1),
              "--eval-images": (args.eval_images, 1)}
    for flag, (value, least) in counts.items():
        if value is not None and value < least:
            print(f"error: {flag} must be >= {least}, got {value}", file=sys.stderr)
            return 2
    if args.batch_sizes is not None and min(args.batch_sizes) < 1 or args.size is not None and min(args.size) < 1:
        print("error: --batch-sizes and --size must be positive", file=sys.stderr)
        return 2
    cfg = _load_config(args)
    options = BenchmarkOptions(config_path=args.config, overrides=list(args.overrides), weights=args.weights,
                               device=args.device, iters=args.iters, warmup=args.warmup,
                               train_batch=args.train_batch, batch_sizes=args.batch_sizes,
                               size=tuple(args.size) if args.size else None, train=not args.no_train,
                               inference=not args.no_inference, eval_images=args.eval_images,
                               command="detkit " + shlex.join(args.argv))
    record = run_benchmark(cfg, options)
    accuracy = record["accuracy"] or {}
    for iou_type in ("bbox", "segm"):
        if iou_type in accuracy:
            subset = f", the first {accuracy['images']} val images" if accuracy["subset"] else ""
            print(f"Evaluate annotation type *{iou_type}*{subset}")
            print(accuracy[iou_type]["summary"], end="")
    train, inference = record["train"], record["inference"]
    if train and "error" in train:
        print(f"training: batch {train['batch']} ran out of memory")
    elif train:
        print(f"training: batch {train['batch']}, {train['iters']} iterations after {train['warmup']} warm-up: "
              f"{train['s_per_iter']:.3f} s/iter, {train['img_per_s']:.2f} images/s")
    if inference:
        fps = ", ".join(f"batch {e['batch']}: " + (f"{e['fps']:.2f}" if "fps" in e else "out of memory")
                        for e in inference["per_batch"])
        print(f"inference at {'x'.join(map(str, inference['image_size']))}, images/s by batch: {fps}")
    print("\n".join(table_header()))
    print(record["markdown_row"])
    out = Path(args.json or Path(cfg.runtime.output_dir) / f"benchmark-{device_slug(record['device'])}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"record written to {write_json_atomic(record, out)}")
    return 0


def cmd_zoo_table(args: argparse.Namespace) -> int:
    """`detkit zoo-table RECORDS_DIR`: render the model-zoo page from benchmark records (--check: is it current?)."""
    from .engine.zoo import RecordError, check_file, load_records, render_zoo
    from .utils.fileio import write_bytes_atomic

    try:
        records = load_records(args.records_dir)
    except RecordError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    label = Path(os.path.normpath(args.records_dir))
    if label.is_absolute() and label.is_relative_to(Path.cwd()):
        label = label.relative_to(Path.cwd())
    out = Path(args.out)
    text = render_zoo(records, args.configs, records_label=label.as_posix(), link_from=out.parent)
    if args.check:
        problems = check_file(out, text)
        for line in problems:
            print(line)
        if problems:
            print(f"regenerate it with: detkit zoo-table {label.as_posix()} --configs {args.configs} --out {out}")
            return 1
        print(f"{out} is up to date with {len(records)} records in {label.as_posix()}")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(text.encode("utf-8"), out)
    print(f"wrote {out} from {len(records)} records in {label.as_posix()}")
    return 0


def demo_overrides(root: str | Path, out: str | Path) -> list[str]:
    """Point the demo config at the synthetic dataset in `root` and its run folder at `out`."""
    return [f"data.train.annotations={root}/annotations/instances_train.json", f"data.train.images={root}/train",
            f"data.val.annotations={root}/annotations/instances_val.json", f"data.val.images={root}/val",
            f"runtime.output_dir={out}"]


def cmd_demo(args: argparse.Namespace) -> int:
    """Generate the synthetic dataset if missing, train the demo RetinaNet, evaluate it and draw predictions."""
    from .config import Config, load_config
    from .engine.trainer import Trainer

    start = time.perf_counter()
    root = Path(args.data)
    missing = [s for s in DEMO_SPLITS if not (root / "annotations" / f"instances_{s}.json").is_file()]
    if missing:
        print(f"generating the synthetic dataset in {root} ...")
        code = main(["synth", str(root), "--train", str(DEMO_SPLITS["train"]), "--val", str(DEMO_SPLITS["val"]),
                     "--min-size", str(DEMO_IMAGE_SIZES[0]), "--max-size", str(DEMO_IMAGE_SIZES[1])])
        if code:
            return code
    else:
        print(f"using the synthetic dataset in {root}")
    cfg = load_config(Config, shipped_config(DEMO_CONFIG), [*demo_overrides(root, args.out), *args.overrides])
    cfg.name = cfg.name or "demo"
    out = Path(args.out)
    trainer = Trainer(cfg, resume=args.resume, progress=not args.no_progress)
    result = trainer.train()
    if "stopped" in result:
        print(f"demo stopped by {result['stopped']} at iteration {result['iteration']}; continue it with "
              "`detkit demo --resume`")
        return 0
    ap = float("nan")
    for iou_type, r in result.get("evaluations", {}).items():
        print(f"Evaluate annotation type *{iou_type}*")
        print(r.summary, end="")
        print(r.per_category_table())
        ap = r.stats[0] if iou_type == "bbox" else ap
    val_images = sorted((root / "val").iterdir())[:args.pictures]
    pictures = run_predict(cfg, str(out / "model_final.pth"), [str(p) for p in val_images], out / "predictions",
                           score_threshold=0.4)
    minutes = (time.perf_counter() - start) / 60
    print(f"\ndemo finished in {minutes:.1f} min: bbox AP {ap:.3f}")
    print(f"  model:        {out / 'model_final.pth'}")
    print(f"  loss curve:   {out / 'loss_curve.png'}")
    print(f"  evaluation:   {out / 'eval'} (metrics.json, precision-recall and per-category plots)")
    print(f"  predictions:  {out / 'predictions'} ({len(pictures)} pictures)")
    print(f"  TensorBoard:  tensorboard --logdir {out / 'tensorboard'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="detkit", description="Train, evaluate and benchmark object detectors.")
    parser.add_argument("--version", action="version", version=f"detkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a detector from a config")
    p.add_argument("config", help="a YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. solver.base_lr=0.02")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue from the run folder's last checkpoint (or from CHECKPOINT)")
    p.add_argument("--gpus", type=int, default=1, metavar="N",
                   help="train on N GPUs of this machine (launches torchrun; for several nodes run torchrun "
                        "yourself, see README)")
    p.add_argument("--allow-changes", action="store_true",
                   help="with --resume: continue even if the config or training set differ from the checkpoint's")
    p.add_argument("--output-dir", help="run folder (default: runtime.output_dir)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("synth", help="generate the synthetic COCO-format dataset")
    p.add_argument("out", help="dataset folder to write")
    p.add_argument("--train", type=int, default=2000, help="training images (default 2000)")
    p.add_argument("--val", type=int, default=200, help="validation images (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="processes (default: one per core)")
    p.add_argument("--min-size", type=int, default=256, help="smallest image short side")
    p.add_argument("--max-size", type=int, default=512, help="largest image short side")
    p.add_argument("--max-objects", type=int, default=8, help="most objects per image")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("check-data", help="validate a COCO-format dataset and report every problem")
    p.add_argument("target", help="an instances JSON (with --images) or a detkit config (checks its splits)")
    p.add_argument("--images", help="image folder of the instances JSON")
    p.add_argument("--masks", action="store_true", help="validate segmentations too")
    p.add_argument("--decode", action="store_true", help="decode every image (finds corrupt files; slower)")
    p.add_argument("--filter-empty", action="store_true", help="count images without annotations as dropped")
    p.add_argument("--min-box-size", type=float, default=1.0)
    p.add_argument("--max-pixels", type=int, default=178_956_970)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", help="also write the report as JSON here")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when any problem is found")
    p.set_defaults(func=cmd_check_data)

    p = sub.add_parser("eval", help="evaluate COCO detection results (12-line AP/AR block, per-category AP)")
    p.add_argument("config", nargs="?", help="a detkit config (its data.val.annotations is the ground truth)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    p.add_argument("--gt", help="ground-truth instances JSON")
    p.add_argument("--results", help="COCO results JSON (a list of detections)")
    p.add_argument("--iou-types", nargs="+", default=["bbox"], choices=["bbox", "segm"])
    p.add_argument("--weights", help="evaluate this model (checkpoint or weights file) on the config's val split")
    p.add_argument("--out", help="folder for metrics.json, results.json and the plots")
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="detect objects in images and draw them")
    p.add_argument("config", help="the detector's config")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--weights", required=True, help="checkpoint or weights file")
    p.add_argument("--out", required=True, help="folder for the pictures and predictions.json")
    p.add_argument("--score-threshold", type=float, default=0.3, help="draw detections scoring at least this")
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("flops", help="parameters and multiply-adds (MACs) of one inference forward, by part")
    p.add_argument("config", help="the detector's config")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    p.add_argument("--size", nargs=2, type=int, metavar=("H", "W"),
                   help="input height and width (default: the config's test size; resize_short: largest short "
                        "side x max_size), padded to data.test_transform.size_divisibility")
    p.add_argument("--num-classes", type=int, help="classes to build with (default: model.num_classes, else the "
                                                   "val annotations' categories, else COCO's 91)")
    p.add_argument("--json", help="also write the counts as JSON here")
    p.set_defaults(func=cmd_flops)

    p = sub.add_parser("benchmark", help="measure training and inference speed, memory, size and AP of a config")
    p.add_argument("config", help="the detector's config")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    p.add_argument("--weights", help="trained weights: inference runs on them, and AP is measured on the val split")
    p.add_argument("--iters", type=int, help="timed iterations of each phase (default: training 20, inference 50 "
                                             "on CUDA; 2 and 3 on CPU)")
    p.add_argument("--warmup", type=int, help="untimed iterations first (default: 5 and 10 on CUDA; 1 on CPU)")
    p.add_argument("--train-batch", type=int, metavar="N", help="training images per step (default: "
                   "data.batch_size, on CPU reduced to what fits in memory)")
    p.add_argument("--batch-sizes", nargs="+", type=int, metavar="N",
                   help="inference batch sizes to sweep (default: 1 2 4 ... 64 on CUDA, 1 2 on CPU)")
    p.add_argument("--size", nargs=2, type=int, metavar=("H", "W"),
                   help="replace the config's train and test image sizes (small runs)")
    p.add_argument("--no-train", action="store_true", help="skip the training measurement")
    p.add_argument("--no-inference", action="store_true", help="skip the inference measurement")
    p.add_argument("--eval-images", type=int, metavar="N", help="AP on the first N val images only")
    p.add_argument("--json", help="the record's path (default: runtime.output_dir/benchmark-<device>.json)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: runtime.device)")
    p.set_defaults(func=cmd_benchmark)

    p = sub.add_parser("zoo-table", help="render docs/MODEL_ZOO.md from `detkit benchmark` JSON records")
    p.add_argument("records_dir", metavar="RECORDS_DIR", help="folder of schema-1 records (benchmarks/records)")
    p.add_argument("--configs", default="configs", help="the shipped configs, each listed (default configs)")
    p.add_argument("--out", default="docs/MODEL_ZOO.md", help="the page to write (default docs/MODEL_ZOO.md)")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 and show the difference when the page is out of date")
    p.set_defaults(func=cmd_zoo_table)

    p = sub.add_parser("demo", help="the README's demo: train RetinaNet on the synthetic dataset, evaluate, draw")
    p.add_argument("overrides", nargs="*", help="overrides of the demo config, key=value")
    p.add_argument("--data", default=str(DEMO_DATA), help="where the synthetic dataset lives")
    p.add_argument("--out", default=str(DEMO_OUT), help="run folder (default runs/demo)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo run")
    p.add_argument("--pictures", type=int, default=8, help="val images to draw predictions for")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    _setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    from .config import ConfigError

    from .data.coco import DatasetError
    from .engine.checkpoint import CheckpointError
    from .engine.divergence import DivergenceError
    from .modeling.weights import WeightsError

    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, DatasetError, WeightsError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DivergenceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        sys.stderr.close()
        return 0
