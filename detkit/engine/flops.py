"""Model size and cost: parameters and multiply-adds (MACs) of one inference forward, by part of the detector.

Convention (that of published model-size tables): MACs are the multiply-accumulates of convolutions,
transposed convolutions and linear layers, i.e. the FLOPs that `torch.utils.flop_counter.FlopCounterMode` counts
for aten convolution / mm / addmm / bmm, divided by 2. Not counted: bias additions, normalisation, activations,
pooling, upsampling, input normalisation, RoIAlign, anchor generation, box decoding, top-k and NMS. (The
published RetinaNet R50-FPN 640 figure, 97.0 B, is these 96.88 B plus one add per convolution output, 0.12 B.)

Each part runs on its own under the counter, on the `meta` device by default: shapes only, no arithmetic, so
an R101 Cascade R-CNN at 800x1344 is counted in well under a second. A model that cannot run on `meta` (a
data-dependent op) is counted on CPU tensors instead. The dense parts (backbone, neck, RetinaNet head or RPN
head) run at the input size; the RoI heads of a two-stage detector run on a stated number of RoIs: the box
stages on `model.rpn.post_nms_topk_test` proposals per image, the mask head on `max_detections` detections (the
most the test-time forward feeds them; an image with fewer proposals or detections costs less).
"""
from __future__ import annotations

import logging
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from ..config.schema import Config, TransformConfig

logger = logging.getLogger(__name__)

# counted ops, for the report (FlopCounterMode also knows attention kernels; detkit's detectors use none)
COUNTED = "convolutions, transposed convolutions and linear layers (aten convolution/mm/addmm/bmm FLOPs / 2)"
EXCLUDED = ("bias adds, norms, activations, pooling, upsampling, input normalisation, RoIAlign, anchors, "
            "box decoding, top-k, NMS")
COCO_ID_SPACE = 91  # outputs indexed by COCO category id 0..90: the class count of the published tables


def count_macs(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, int]:
    """Run `fn(*args, **kwargs)` without gradients and count its multiply-adds.

    Returns:
        (fn's result, MACs of its convolutions and matrix products).
    """
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = fn(*args, **kwargs)
    return out, counter.get_total_flops() // 2  # FlopCounterMode counts a multiply-add as 2 FLOPs


def count_parameters(module: nn.Module | None) -> tuple[int, int]:
    """(all parameters, trainable ones) of `module`; shared parameters count once."""
    if module is None:
        return 0, 0
    params = list(module.parameters())  # deduplicated by nn.Module
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


@dataclass
class PartCost:
    """One part of a detector: its parameters and the MACs it spends in one forward of one image."""

    name: str
    params: int
    macs: int
    counted_at: str  # "800x1344" or "1000 RoIs (model.rpn.post_nms_topk_test)"
    per_roi: bool = False  # the cost scales with the number of RoIs, not the image size


@dataclass
class ModelCost:
    """Parameters and MACs of a detector for one image of `padded_size`, by part."""

    name: str
    arch: str
    num_classes: int
    num_classes_source: str
    input_size: tuple[int, int]  # (height, width) asked for
    padded_size: tuple[int, int]  # what the network sees, after padding to the config's divisibility
    size_source: str
    params: int
    trainable: int
    parts: list[PartCost] = field(default_factory=list)
    device: str = "meta"

    @property
    def macs(self) -> int:
        return sum(p.macs for p in self.parts)

    @property
    def dense_macs(self) -> int:
        """MACs at the input size: backbone, neck and dense heads (all of RetinaNet; no RoI heads)."""
        return sum(p.macs for p in self.parts if not p.per_roi)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(macs=self.macs, dense_macs=self.dense_macs, counted=COUNTED, excluded=EXCLUDED)
        return out

    def format(self) -> str:
        """A small table: parameters (M) and MACs (G) by part, the totals and what was counted."""
        h, w = self.padded_size
        size = f"{h}x{w}"
        if self.padded_size != self.input_size:
            size += f" ({self.input_size[0]}x{self.input_size[1]} padded to a multiple of the size divisibility)"
        lines = [*textwrap.wrap(f"{self.name}: {self.arch}, {self.num_classes} classes ({self.num_classes_source})",
                                110, subsequent_indent="  "),
                 *textwrap.wrap(f"input: {size}, from {self.size_source}", 110, subsequent_indent="  "),
                 f"{'part':<12} {'params (M)':>11} {'MACs (G)':>10}  counted at"]
        for p in self.parts:
            lines.append(f"{p.name:<12} {p.params / 1e6:>11.2f} {p.macs / 1e9:>10.2f}  {p.counted_at}")
        if any(p.per_roi for p in self.parts):
            dense = ", ".join(p.name for p in self.parts if not p.per_roi)
            lines.append(f"{'dense core':<12} {'':>11} {self.dense_macs / 1e9:>10.2f}  {dense} at {h}x{w}")
        lines += [f"{'total':<12} {self.params / 1e6:>11.2f} {self.macs / 1e9:>10.2f}",
                  f"{'trainable':<12} {self.trainable / 1e6:>11.2f}"]
        lines += textwrap.wrap(f"MACs: multiply-adds of {COUNTED}; not counted: {EXCLUDED}; counted on the "
                               f"{self.device} device.", 110)
        return "\n".join(lines)


def input_size(transform: TransformConfig, size: tuple[int, int] | None = None,
               ) -> tuple[tuple[int, int], tuple[int, int], str]:
    """The (height, width) to count at, what the network sees after padding, and where the size came from.

    `scale_jitter` configs test at `output_size` squared (a fixed size: no further padding). `resize_short`
    configs have no single size; the canonical one is the largest short side by `max_size` (800x1333 for the
    Detectron configs: the size of mmdetection's and detectron2's tables), padded to `size_divisibility` as the
    loader pads it (800x1344). An explicit `size` is padded the same way.
    """
    d = transform.size_divisibility
    if size is None and transform.mode == "scale_jitter":
        hw = (transform.output_size, transform.output_size)
        return hw, hw, f"data.test_transform (scale_jitter, output_size {transform.output_size})"
    if size is None:
        short = max(transform.short_sizes)
        hw = (short, max(short, transform.max_size))
        source = (f"data.test_transform (resize_short: the largest short side {short} by max_size "
                  f"{transform.max_size})")
    else:
        hw, source = (int(size[0]), int(size[1])), "--size"
    if min(hw) <= 0:
        raise ValueError(f"the input size must be positive, got {hw[0]}x{hw[1]}")
    return hw, (-(-hw[0] // d) * d, -(-hw[1] // d) * d), source


def resolve_num_classes(cfg: Config, override: int | None = None) -> tuple[int, str]:
    """The class count to build with, and where it came from.

    As `detkit eval`/`predict` without a checkpoint: `model.num_classes`, 91 for the coco91 label space, else
    the categories of `data.val.annotations`; when that file is absent, COCO's 91 ids (the published tables'
    convention; a detkit model trained on COCO has the 80 categories of the annotations).
    """
    if override is not None:
        if override <= 0:
            raise ValueError(f"--num-classes must be > 0, got {override}")
        return override, "--num-classes"
    if cfg.model.num_classes:
        return cfg.model.num_classes, "model.num_classes"
    if cfg.model.label_space == "coco91":
        return COCO_ID_SPACE, "model.label_space coco91"
    annotations = cfg.data.val.annotations
    if annotations and Path(annotations).is_file():
        from ..data.coco import load_json

        categories = load_json(annotations).get("categories", [])
        if categories:
            return len(categories), f"the categories of {annotations}"
    return COCO_ID_SPACE, (f"model.num_classes is 0 and data.val.annotations ({annotations or 'unset'}) is not "
                           "readable: COCO's 91 ids, as in published tables; --num-classes sets it")


def _is_two_stage(model: nn.Module) -> bool:
    return all(hasattr(model, name) for name in ("backbone", "rpn", "stages", "roi_features"))


def _is_dense(model: nn.Module) -> bool:
    return all(hasattr(model, name) for name in ("backbone", "neck", "head"))


def part_costs(model: nn.Module, images: Tensor) -> list[PartCost]:
    """Run the parts of `model` one by one on `images` ((1, 3, H, W), already normalised) and count each.

    RetinaNet-like detectors (backbone, neck, head): every part at the input size. Two-stage detectors
    (backbone, optional neck, RPN, box stages, optional mask head): the dense parts at the input size, the box
    stages on `rpn.post_nms_topk_test` RoIs per image, the mask head on `cfg.max_detections` detections.
    """
    h, w = images.shape[-2:]
    at_size = f"{h}x{w}"
    if _is_two_stage(model):
        return _two_stage_costs(model, images, at_size)
    if not _is_dense(model):
        raise TypeError(f"no cost model for {type(model).__name__}: detkit.engine.flops knows detectors with "
                        "backbone/neck/head (RetinaNet) and backbone/rpn/stages (R-CNN)")
    features, backbone = count_macs(model.backbone, images)
    parts = [PartCost("backbone", count_parameters(model.backbone)[0], backbone, at_size)]
    if model.neck is not None:
        features, neck = count_macs(model.neck, features)
        parts.append(PartCost("neck", count_parameters(model.neck)[0], neck, at_size))
    levels = list(features.values()) if isinstance(features, dict) else list(features)
    _, head = count_macs(model.head, levels)
    parts.append(PartCost("head", count_parameters(model.head)[0], head, at_size))
    return parts


def _two_stage_costs(model: nn.Module, images: Tensor, at_size: str) -> list[PartCost]:
    features, backbone = count_macs(model.backbone, images)
    parts = [PartCost("backbone", count_parameters(model.backbone)[0], backbone, at_size)]
    if model.neck is not None:
        features, neck = count_macs(model.neck, features)
        parts.append(PartCost("neck", count_parameters(model.neck)[0], neck, at_size))
    _, rpn = count_macs(model.rpn.head, [features[name] for name in model.rpn_features])
    parts.append(PartCost("rpn", count_parameters(model.rpn)[0], rpn, at_size))

    roi_map = features[model.roi_features[0]]
    # a backbone that stacks branches along the batch (TridentNet) gets its RoIs per branch
    num_images, channels = roi_map.shape[:2]
    num_rois = model.rpn.post_nms_topk_test * num_images
    pooled = roi_map.new_zeros((num_rois, channels, *model.box_pooler.output_size))  # (R, C, r, r)
    box = sum(count_macs(stage, pooled)[1] for stage in model.stages)
    rois = f"{num_rois} RoIs (model.rpn.post_nms_topk_test)"
    if num_images > 1:
        rois = f"{num_images} x {model.rpn.post_nms_topk_test} RoIs (model.rpn.post_nms_topk_test per branch)"
    stages = f", {len(model.stages)} stages" if len(model.stages) > 1 else ""
    parts.append(PartCost("box head", count_parameters(model.stages)[0], box, rois + stages, per_roi=True))
    if model.mask_head is not None:
        num_detections = model.cfg.max_detections
        if model.mask_pooler is not None:
            mask_rois = roi_map.new_zeros((num_detections, channels, *model.mask_pooler.output_size))
            _, mask = count_macs(model.mask_head, mask_rois)
            where = ""
        else:  # C4: res5 runs again on the detections' pooled features and the mask head reads its map
            mask_rois = roi_map.new_zeros((num_detections, channels, *model.box_pooler.output_size))
            (_, res5_map), res5 = count_macs(model.stages[0].head, mask_rois, return_map=True)
            _, mask = count_macs(model.mask_head, res5_map)
            mask, where = mask + res5, ", res5 included"
        parts.append(PartCost("mask head", count_parameters(model.mask_head)[0], mask,
                              f"{num_detections} detections (model.roi_heads.max_detections){where}", per_roi=True))
    return parts


def _build_and_count(cfg: Config, num_classes: int, padded_size: tuple[int, int],
                     device: str) -> tuple[nn.Module, list[PartCost]]:
    from ..modeling.build import build_model

    with torch.device(device):
        model = build_model(cfg.model, num_classes)
    model.eval()
    images = torch.zeros((1, 3, *padded_size), device=device)  # the normalised input
    return model, part_costs(model, images)


def measure(cfg: Config, size: tuple[int, int] | None = None, num_classes: int | None = None,
            device: str | None = None) -> ModelCost:
    """Build `cfg`'s detector and count its parameters and the MACs of one image's inference forward.

    Args:
        cfg: a detkit Config.
        size: (height, width) to count at; default: the config's test size (see `input_size`).
        num_classes: default: see `resolve_num_classes`.
        device: "meta" (shapes only) or "cpu"; default: meta, and CPU where the model cannot run on meta.

    Returns:
        the parameters (all and trainable) and per-part MACs.
    """
    k, k_source = resolve_num_classes(cfg, num_classes)
    requested, padded, size_source = input_size(cfg.data.test_transform, size)
    if device is None:
        try:
            model, parts = _build_and_count(cfg, k, padded, "meta")
            device = "meta"
        except (NotImplementedError, RuntimeError) as exc:  # a data-dependent op has no meta kernel
            logger.info("counting on CPU tensors: the model does not run on the meta device (%s)", exc)
            model, parts = _build_and_count(cfg, k, padded, "cpu")
            device = "cpu"
    else:
        model, parts = _build_and_count(cfg, k, padded, device)
    params, trainable = count_parameters(model)
    rest = params - sum(p.params for p in parts)
    if rest > 0:  # parameters outside the counted parts (none in detkit's detectors)
        parts.append(PartCost("other", rest, 0, "not run"))
    return ModelCost(name=cfg.name or cfg.model.arch, arch=cfg.model.arch, num_classes=k, num_classes_source=k_source,
                     input_size=requested, padded_size=padded, size_source=size_source, params=params,
                     trainable=trainable, parts=parts, device=device)
