"""Run a detector over a dataset, map detections back to the original images, and evaluate them."""
from __future__ import annotations

import contextlib
import functools
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from ..config import ConfigError
from ..data.loader import Batch, DetectionDataset, report_skipped
from ..data.transforms import boxes_to_original
from .compile import compile_model


@functools.lru_cache(maxsize=1)
def _cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX), where bf16 convolutions are faster than
    float32 ones; elsewhere oneDNN emulates them, more slowly than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: no way to tell cheaply, so no
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags)) and torch.backends.mkldnn.is_available()


def resolve_amp(amp: str, device: torch.device) -> str:
    """`runtime.amp` with "auto" resolved for `device`: "bf16" where it computes bfloat16 natively, else "none"."""
    if amp != "auto":
        return amp
    if device.type == "cuda":  # bfloat16 tensor cores from Ampere (compute capability 8.0) on; older GPUs emulate it
        return "bf16" if torch.cuda.get_device_capability(device) >= (8, 0) else "none"
    if device.type == "cpu":
        return "bf16" if _cpu_has_native_bf16() else "none"
    return "none"


def autocast(device: torch.device, amp: str):
    """The autocast context for `amp` ("none", "bf16", "fp16", "auto": see `resolve_amp`) on `device`."""
    amp = resolve_amp(amp, device)
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_original(detections, metas, mask_threshold: float = 0.5, mask_paste: str = "detectron2") -> list[dict]:
    """Per image: boxes in original-image pixels (clipped to it), scores and labels, as NumPy arrays; with
    Mask R-CNN also "masks", the masks pasted into the original image at `mask_threshold` by the `mask_paste` rule
    (see `paste_masks`), as COCO RLEs."""
    out = []
    for det, meta in zip(detections, metas):
        unclipped = boxes_to_original(det.boxes.float().cpu(), meta.affine).reshape(-1, 4)
        h, w = meta.orig_size
        boxes = torch.stack([unclipped[:, 0].clamp(0, w), unclipped[:, 1].clamp(0, h), unclipped[:, 2].clamp(0, w),
                             unclipped[:, 3].clamp(0, h)], dim=1).reshape(-1, 4)
        entry = {"image_id": meta.image_id, "boxes": boxes.numpy(), "scores": det.scores.float().cpu().numpy(),
                 "labels": det.labels.cpu().numpy()}
        if getattr(det, "mask_probs", None) is not None:
            from ..modeling.mask_ops import masks_to_rle, paste_masks

            # the box's mask is resampled into the original image, where COCO evaluates it
            entry["masks"] = masks_to_rle(paste_masks(det.mask_probs.float().cpu(), unclipped, (h, w),
                                                      threshold=mask_threshold, mode=mask_paste))
        out.append(entry)
    return out


def coco_results(per_image: list[dict], category_ids: np.ndarray) -> list[dict]:
    """COCO results entries (xywh boxes, original category ids, RLE masks when present) from `to_original`."""
    results = []
    for det in per_image:
        boxes = det["boxes"]
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).round(2)
        cats = category_ids[det["labels"]]
        entries = [{"image_id": int(det["image_id"]), "category_id": int(c), "bbox": [float(v) for v in b],
                    "score": round(float(s), 5)} for b, c, s in zip(xywh, cats, det["scores"])]
        for entry, rle in zip(entries, det.get("masks", ())):
            entry["segmentation"] = rle
        results.extend(entries)
    return results


@torch.no_grad()
def predict(model: nn.Module, loader, device: torch.device, amp: str = "none",
            progress: bool = False) -> Iterator[tuple[Batch, list]]:
    """Yield (batch, detections) over a test loader with the model in eval mode (restored afterwards); with
    `progress`, a bar on a terminal (see `progress_bar`)."""
    from ..utils.progress import progress_bar

    was_training = model.training
    model.eval()
    try:
        with progress_bar(len(loader), "eval", enabled=progress, unit="batch", leave=False) as bar:
            for batch in loader:
                report_skipped(batch, getattr(loader, "num_workers", 0))
                batch_dev = batch.to(device, non_blocking=True)
                with autocast(device, amp):
                    detections = model(batch_dev.images, batch_dev.image_sizes,
                                       image_scales=batch_dev.image_scales)
                bar.update()
                yield batch, detections
    finally:
        model.train(was_training)


def evaluate_model(model: nn.Module, dataset: DetectionDataset, loader, device: torch.device, *, amp: str = "none",
                   iou_types=("bbox",), out_dir: str | Path | None = None, plots: bool = True,
                   progress: bool = True, category_ids: np.ndarray | None = None,
                   gather: Callable[[list], list | None] | None = None) -> dict:
    """Detect on every image of `dataset` (this rank's share of it, with several processes), evaluate with the COCO
    protocol, optionally save metrics/plots.

    Args:
        category_ids: `category_ids[k]` is the COCO id of output k (default: the dataset's sorted category ids).
        gather: with several processes, takes this rank's results and returns every rank's, concatenated, on the
            main rank and None elsewhere; only the main rank evaluates and writes.

    Returns:
        {"results": COCO results list, "evaluations": {iou_type: EvalResult}, "seconds": float,
         "images_per_second": float}; on other ranks "results" and "evaluations" are empty.
    """
    from ..evaluation.coco_eval import evaluate, save_evaluation
    from ..utils.fileio import write_json_atomic

    start = time.perf_counter()
    results, num_images = [], 0
    category_ids = dataset.coco.category_ids if category_ids is None else np.asarray(category_ids)
    unsupported = [t for t in iou_types if t != "bbox" and not (t == "segm" and getattr(model, "has_masks", False))]
    if unsupported:
        raise ConfigError(f"eval.iou_types: this detector predicts boxes only; cannot evaluate {unsupported}")
    # a Mask R-CNN pastes its masks by its own settings (model.mask_head.threshold and .paste)
    mask_cfg = getattr(getattr(model, "module", model), "mask_cfg", None)
    paste = {} if mask_cfg is None else {"mask_threshold": mask_cfg.threshold, "mask_paste": mask_cfg.paste}
    for batch, detections in predict(model, loader, device, amp, progress):
        results.extend(coco_results(to_original(detections, batch.metas, **paste), category_ids))
        num_images += len(batch)
    seconds = time.perf_counter() - start
    if gather is not None:
        results = gather(results)
        if results is None:  # not the main rank
            return {"results": [], "evaluations": {}, "seconds": seconds,
                    "images_per_second": num_images / max(seconds, 1e-9)}
    evaluations = {t: evaluate(dataset.coco.annotation_file, results, t) for t in iou_types}
    if out_dir is not None:
        save_evaluation(evaluations, out_dir, plots=plots)
        write_json_atomic(results, Path(out_dir) / "results.json")
    return {"results": results, "evaluations": evaluations, "seconds": seconds,
            "images_per_second": num_images / max(seconds, 1e-9)}


def checkpoint_config(stored) -> dict | None:
    """The resolved config (plain values) that a detkit checkpoint records, or None for any other weights file.

    Args:
        stored: a weights file as `read_weights_file` returns it (read with the weights-only unpickler: nothing
            in it was executed).
    """
    config = stored.get("config") if isinstance(stored, dict) else None
    return config if isinstance(config, dict) else None


# the config section that shapes each top-level part of a detector, for "the weights do not fit" hints
_PART_SECTIONS = {"backbone": "model.backbone", "neck": "model.fpn", "head": "model.retinanet", "rpn": "model.rpn",
                  "stages": "model.roi_heads", "mask_head": "model.mask_head"}
# tensors whose first dimension counts classes
_CLASS_TENSORS = ("head.cls_logits.", ".predictor.cls_score.", ".predictor.bbox_pred.", "mask_head.predictor.")


def _misfit_hint(key: str, rows_differ: bool = False) -> str:
    """The config key most likely behind a tensor that does not fit, as ' (model.num_classes?)'."""
    part = key.split(".", 1)[0]
    if rows_differ and any(name in f".{key}" for name in _CLASS_TENSORS):
        return " (num_classes?)"
    section = _PART_SECTIONS.get(part)
    return f" ({section}?)" if section else ""


def weights_misfit(report, model: nn.Module) -> str | None:
    """One line naming the first tensor that keeps `report`'s weights out of `model`, or None when they fit.

    Args:
        report: the `LoadReport` of loading the weights into `model` with mismatched shapes skipped.
    """
    parts = {name for name, _ in model.named_children()}
    missing = [k for k in report.missing if k.split(".")[-1] not in ("loss_normalizer", "num_batches_tracked")]

    def more(n: int) -> str:
        return f"; {n} more tensors differ" if n > 1 else "; 1 more tensor differs" if n == 1 else ""

    others = len(report.mismatched) + len(report.unexpected) + len(missing) - 1
    weight_parts = {k.split(".", 1)[0] for k in [*report.loaded, *(k for k, _, _ in report.mismatched),
                                                 *report.unexpected]}
    # parts are submodules; a detector's own buffers (RetinaNet's loss_normalizer) are not parts
    only_weights = sorted({k.split(".", 1)[0] for k in report.unexpected if "." in k} - parts)
    only_model = sorted({k.split(".", 1)[0] for k in missing if "." in k} - weight_parts)
    if only_weights or only_model:  # another kind of detector: name the parts, not a tensor
        sides = [f"the weights have {', '.join(only_weights)}, which the model built from the config lacks"
                 if only_weights else "",
                 f"the model built from the config has {', '.join(only_model)}, which the weights lack"
                 if only_model else ""]
        return "; ".join(side for side in sides if side) + " (model.arch?)"
    if report.mismatched:
        key, stored, built = report.mismatched[0]
        hint = _misfit_hint(key, rows_differ=stored[:1] != built[:1])
        return (f"{key} is {tuple(stored)} in the weights and {tuple(built)} in the model built from the config"
                f"{hint}{more(others)}")
    if report.unexpected:
        key = report.unexpected[0]
        return f"the weights hold {key}, which the model built from the config lacks{_misfit_hint(key)}" \
               f"{more(others)}"
    if missing:
        key = missing[0]
        return f"the model built from the config needs {key}, which the weights lack{_misfit_hint(key)}" \
               f"{more(others)}"
    return None


def load_detector(cfg, weights: str, device: torch.device, *, prepare: bool = True,
                  stored=None) -> tuple[nn.Module, list[dict]]:
    """Build cfg's model for inference and load `weights` (detkit checkpoint, torchvision RetinaNet or Faster/Mask
    R-CNN, .safetensors).

    The classes come from the checkpoint when it records them (detkit checkpoints do), else from the config's
    validation annotations; with label_space coco91, output k is COCO category id k.

    Args:
        stored: `weights` as `read_weights_file` returned it, when the caller has read it already (e.g. for
            `checkpoint_config`).

    Returns:
        (model in eval mode on `device`, prepared by `prepare_for_inference` unless `prepare` is False,
         categories as [{"id", "name"}] in output order).

    Raises:
        WeightsError: the file is unreadable or unsafe, or its tensors do not fit the model the config builds
            (one line naming the first tensor that differs).
        ConfigError: the number of classes cannot be told, or differs from the checkpoint's categories.
    """
    from ..data.coco import load_json
    from ..modeling.build import build_model
    from ..modeling.weights import WeightsError, convert, load_weights, read_weights_file, state_dict_of

    if stored is None:
        stored = read_weights_file(weights)  # read once: detkit checkpoints also record their classes
    state = convert(state_dict_of(stored, weights))
    categories = stored.get("categories") if isinstance(stored, dict) else None
    recorded = categories is not None
    if categories is None and cfg.data.val.annotations and Path(cfg.data.val.annotations).is_file():
        listed = sorted(load_json(cfg.data.val.annotations).get("categories", []), key=lambda c: c["id"])
        categories = [{"id": int(c["id"]), "name": str(c.get("name", c["id"]))} for c in listed]
    if cfg.model.label_space == "coco91":
        names = {c["id"]: c["name"] for c in categories or []}
        categories = [{"id": k, "name": names.get(k, str(k))} for k in range(91)]
    num_classes = cfg.model.num_classes or len(categories or [])
    if not num_classes:
        raise ConfigError("cannot tell the number of classes: set model.num_classes or data.val.annotations")
    if recorded and len(categories) != num_classes:
        raise WeightsError(f"the weights {weights} do not fit the config: they were trained on {len(categories)} "
                           f"categories and the config sets model.num_classes: {num_classes}")
    if categories is None or len(categories) != num_classes:
        raise ConfigError(f"the model has {num_classes} classes but its categories are unknown or differ "
                          f"({len(categories or [])}); set data.val.annotations to the dataset it was trained on")
    try:
        model = build_model(cfg.model, num_classes)
    except (TypeError, ValueError) as exc:  # values that fit the schema but not one another
        raise ConfigError(f"cannot build the model the config describes: {exc}") from None
    misfit = weights_misfit(load_weights(model, state, skip_mismatched=True), model)
    if misfit:
        raise WeightsError(f"the weights {weights} do not fit the config: {misfit}")
    if not prepare:  # the caller runs prepare_for_inference itself (to keep its report)
        return model, categories
    model, _ = prepare_for_inference(model, cfg.runtime, device)
    return model, categories


def prepare_for_inference(model: nn.Module, runtime, device: torch.device):
    """`model` on `device` in eval mode, its batch norms folded (`runtime.fold_bn`), in channels_last memory
    (`runtime.channels_last`) and its dense parts compiled (`runtime.compile`): how eval, predict and the
    benchmark run a detector.

    Returns:
        (model, the `FoldReport`, or None when folding is off).
    """
    model = model.to(device).eval()
    report = None
    if runtime.fold_bn:
        from ..modeling.fold import fold_batchnorms

        report = fold_batchnorms(model)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    compile_model(model, runtime)
    return model, report
