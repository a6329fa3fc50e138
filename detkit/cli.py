"""The `detkit` command: train, eval, predict, flops, benchmark, zoo-table, demo, synth, check-data."""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Sequence

DEMO_DATA = Path("datasets/synth-demo")
DEMO_SPLITS = {"train": 600, "val": 100}
DEMO_IMAGE_SIZES = (128, 192)  # short side range: small images, so that a CPU trains the demo in minutes
# `detkit demo --detector NAME`: the demo-sized config of each detector; the first is the default
DEMO_CONFIGS = {"cascade": "cascade-rcnn-resnet18-fpn-demo.yaml", "retinanet": "retinanet-resnet18-fpn-demo.yaml",
                "faster": "faster-rcnn-resnet18-fpn-demo.yaml", "mask": "mask-rcnn-resnet18-fpn-demo.yaml"}
DEMO_OUT = Path("runs/demo")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
CONFIG_SUFFIXES = (".yaml", ".yml")
# a config override on the command line: a dotted key of identifiers, "=", a YAML value
_OVERRIDE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*=")
EXIT_USAGE, EXIT_UNEXPECTED, EXIT_INTERRUPTED = 2, 1, 130


class UsageError(Exception):
    """The command line asks for something that cannot work; the message says what to write instead."""


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


# --- the command line's positionals: config, key=value overrides, images ---------------------------------------

def is_override(token: str) -> bool:
    """`token` is a `key=value` config override: a dotted key, "=", a value, and not the name of an existing file
    (an image may be called `a=b.jpg`)."""
    return bool(_OVERRIDE.match(token)) and not os.path.exists(token)


def is_config_path(token: str) -> bool:
    return token.lower().endswith(CONFIG_SUFFIXES)


def _not_an_override(token: str, command: str, takes: str) -> UsageError:
    hint = (" (an override is key=value with a dotted key, e.g. solver.base_lr=0.02)" if "=" in token or
            re.fullmatch(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+", token) else "")
    return UsageError(f"unexpected argument {token!r}{hint}: `detkit {command}` takes {takes}")


def resolve_positionals(args: argparse.Namespace) -> argparse.Namespace:
    """Sort the command's positional words into `args.config`, `args.overrides` (and `args.images` for predict,
    `args.target` for check-data), the same way for every command, wherever they stand among the flags.

    A word is an override when it looks like `key=value` and names no existing file; a config is recognised by its
    .yaml/.yml suffix where the command also takes other words (predict's images, eval's optional config).

    Raises:
        UsageError: a word that fits nowhere, a missing config, two configs.
    """
    command = args.command
    tokens = list(getattr(args, "positionals", []))
    tokens += getattr(args, "set_overrides", None) or []  # predict's old --set, an alias of positional overrides
    resume = getattr(args, "resume", False)
    if command == "train" and isinstance(resume, str):
        # `--resume` takes an optional value, so it swallows the word after it: give back an override or a config
        if is_override(resume):
            tokens.append(resume)
            args.resume = True
        elif is_config_path(resume) and not any(is_config_path(t) for t in tokens):
            tokens.insert(0, resume)
            args.resume = True
    tokens += getattr(args, "spilled", None) or []  # what a list option (--iou-types) took from after it
    # in the order written, whichever option took them: of two overrides of one key the later wins
    position = {token: i for i, token in enumerate(getattr(args, "argv", []))}
    overrides = sorted((t for t in tokens if is_override(t)), key=lambda t: position.get(t, len(position)))
    words = [t for t in tokens if not is_override(t)]
    args.overrides = overrides
    if command in ("train", "flops", "benchmark"):
        if not words:
            raise UsageError(f"give the config: detkit {command} CONFIG [key=value ...]")
        args.config, *rest = words
        if rest:
            raise _not_an_override(rest[0], command, "one config and key=value overrides")
    elif command == "eval":
        args.config, *rest = words or [None]
        if rest:
            raise _not_an_override(rest[0], command, "at most one config and key=value overrides")
    elif command == "predict":
        configs = [w for w in words if is_config_path(w)]
        if len(configs) > 1:
            raise UsageError(f"two configs given ({configs[0]}, {configs[1]}): `detkit predict` takes one")
        args.config = configs[0] if configs else None
        args.images = [w for w in words if w not in configs]
        if not args.images:
            raise UsageError("give the images: detkit predict [CONFIG] IMAGES_OR_FOLDERS... --weights W --out DIR")
    elif command == "check-data":
        if not words:
            raise UsageError("give what to check: detkit check-data CONFIG [key=value ...], or detkit check-data "
                             "ANNOTATIONS.json --images DIR")
        args.target, *rest = words
        if rest:
            raise _not_an_override(rest[0], command, "one config (or annotations file) and key=value overrides")
        if overrides and not is_config_path(args.target):
            raise UsageError(f"key=value overrides apply to a config, and {args.target} is not one (.yaml/.yml)")
        args.config = args.target if is_config_path(args.target) else None
    elif command == "demo":
        if words:
            raise _not_an_override(words[0], command, "key=value overrides of the demo config only")
    return args


class _ListOption(argparse.Action):
    """A `nargs="+"` option (e.g. `--iou-types bbox segm`) that gives back the key=value overrides and the config
    its greedy list took from after it, so that they count as such wherever they are written."""

    def __init__(self, *args, item_type=str, item_choices=None, **kwargs):
        self.item_type, self.item_choices = item_type, item_choices
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        items, spilled = [], []
        for value in values:
            if is_override(value) or is_config_path(value):
                spilled.append(value)
                continue
            try:
                item = self.item_type(value)
            except ValueError:
                raise argparse.ArgumentError(self, f"invalid {self.item_type.__name__} value: {value!r}") from None
            if self.item_choices is not None and item not in self.item_choices:
                raise argparse.ArgumentError(self, f"invalid choice: {value!r} (choose from "
                                                   f"{', '.join(map(str, self.item_choices))})")
            items.append(item)
        if not items:
            raise argparse.ArgumentError(self, "expected at least one value")
        setattr(namespace, self.dest, items)
        namespace.spilled = [*(getattr(namespace, "spilled", None) or []), *spilled]


# --- up-front checks: what would otherwise fail late, or leave a run folder behind -------------------------------

def _where(path: str) -> str:
    from .config.load import PATH_RULE

    return f" (looked in {Path.cwd()}; {PATH_RULE})" if not Path(path).is_absolute() else ""


def missing_dataset_message(key: str, path: str, split: str) -> str:
    """One line for a dataset path of the config that does not exist: where it was looked for, and how to make a
    dataset."""
    what = "file" if key.endswith("annotations") else "folder"
    return (f"{key}: no such {what} {path}{_where(path)}. Make a dataset with `detkit synth DIR` and point the "
            f"config at it (data.{split}.annotations=DIR/annotations/instances_{split}.json "
            f"data.{split}.images=DIR/{split}), or run `detkit demo`, which makes {DEMO_DATA}")


def check_dataset(cfg, splits: dict[str, bool]) -> None:
    """Check that the dataset files of `splits` ({"train": required, "val": required}) exist.

    A split that is not required is checked only when its annotations are set.

    Raises:
        DatasetError: a file or folder is missing, or a required split is not set.
    """
    from .data.coco import DatasetError

    for split, required in splits.items():
        ds = getattr(cfg.data, split)
        if not ds.annotations:
            if required:
                raise DatasetError(f"data.{split}.annotations is not set: give the COCO instances JSON, e.g. "
                                   f"data.{split}.annotations=DIR/annotations/instances_{split}.json "
                                   f"data.{split}.images=DIR/{split} for a dataset from `detkit synth DIR`")
            continue
        if not Path(ds.annotations).is_file():
            raise DatasetError(missing_dataset_message(f"data.{split}.annotations", ds.annotations, split))
        if not ds.images:
            raise DatasetError(f"data.{split}.images is not set: give the folder that the file_names of "
                               f"{ds.annotations} are relative to")
        if not Path(ds.images).is_dir():
            raise DatasetError(missing_dataset_message(f"data.{split}.images", ds.images, split))


def _check_device(name: str, source: str = "runtime.device") -> None:
    """A device the machine does not have is a config error, said before anything is built."""
    from .config import ConfigError
    from .engine.trainer import resolve_device

    import torch

    try:
        device = resolve_device(name)
    except RuntimeError as exc:
        if "CUDA is not available" in str(exc):
            raise ConfigError(f"{source} is {name!r} but this machine has no CUDA; use {source}"
                              f"{'=' if source.startswith('runtime') else ' '}cpu (or auto)") from None
        raise ConfigError(f"{source}: {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"{source} is {name!r} but this machine has {torch.cuda.device_count()} GPU(s), "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")


def _check_weights_paths(cfg) -> None:
    from .modeling.weights import WeightsError

    for key, path in (("model.weights", cfg.model.weights), ("model.backbone.weights", cfg.model.backbone.weights)):
        if path and not Path(path).is_file():
            raise WeightsError(f"{key}: no such file {path}{_where(path)}")


def _new_folders(path: Path) -> list[Path]:
    """`path` and those of its parents that do not exist yet, deepest first."""
    path = Path(path).absolute()
    return [p for p in (path, *path.parents) if not p.exists()]


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a failed start created, deepest first, while they are empty (never anything in them)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def cmd_synth(args: argparse.Namespace) -> int:
    from .data.synth import generate

    for flag, value, least in (("--train", args.train, 0), ("--val", args.val, 0), ("--min-size", args.min_size, 16),
                               ("--max-objects", args.max_objects, 0), ("--workers", args.workers, 0)):
        if value < least:
            raise UsageError(f"{flag} must be >= {least}, got {value}")
    if args.max_size < args.min_size:
        raise UsageError(f"--max-size ({args.max_size}) must be >= --min-size ({args.min_size})")
    splits = {"train": args.train, "val": args.val}
    splits = {k: v for k, v in splits.items() if v > 0}
    if not splits:
        print("error: nothing to generate (--train and --val are both 0)", file=sys.stderr)
        return 2
    start = time.perf_counter()
    paths = generate(args.out, splits, seed=args.seed, workers=args.workers, min_size=args.min_size,
                     max_size=args.max_size, max_objects=args.max_objects, progress=True)
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


def _splits_from_target(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(name, annotations, image root) for a config file (overrides applied) or an annotations JSON."""
    from .data.coco import DatasetError

    if args.config:
        cfg = _load_config(args)
        check_dataset(cfg, {"train": False, "val": False})
        out = [(name, ds.annotations, ds.images) for name, ds in (("train", cfg.data.train), ("val", cfg.data.val))
               if ds.annotations]
        if not out:
            raise UsageError(f"{args.config} sets neither data.train.annotations nor data.val.annotations")
        return out
    target = args.target
    if not Path(target).is_file():
        raise DatasetError(f"no such annotations file {target}. Make a dataset with `detkit synth DIR` (its "
                           "annotations are DIR/annotations/instances_{train,val}.json), or run `detkit demo`, "
                           f"which makes {DEMO_DATA}")
    if args.images is None:
        raise UsageError("give the image folder with --images when checking an annotations file")
    if not Path(args.images).is_dir():
        raise DatasetError(f"--images: no such folder {args.images} (the folder the file_names of {target} are "
                           "relative to)")
    return [(Path(target).name, target, args.images)]


def cmd_check_data(args: argparse.Namespace) -> int:
    from .data.coco import CocoDataset, DatasetError

    if args.max_pixels < 1 or args.min_box_size < 0:
        raise UsageError("--max-pixels must be >= 1 and --min-box-size >= 0")
    problems = 0
    splits = _splits_from_target(args)
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


def _config_for_weights(args: argparse.Namespace):
    """The config to run `args.weights` with, and the weights file as read (or None).

    The config named on the command line, else the one a detkit checkpoint stores; overrides apply to either.
    The checkpoint is read with the weights-only unpickler, once: nothing in it is executed.
    """
    if args.config:
        return _load_config(args), None
    from .config import Config
    from .config.load import config_from_data
    from .engine.inference import checkpoint_config
    from .modeling.weights import read_weights_file

    stored = read_weights_file(args.weights)
    data = checkpoint_config(stored)
    if data is None:
        raise UsageError(f"{args.weights} holds no config (only detkit checkpoints do); give the config it goes "
                         f"with: detkit {args.command} CONFIG ... --weights {args.weights}")
    cfg = config_from_data(Config, data, args.overrides, source=f"the config stored in {args.weights}")
    return cfg, stored


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


def _start_trainer(cfg, *, resume: bool | str, progress: bool, allow_changes: bool = False):
    """A Trainer for `cfg`, after the checks that need nothing built (dataset, weights paths, device, the
    checkpoint to resume); a start that fails leaves no empty run folder behind."""
    from .engine.trainer import Trainer

    check_dataset(cfg, {"train": True, "val": False})
    _check_weights_paths(cfg)
    _check_device(cfg.runtime.device)
    if isinstance(resume, str) and not Path(resume).is_file():
        raise FileNotFoundError(f"--resume: no such checkpoint {resume} (without a path, --resume continues "
                                f"from the last checkpoint in runtime.output_dir, {cfg.runtime.output_dir})")
    new_folders = _new_folders(Path(cfg.runtime.output_dir))
    try:
        return Trainer(cfg, resume=resume, progress=progress, allow_changes=allow_changes)
    except BaseException:
        _remove_empty(new_folders)
        raise


def cmd_train(args: argparse.Namespace) -> int:
    from .engine.distributed import shutdown

    if args.gpus < 1:
        print("error: --gpus must be >= 1", file=sys.stderr)
        return 2
    if args.gpus > 1 and "LOCAL_RANK" not in os.environ:
        return _launch_on_gpus(args)
    cfg = _load_config(args)
    if args.output_dir:
        cfg.runtime.output_dir = args.output_dir
    try:
        trainer = _start_trainer(cfg, resume=args.resume or False, progress=not args.no_progress,
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
    print(f"outputs in {trainer.out}: model_final.pth"
          + (", model_best.pth" if (trainer.out / "model_best.pth").is_file() else "")
          + ", metrics.jsonl, loss_curve.png, tensorboard/" + (", eval/" if result else ""))
    return 0


def _eval_weights(args: argparse.Namespace) -> int:
    """`detkit eval [CONFIG] --weights W`: detect on the config's val split and evaluate."""
    import numpy as np

    from .data.loader import build_dataset, build_test_loader
    from .engine.inference import evaluate_model, load_detector
    from .engine.trainer import resolve_device

    cfg, stored = _config_for_weights(args)
    check_dataset(cfg, {"val": True})
    _check_device(cfg.runtime.device)
    device = resolve_device(cfg.runtime.device)
    model, categories = load_detector(cfg, args.weights, device, stored=stored)
    del stored
    dataset = build_dataset(cfg.data, "val")
    with build_test_loader(dataset, cfg.data, pin_memory=device.type == "cuda") as loader:
        result = evaluate_model(model, dataset, loader, device, amp=cfg.runtime.amp,
                                iou_types=args.iou_types or cfg.eval.iou_types,
                                out_dir=args.out, plots=not args.no_plots,
                                category_ids=np.array([c["id"] for c in categories]))
    for iou_type, r in result["evaluations"].items():
        print(f"Evaluate annotation type *{iou_type}*  ({r.num_detections:,} detections, "
              f"{result['images_per_second']:.1f} images/s)")
        print(r.summary, end="")
        print(r.per_category_table())
    if args.out:
        print(f"wrote {args.out}/metrics.json, results.json" + ("" if args.no_plots else " and plots"))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation.coco_eval import ResultsError, evaluate, save_evaluation
    from .utils.fileio import write_json_atomic

    if args.weights:
        if args.results or args.gt:
            raise UsageError("--weights evaluates a model on the config's val split; --gt and --results evaluate "
                             "a results file: give one or the other")
        return _eval_weights(args)
    gt = args.gt
    if args.config:
        from .config import Config, load_config

        cfg = load_config(Config, args.config, args.overrides)
        if gt is None:
            gt = cfg.data.val.annotations
            if gt and not Path(gt).is_file():
                from .data.coco import DatasetError

                raise DatasetError(missing_dataset_message("data.val.annotations", gt, "val"))
    elif args.overrides:
        raise UsageError("key=value overrides apply to a config or to the config stored in --weights; "
                         "`detkit eval --gt ... --results ...` has none")
    if not gt:
        print("error: give the ground truth with --gt (or a config whose data.val.annotations is set)",
              file=sys.stderr)
        return 2
    if not args.results:
        print("error: give the detections with --results (a COCO results JSON) or a model with --weights",
              file=sys.stderr)
        return 2
    for flag, path in (("--gt", gt), ("--results", args.results)):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{flag}: no such file {path}")
    from .data.coco import load_json

    results = load_json(args.results)
    out = {}
    for iou_type in args.iou_types or ["bbox"]:
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
    """The image files named by `inputs` (files, and the images anywhere in folders), in order.

    Raises:
        FileNotFoundError: an input does not exist.
        UsageError: the inputs hold no image at all.
    """
    paths = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file())
            if not found:
                raise UsageError(f"no images in the folder {item} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
            paths.extend(found)
        elif p.is_file():
            paths.append(p)
        else:
            raise FileNotFoundError(f"no such image or folder: {item}")
    return paths


def run_predict(cfg, weights: str, inputs: Sequence[str], out_dir: str | Path, score_threshold: float, *,
                stored=None) -> list[Path]:
    """Detect on images, draw boxes, names and scores, write one PNG per image and predictions.json.

    Args:
        stored: `weights` as already read by `read_weights_file`, if it was.

    Returns:
        The pictures written; images that cannot be decoded are skipped with a line on stderr.
    """
    import numpy as np
    import torch

    from .data.image_io import ImageDecodeError, read_image
    from .data.loader import ImageMeta, collate
    from .data.transforms import Sample, TransformPipeline
    from .engine.inference import autocast, load_detector, to_original
    from .engine.trainer import resolve_device
    from .utils.fileio import write_json_atomic
    from .utils.progress import track, write_above_bars
    from .utils.visualize import draw_detections, save_image_atomic

    paths = _image_paths(inputs)  # before the model is built: a wrong path fails at once
    device = resolve_device(cfg.runtime.device)
    model, categories = load_detector(cfg, weights, device, stored=stored)
    names = [c["name"] for c in categories]
    transform = TransformPipeline(cfg.data.test_transform, train=False)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, records, used_names = [], [], set()
    for i, path in enumerate(track(paths, "predict", unit="img")):
        try:
            image = read_image(path, cfg.data.max_image_pixels)
        except ImageDecodeError as exc:
            write_above_bars(f"skipping {path}: {exc}")
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
    if not 0.0 <= args.score_threshold <= 1.0:
        raise UsageError(f"--score-threshold must be in [0, 1], got {args.score_threshold}")
    if args.set_overrides:
        print("note: --set is no longer needed: write key=value overrides among the other arguments",
              file=sys.stderr)
    count = len(_image_paths(args.images))  # a wrong path fails before the weights are read
    cfg, stored = _config_for_weights(args)
    _check_device(cfg.runtime.device)
    written = run_predict(cfg, args.weights, args.images, args.out, args.score_threshold, stored=stored)
    if not written:
        raise UsageError(f"no image could be read ({count} given, see above); {args.out}/predictions.json "
                         "lists none")
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
    if args.weights:  # AP is measured on the val split: a path that is set must exist
        from .modeling.weights import WeightsError

        if not Path(args.weights).is_file():
            raise WeightsError(f"--weights: no such file {args.weights}")
        check_dataset(cfg, {"val": False})
    _check_device(args.device or cfg.runtime.device, "--device" if args.device else "runtime.device")
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
    """Generate the synthetic dataset if missing, train the demo detector, evaluate it and draw predictions."""
    from .config import Config, load_config

    start = time.perf_counter()
    if args.out is None:
        default = args.detector == next(iter(DEMO_CONFIGS))
        args.out = str(DEMO_OUT if default else DEMO_OUT.with_name(f"{DEMO_OUT.name}-{args.detector}"))
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
    cfg = load_config(Config, shipped_config(DEMO_CONFIGS[args.detector]),
                      [*demo_overrides(root, args.out), *args.overrides])
    cfg.name = cfg.name or "demo"
    out = Path(args.out)
    result = _start_trainer(cfg, resume=args.resume, progress=not args.no_progress).train()
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


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `error: <what> (see `detkit train --help`)`, exit status 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"error: {message} (see `{self.prog} --help`)\n")


_OVERRIDES_HELP = "config overrides key=value, anywhere among the flags, e.g. solver.base_lr=0.02"


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser = _Parser(prog="detkit", description="Train, evaluate and benchmark object detectors.",
                     epilog="Config overrides (key=value) go anywhere among a command's arguments; errors print one "
                            "line (--debug, before or after the command, shows the traceback).")
    parser.add_argument("--version", action="version", version=f"detkit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.commands = sub.choices  # name -> its parser, for main's two-step parse

    def add(name: str, usage: str | None = None, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], usage=usage, **kwargs)

    p = add("train", "detkit train CONFIG [key=value ...] [--resume [CHECKPOINT]] [options]",
            help="train a detector from a config")
    p.add_argument("positionals", nargs="*", metavar="CONFIG [key=value ...]",
                   help=f"a YAML config (see configs/), then {_OVERRIDES_HELP}")
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

    # the defaults make exactly the dataset `detkit demo` generates and reads
    p = add("synth", help="generate the synthetic COCO-format dataset (by default, the demo's)",
            description="Generate the synthetic COCO-format dataset. With no options it makes exactly the demo's "
                        f"(`detkit demo` generates it in {DEMO_DATA}). Generating into an existing folder replaces "
                        "the splits generated: their images from an earlier run are removed.")
    p.add_argument("out", help="dataset folder to write")
    p.add_argument("--train", type=int, default=DEMO_SPLITS["train"],
                   help="training images (default %(default)s, the demo's; 0: no train split)")
    p.add_argument("--val", type=int, default=DEMO_SPLITS["val"],
                   help="validation images (default %(default)s, the demo's; 0: no val split)")
    p.add_argument("--seed", type=int, default=0, help="the output is a pure function of it (default %(default)s)")
    p.add_argument("--workers", type=int, default=0, help="processes (default: one per core)")
    p.add_argument("--min-size", type=int, default=DEMO_IMAGE_SIZES[0],
                   help="smallest image short side in pixels (default %(default)s, the demo's)")
    p.add_argument("--max-size", type=int, default=DEMO_IMAGE_SIZES[1],
                   help="largest image short side in pixels (default %(default)s, the demo's)")
    p.add_argument("--max-objects", type=int, default=8, help="most objects per image (default %(default)s)")
    p.set_defaults(func=cmd_synth)

    p = add("check-data", "detkit check-data CONFIG [key=value ...] [options]\n"
                          "       detkit check-data ANNOTATIONS.json --images DIR [options]",
            help="validate a COCO-format dataset and report every problem")
    p.add_argument("positionals", nargs="*", metavar="TARGET [key=value ...]",
                   help="an instances JSON (with --images) or a detkit config (checks its splits; "
                        f"{_OVERRIDES_HELP})")
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

    p = add("eval", "detkit eval [CONFIG] --weights W [key=value ...] [options]\n"
                    "       detkit eval --gt ANNOTATIONS.json --results DETECTIONS.json [options]",
            help="evaluate COCO detection results (12-line AP/AR block, per-category AP)")
    p.add_argument("positionals", nargs="*", metavar="[CONFIG] [key=value ...]",
                   help="a detkit config (its data.val split is the ground truth; with --weights, default: the "
                        f"config stored in the checkpoint), and {_OVERRIDES_HELP}")
    p.add_argument("--gt", help="ground-truth instances JSON")
    p.add_argument("--results", help="COCO results JSON (a list of detections)")
    p.add_argument("--iou-types", nargs="+", action=_ListOption, item_choices=("bbox", "segm"),
                   metavar="{bbox,segm}", help="what to evaluate (default: with --weights the config's "
                                               "eval.iou_types, else bbox)")
    p.add_argument("--weights", help="evaluate this model (checkpoint or weights file) on the config's val split")
    p.add_argument("--out", help="folder for metrics.json, results.json and the plots")
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = add("predict", "detkit predict [CONFIG] IMAGES_OR_FOLDERS... --weights W --out DIR [key=value ...] "
                       "[options]", help="detect objects in images and draw them")
    p.add_argument("positionals", nargs="*", metavar="[CONFIG] IMAGES... [key=value ...]",
                   help="the detector's config (a .yaml/.yml file; default: the config stored in the checkpoint), "
                        f"image files or folders, and {_OVERRIDES_HELP}")
    p.add_argument("--weights", required=True, help="checkpoint or weights file")
    p.add_argument("--out", required=True, help="folder for the pictures and predictions.json")
    p.add_argument("--score-threshold", type=float, default=0.3, help="draw detections scoring at least this")
    p.add_argument("--set", dest="set_overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help=argparse.SUPPRESS)  # deprecated: overrides are positional, as in every command
    p.set_defaults(func=cmd_predict)

    p = add("flops", "detkit flops CONFIG [key=value ...] [options]",
            help="parameters and multiply-adds (MACs) of one inference forward, by part")
    p.add_argument("positionals", nargs="*", metavar="CONFIG [key=value ...]",
                   help=f"the detector's config, then {_OVERRIDES_HELP}")
    p.add_argument("--size", nargs=2, type=int, metavar=("H", "W"),
                   help="input height and width (default: the config's test size; resize_short: largest short "
                        "side x max_size), padded to data.test_transform.size_divisibility")
    p.add_argument("--num-classes", type=int, help="classes to build with (default: model.num_classes, else the "
                                                   "val annotations' categories, else COCO's 91)")
    p.add_argument("--json", help="also write the counts as JSON here")
    p.set_defaults(func=cmd_flops)

    p = add("benchmark", "detkit benchmark CONFIG [key=value ...] [options]",
            help="measure training and inference speed, memory, size and AP of a config")
    p.add_argument("positionals", nargs="*", metavar="CONFIG [key=value ...]",
                   help=f"the detector's config, then {_OVERRIDES_HELP}")
    p.add_argument("--weights", help="trained weights: inference runs on them, and AP is measured on the val split")
    p.add_argument("--iters", type=int, help="timed iterations of each phase (default: training 20, inference 50 "
                                             "on CUDA; 2 and 3 on CPU)")
    p.add_argument("--warmup", type=int, help="untimed iterations first (default: 5 and 10 on CUDA; 1 on CPU)")
    p.add_argument("--train-batch", type=int, metavar="N", help="training images per step (default: "
                   "data.batch_size, on CPU reduced to what fits in memory)")
    p.add_argument("--batch-sizes", nargs="+", action=_ListOption, item_type=int, metavar="N",
                   help="inference batch sizes to sweep (default: 1 2 4 ... 64 on CUDA, 1 2 on CPU)")
    p.add_argument("--size", nargs=2, type=int, metavar=("H", "W"),
                   help="replace the config's train and test image sizes (small runs)")
    p.add_argument("--no-train", action="store_true", help="skip the training measurement")
    p.add_argument("--no-inference", action="store_true", help="skip the inference measurement")
    p.add_argument("--eval-images", type=int, metavar="N", help="AP on the first N val images only")
    p.add_argument("--json", help="the record's path (default: runtime.output_dir/benchmark-<device>.json)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: runtime.device)")
    p.set_defaults(func=cmd_benchmark)

    p = add("zoo-table", help="render docs/MODEL_ZOO.md from `detkit benchmark` JSON records")
    p.add_argument("records_dir", metavar="RECORDS_DIR", help="folder of schema-1 records (benchmarks/records)")
    p.add_argument("--configs", default="configs", help="the shipped configs, each listed (default configs)")
    p.add_argument("--out", default="docs/MODEL_ZOO.md", help="the page to write (default docs/MODEL_ZOO.md)")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 and show the difference when the page is out of date")
    p.set_defaults(func=cmd_zoo_table)

    p = add("demo", "detkit demo [key=value ...] [options]",
            help="the README's demo: train a detector on the synthetic dataset, evaluate it, draw its detections")
    p.add_argument("positionals", nargs="*", metavar="key=value", help="overrides of the demo config, key=value")
    p.add_argument("--data", default=str(DEMO_DATA), help="where the synthetic dataset lives")
    p.add_argument("--out", help="run folder (default runs/demo, runs/demo-NAME with --detector NAME)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo run")
    p.add_argument("--pictures", type=int, default=8, help="val images to draw predictions for")
    p.add_argument("--detector", choices=list(DEMO_CONFIGS), default=next(iter(DEMO_CONFIGS)),
                   help="which demo config to train: " + ", ".join(f"{k} ({v})" for k, v in DEMO_CONFIGS.items())
                   + f" (default {next(iter(DEMO_CONFIGS))})")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse a `detkit` command line: global options, the command, then its arguments in any order (flags,
    the config, key=value overrides, images), sorted by `resolve_positionals`.

    Raises:
        SystemExit: --help, --version, or a command line argparse refuses (one line on stderr, status 2).
        UsageError: positionals that fit nowhere (see `resolve_positionals`).
    """
    argv = list(argv)
    parser = build_parser()
    index = next((i for i, token in enumerate(argv) if not token.startswith("-")), None)
    if index is None or argv[index] not in parser.commands or any(t != "--debug" for t in argv[:index]):
        parser.parse_args(argv)  # --help, --version, no or an unknown command or option: argparse answers
        raise UsageError(f"cannot parse the command line {argv!r}")  # not reached
    args = parser.commands[argv[index]].parse_intermixed_args(argv[index + 1:])
    args.command = argv[index]
    args.debug = args.debug or "--debug" in argv[:index]
    args.argv = argv
    return resolve_positionals(args)


_TRACEBACK = "Traceback (most recent call last)"


def _first_line(exc: BaseException) -> str:
    """The line that says what went wrong: the first of the message, or for an exception a DataLoader worker
    raised (its message holds the worker's traceback) the traceback's last, less the exception's type."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return ""
    if _TRACEBACK in str(exc):
        kind, sep, message = lines[-1].partition(": ")
        return message if sep and kind.replace(".", "").replace("_", "").isalnum() else lines[-1]
    return lines[0]


def _user_message(exc: BaseException) -> str:
    """A user error's message as written (some list one line per problem), but never a worker's traceback (a
    DataLoader worker's exception arrives with it in its message)."""
    text = str(exc)
    return _first_line(exc) if _TRACEBACK in text else text


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `detkit` command; returns its exit status.

    Errors a user can cause (a config, a path, weights, the command line) print `error: ...` (configs: `config
    error: ...`) on stderr and return 2 (3 for a diverged run); any other exception prints one line naming its
    type and returns 1; Ctrl-C prints `interrupted` and returns 130. With `--debug` every error is raised, with
    its traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        _setup_logging()
        from .config import ConfigError
        from .data.coco import DatasetError
        from .engine.checkpoint import CheckpointError
        from .engine.divergence import DivergenceError
        from .modeling.weights import WeightsError

        try:
            try:
                args = parse_args(argv)
            except SystemExit as exc:  # --help, --version, or argparse's one-line error: its status
                return exc.code if isinstance(exc.code, int) else EXIT_USAGE
            debug = args.debug
            return int(args.func(args) or 0)
        except ConfigError as exc:
            if debug:
                raise
            print(f"config error: {_user_message(exc)}", file=sys.stderr)
            return EXIT_USAGE
        except (UsageError, OSError, DatasetError, WeightsError, CheckpointError) as exc:
            if debug or isinstance(exc, BrokenPipeError):
                raise
            print(f"error: {_user_message(exc)}", file=sys.stderr)
            return EXIT_USAGE
        except DivergenceError as exc:
            if debug:
                raise
            print(f"error: {_user_message(exc)}", file=sys.stderr)
            return 3
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        # what is still buffered for the closed pipe goes nowhere, so that the exit flush does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if debug:
            raise
        message = _first_line(exc)
        print(f"error: {type(exc).__name__}{': ' + message if message else ''} (run with --debug for the "
              "traceback)", file=sys.stderr)
        return EXIT_UNEXPECTED
