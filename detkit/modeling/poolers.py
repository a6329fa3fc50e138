"""RoI feature pooling for two-stage heads: FPN level assignment, then RoIAlign on each box's level."""
from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
from torch import Tensor, nn

from detkit.ops.boxes import box_area
from detkit.ops.roi_align import roi_align


def assign_levels(boxes: Tensor, min_level: int, max_level: int, canonical_size: float = 224.0,
                  canonical_level: int = 4, eps: float = 1e-8) -> Tensor:
    """Pyramid level of each box: floor(canonical_level + log2(sqrt(area) / canonical_size + eps)), clamped.

    The FPN paper's rule (eq. 1) in the Detectron2 form: eps sits inside the log, so that a box of exactly
    canonical_size * 2^k lands on level canonical_level + k despite rounding. Computed in float32.

    Args:
        boxes: (R, 4) xyxy boxes in input-image pixels. Degenerate and NaN boxes go to min_level.
        min_level, max_level: the levels available, e.g. 2 and 5 for P2-P5.
        canonical_size, canonical_level: a box of side canonical_size (224, the ImageNet crop) maps to
            canonical_level (P4).
        eps: added to sqrt(area) / canonical_size before the log (torchvision uses 1e-6).

    Returns:
        (R,) int64 absolute levels in [min_level, max_level] (subtract min_level to index a list of levels).
    """
    with torch.autocast(device_type=boxes.device.type, enabled=False):
        sizes = box_area(boxes).sqrt()  # float32 (float64 for float64 boxes)
        levels = torch.floor(canonical_level + torch.log2(sizes / canonical_size + eps))
    # a non-finite box (NaN deltas after an overflow) goes to min_level instead of an integer far out of range
    return torch.nan_to_num(levels, nan=min_level).clamp(min_level, max_level).long()


def boxes_to_rois(boxes: Sequence[Tensor]) -> Tensor:
    """Per-image boxes -> one (R, 5) tensor of (batch_index, x1, y1, x2, y2), R = sum R_i, images in order.

    Args:
        boxes: per image an (R_i, 4) xyxy tensor; at least one image.
    """
    if len(boxes) == 0:
        raise ValueError("boxes_to_rois needs at least one image (an empty (0, 4) tensor for no boxes)")
    # (R_i, 1) batch column next to (R_i, 4) boxes -> (R_i, 5), then stacked over images
    return torch.cat([torch.cat([b.new_full((b.shape[0], 1), i), b], dim=1) for i, b in enumerate(boxes)])


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


class MultiScaleRoIPooler(nn.Module):
    """RoIAlign over a feature pyramid: each box is pooled from the level its size selects.

    With one level every box is pooled from it (C4 heads). With several, the levels must be consecutive powers
    of two (scale 2^-k for level k, finest first) and boxes are assigned by `assign_levels`. The loop runs over
    levels only; each level's output is copied into its rows of the result. Finding each level's rows reads a
    data-dependent size on the host (one synchronisation per level).

    Args:
        output_size: oh = ow, or (oh, ow): 7 for box heads, 14 for mask heads and C4.
        scales: spatial scale (1 / stride) of every input level, finest first, e.g. (1/4, 1/8, 1/16, 1/32).
        sampling_ratio, aligned, mode: as in `roi_align`; Detectron2 uses (0, True), torchvision (2, False).
        canonical_size, canonical_level: the FPN assignment rule's anchor point (224 -> level 4).
        eps: inside the assignment's log (Detectron2 1e-8, torchvision 1e-6).
    """

    def __init__(self, output_size: int | tuple[int, int], scales: Sequence[float], sampling_ratio: int = 0,
                 aligned: bool = True, canonical_size: float = 224.0, canonical_level: int = 4,
                 mode: Literal["avg", "max"] = "avg", eps: float = 1e-8) -> None:
        super().__init__()
        self.output_size = _pair(output_size)
        self.scales = tuple(float(s) for s in scales)
        if not self.scales:
            raise ValueError("MultiScaleRoIPooler needs at least one level")
        levels = [-math.log2(s) for s in self.scales]
        self.min_level = round(levels[0])
        self.max_level = self.min_level + len(levels) - 1
        expected = range(self.min_level, self.max_level + 1)
        if len(levels) > 1 and any(not math.isclose(lv, k, abs_tol=1e-6) for lv, k in zip(levels, expected)):
            raise ValueError(f"scales must be 2^-k for consecutive levels k, finest first; got {self.scales}")
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.mode = mode
        self.canonical_size = canonical_size
        self.canonical_level = canonical_level
        self.eps = eps

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, scales={self.scales}, sampling_ratio={self.sampling_ratio}, "
                f"aligned={self.aligned}, mode={self.mode!r}")

    def forward(self, features: Sequence[Tensor], boxes: Sequence[Tensor]) -> Tensor:
        """Pool every box from its level.

        Args:
            features: per level an (N, C, H_l, W_l) map, in the order of `scales` (a list, not a dict).
            boxes: per image an (R_i, 4) xyxy tensor in input-image pixels; N tensors (empty ones allowed).

        Returns:
            (sum R_i, C, oh, ow) in the order of torch.cat(boxes), in the features' dtype.
        """
        if len(features) != len(self.scales):
            raise ValueError(f"expected {len(self.scales)} feature levels (one per scale), got {len(features)}")
        if len(boxes) != features[0].shape[0]:
            raise ValueError(f"{len(boxes)} box tensors for a batch of {features[0].shape[0]} images")
        rois = boxes_to_rois(boxes)  # (R, 5)
        kwargs = dict(output_size=self.output_size, sampling_ratio=self.sampling_ratio, aligned=self.aligned,
                      mode=self.mode)
        if len(features) == 1:
            return roi_align(features[0], rois, spatial_scale=self.scales[0], **kwargs)
        levels = assign_levels(rois[:, 1:], self.min_level, self.max_level, self.canonical_size,
                               self.canonical_level, self.eps) - self.min_level  # (R,) index into features
        channels = features[0].shape[1]
        out = features[0].new_zeros((rois.shape[0], channels, *self.output_size))
        # rows grouped by level: a stable sort and the per-level counts, read in one host synchronisation
        order = torch.argsort(levels, stable=True)
        counts = (levels[None, :] == torch.arange(len(features), device=levels.device)[:, None]).sum(dim=1)
        for index, feature, scale in zip(order.split(counts.tolist()), features, self.scales):
            # pooled even when empty, so that the result stays connected to every level's graph
            pooled = roi_align(feature, rois[index], spatial_scale=scale, **kwargs)
            out.index_copy_(0, index, pooled.to(out.dtype))
        return out
