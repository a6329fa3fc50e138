"""COCO evaluation with pycocotools: the 12-line AP/AR block, per-category AP, result files and plots.

AP and AR are fractions everywhere (0.190), as the 12-line block prints them: in tables, plots, metrics.json and
the training logs. A metric COCO leaves undefined (-1: AP small without small objects, a category without ground
truth) is left out of metrics.json and the logs and printed as "-" in detkit's tables; the 12-line block is
pycocotools' own text, which shows it as -1.000.
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..utils.fileio import write_json_atomic

import numpy as np

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
UNDEFINED = "-"  # how tables show a metric COCO leaves undefined


def defined(value: float) -> bool:
    """Whether a COCO metric is defined: pycocotools writes -1 where there is nothing to measure."""
    return value >= 0


@dataclass
class EvalResult:
    """The outcome of one COCO evaluation (one IoU type)."""

    iou_type: str
    stats: list  # the 12 numbers of COCOeval.stats, in its order (-1 where undefined)
    summary: str  # the 12-line block exactly as pycocotools prints it
    per_category: dict  # category name -> {"AP": .., "AP50": .., "AP75": ..} (-1 where the category has no GT)
    num_detections: int
    precision: np.ndarray = field(repr=False)  # (T, R, K, A, M) from COCOeval.eval["precision"]
    recall_thresholds: np.ndarray = field(repr=False)
    iou_thresholds: np.ndarray = field(repr=False)

    @property
    def metrics(self) -> dict:
        """The defined metrics of the 12-line block, name -> fraction (METRIC_NAMES; undefined ones left out)."""
        return {name: float(s) for name, s in zip(METRIC_NAMES, self.stats) if defined(s)}

    def defined_per_category(self) -> dict:
        """`per_category` without the undefined values: name -> {"AP", "AP50", "AP75"}, {} for no ground truth."""
        return {name: {k: v for k, v in row.items() if defined(v)} for name, row in self.per_category.items()}

    def per_category_table(self) -> str:
        """A table of per-category AP, AP50 and AP75, as fractions like the 12-line block ("-": undefined)."""
        names = list(self.per_category)
        width = max([len("category")] + [len(n) for n in names])
        lines = [f"{'category':<{width}} |    AP |  AP50 |  AP75", f"{'-' * width}-|-------|-------|------"]
        for name in names:
            row = self.per_category[name]
            cells = " | ".join(f"{row[k]:5.3f}" if defined(row[k]) else f"{UNDEFINED:>5}"
                               for k in ("AP", "AP50", "AP75"))
            lines.append(f"{name:<{width}} | {cells}")
        return "\n".join(lines)


class ResultsError(ValueError):
    """A detection results list is malformed; the message names the first offending entries."""


def load_gt(gt: str | Path | dict | Any):
    """Ground truth as a pycocotools COCO object, from a path, a parsed mapping or a COCO object."""
    from pycocotools.coco import COCO

    if isinstance(gt, COCO):
        return gt
    if isinstance(gt, (str, Path)):
        from ..data.coco import load_json

        gt = load_json(gt)
    data = dict(gt)
    anns = []
    for ann in data.get("annotations", []):
        ann = dict(ann)
        ann.setdefault("iscrowd", 0)
        if "area" not in ann and "bbox" in ann:  # COCOeval needs it; COCO itself falls back to the box
            ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
        anns.append(ann)
    data["annotations"] = anns
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def check_results(results: Sequence[dict], coco_gt, iou_type: str) -> list[dict]:
    """Validate a results list against the ground truth; returns shallow copies safe to hand to loadRes."""
    image_ids = set(coco_gt.getImgIds())
    cat_ids = set(coco_gt.getCatIds())
    problems: list[str] = []
    out = []
    for i, r in enumerate(results):
        if not isinstance(r, dict):
            problems.append(f"entry {i}: not a mapping")
            continue
        if r.get("image_id") not in image_ids:
            problems.append(f"entry {i}: unknown image_id {r.get('image_id')!r}")
        if r.get("category_id") not in cat_ids:
            problems.append(f"entry {i}: unknown category_id {r.get('category_id')!r} (results use the "
                            f"dataset's original category ids)")
        score = r.get("score")
        if not isinstance(score, (int, float)) or not math.isfinite(score):
            problems.append(f"entry {i}: score must be a finite number, got {score!r}")
        if iou_type == "bbox":
            b = r.get("bbox")
            if not (isinstance(b, (list, tuple)) and len(b) == 4 and all(
                    isinstance(v, (int, float)) and math.isfinite(v) for v in b)):
                problems.append(f"entry {i}: bbox must be 4 finite numbers [x, y, w, h], got {b!r}")
        elif not isinstance(r.get("segmentation"), dict):
            problems.append(f"entry {i}: segm results need an RLE 'segmentation'")
        if len(problems) >= 5:
            break
        out.append(dict(r))
    if problems:
        raise ResultsError("invalid detection results:\n  " + "\n  ".join(problems))
    return out


def evaluate(gt: str | Path | dict | Any, results: Sequence[dict] | str | Path, iou_type: str = "bbox",
             image_ids: Sequence[int] | None = None) -> EvalResult:
    """Evaluate detection results with the exact COCO protocol (pycocotools COCOeval).

    Args:
        gt: the ground-truth instances JSON (path, parsed mapping or pycocotools COCO).
        results: COCO results (a list, or the path of a JSON list): image_id, category_id (original ids),
            score, and bbox [x, y, w, h] or an RLE segmentation.
        iou_type: "bbox" or "segm".
        image_ids: evaluate only these images (default: every image of the ground truth).

    Returns:
        An EvalResult. No detections give AP 0 (not an error).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    coco_gt = load_gt(gt)
    if isinstance(results, (str, Path)):
        from ..data.coco import load_json

        results = load_json(results)
        if not isinstance(results, list):
            raise ResultsError("a results file must hold a JSON list")
    results = check_results(results, coco_gt, iou_type)
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        if results:
            coco_dt = coco_gt.loadRes(results)  # check_results made fresh dicts: loadRes may add keys to them
        else:  # loadRes cannot take an empty list; an empty result set is still a valid submission
            coco_dt = COCO()
            coco_dt.dataset = {"images": coco_gt.dataset.get("images", []),
                               "categories": copy.deepcopy(coco_gt.dataset.get("categories", [])),
                               "annotations": []}
            coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
    block = io.StringIO()
    with contextlib.redirect_stdout(block):
        evaluator.summarize()
    precision = evaluator.eval["precision"]  # (T, R, K, A, M)
    per_category = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        name = coco_gt.cats[cat_id].get("name", str(cat_id))
        p = precision[:, :, k, 0, -1]
        row = {"AP": _mean_valid(p)}
        for label, iou in (("AP50", 0.5), ("AP75", 0.75)):
            t = int(np.argmin(np.abs(evaluator.params.iouThrs - iou)))
            row[label] = _mean_valid(p[t])
        per_category[name] = row
    return EvalResult(iou_type=iou_type, stats=[float(s) for s in evaluator.stats], summary=block.getvalue(),
                      per_category=per_category, num_detections=len(results), precision=precision,
                      recall_thresholds=np.asarray(evaluator.params.recThrs),
                      iou_thresholds=np.asarray(evaluator.params.iouThrs))


def _mean_valid(p: np.ndarray) -> float:
    valid = p[p > -1]
    return float(valid.mean()) if valid.size else -1.0


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def plot_precision_recall(result: EvalResult, path: str | Path) -> Path:
    """PNG of the precision-recall curves (area all, 100 detections) at IoU 0.5, 0.75 and 0.5:0.95."""
    plt = _pyplot()
    r = result.recall_thresholds
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    curves = [("IoU=0.50", result.precision[[int(np.argmin(np.abs(result.iou_thresholds - 0.5)))]]),
              ("IoU=0.75", result.precision[[int(np.argmin(np.abs(result.iou_thresholds - 0.75)))]]),
              ("IoU=0.50:0.95", result.precision)]
    for label, p in curves:
        p = p[:, :, :, 0, -1]  # (T', R, K)
        masked = np.where(p > -1, p, np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column (no GT) is expected
            curve = np.nanmean(masked, axis=(0, 2))
        ap = _mean_valid(p)
        ax.plot(r, np.nan_to_num(curve), label=f"{label} (AP {ap:.3f})" if defined(ap) else f"{label} (AP -)")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(f"{result.iou_type}: precision-recall (area all, maxDets 100)")
    # below the axes, in one row: curves of a good model fill the upper right, a poor one's the lower left
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=len(curves), fontsize="small", frameon=False)
    return _save(fig, path)


def plot_per_category(result: EvalResult, path: str | Path) -> Path:
    """PNG bar chart of per-category AP (0.50:0.95), best first."""
    plt = _pyplot()
    items = sorted(((n, v["AP"]) for n, v in result.per_category.items() if defined(v["AP"])),
                   key=lambda item: -item[1])
    height = max(2.5, 0.28 * len(items) + 1)
    fig, ax = plt.subplots(figsize=(6, height), dpi=100)
    names = [n for n, _ in items]
    values = [v for _, v in items]
    ax.barh(range(len(items)), values, color="#4c72b0")
    ax.set_yticks(range(len(items)), names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.1)  # room for the value beside a bar at 1
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.set_xlabel("AP (IoU=0.50:0.95)")
    mean = f"{result.stats[0]:.3f}" if defined(result.stats[0]) else UNDEFINED
    ax.set_title(f"{result.iou_type}: AP per category (mean {mean})")
    for i, v in enumerate(values):
        ax.text(v + 0.01, i, f"{v:.3f}", va="center", fontsize=8)
    return _save(fig, path)


def save_evaluation(results_by_type: dict[str, EvalResult], out_dir: str | Path, plots: bool = True) -> dict:
    """Write metrics.json (and PR / per-category PNGs) for each evaluated IoU type; returns the file paths.

    metrics.json holds fractions, the defined metrics only (no -1, no NaN: it stays strict JSON)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = {t: {**r.metrics, "per_category": r.defined_per_category(), "num_detections": r.num_detections}
               for t, r in results_by_type.items()}
    files = {"metrics": write_json_atomic(metrics, out_dir / "metrics.json")}
    if plots:
        for t, r in results_by_type.items():
            files[f"{t}_pr"] = plot_precision_recall(r, out_dir / f"{t}_precision_recall.png")
            files[f"{t}_per_category"] = plot_per_category(r, out_dir / f"{t}_per_category_ap.png")
    return files
