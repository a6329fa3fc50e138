"""TridentNet's scale-aware training and testing (Li et al. 2019; SimpleDet's models/tridentnet): each branch owns a
valid range of object sizes, sqrt(w * h) in original-image pixels, and the detector folds its per-image inputs to match
the trident backbone's branch-major folded batch (row `b * N + n` is image n seen by branch b; see
`backbones/trident.py`).

Where the ranges act (SimpleDet's TridentNet):
  * RPN targets: per branch, anchors whose IoU with an out-of-range ground-truth box exceeds 0.3 are ignored.
  * RPN proposals, in training: boxes outside the branch's range are dropped before NMS.
  * Test (all branches): each branch's detections outside its range are dropped, then the branches of an image
    are merged and go through the usual score threshold, per-class NMS and top-k together.
R-CNN labels use every ground-truth box (SimpleDet's ProposalTarget_v2 only skips out-of-range boxes when it
appends the ground truth to the proposals, which `TwoStageDetector` mirrors).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from ..ops.boxes import box_area, box_iou
from .batching import pad_per_image
from .matcher import IGNORE


def box_scale_in_range(boxes: Tensor, ranges: Tensor) -> Tensor:
    """Whether sqrt(w * h) of each box lies in [low, high] (both ends included, as in SimpleDet).

    Args:
        boxes: (..., 4) xyxy boxes; ranges: (..., 2) (low, high), broadcastable against boxes[..., 0].

    Returns:
        (...) bool.
    """
    scale = box_area(boxes).sqrt()
    ranges = ranges.to(scale)
    return (scale >= ranges[..., 0]) & (scale <= ranges[..., 1])


def branch_ranges(valid_ranges: Tensor, image_scales: Tensor) -> Tensor:
    """Per folded row, its branch's range in network pixels: the original-pixel ranges times each image's scale.

    Args:
        valid_ranges: (B, 2) per branch (low, high) in original-image pixels.
        image_scales: (N,) network pixels per original pixel of each image.

    Returns:
        (B*N, 2), branch-major.
    """
    # (B, 1, 2) * (1, N, 1) -> (B, N, 2) -> (B*N, 2)
    return (valid_ranges[:, None, :] * image_scales.to(valid_ranges)[None, :, None]).reshape(-1, 2)


@torch.no_grad()
def ignore_out_of_range_anchors(labels: Tensor, anchors: Tensor, gt_boxes: list[Tensor], valid_ranges: Tensor,
                                iou_threshold: float = 0.3) -> Tensor:
    """Set to IGNORE the anchors whose IoU with some out-of-range ground-truth box exceeds `iou_threshold`.

    Args:
        labels: (N, A) anchor labels (FOREGROUND / BACKGROUND / IGNORE) from the matcher.
        anchors: (A, 4) anchors; gt_boxes: per (folded) image (G_i, 4).
        valid_ranges: (N, 2) each image's range in network pixels.

    Returns:
        (N, A) labels, same dtype.
    """
    n, a = labels.shape
    boxes, valid = pad_per_image([b.to(anchors).float() for b in gt_boxes], 4)  # (N, G, 4)
    g = boxes.shape[1]
    if g == 0:
        return labels
    outside = valid & ~box_scale_in_range(boxes, valid_ranges[:, None, :])  # (N, G)
    # (N*G, A) -> (N, G, A); in-range and padding boxes cannot veto an anchor
    iou = box_iou(boxes.view(-1, 4), anchors.float()).view(n, g, a).masked_fill(~outside[..., None], 0.0)
    return labels.masked_fill(iou.amax(dim=1) > iou_threshold, IGNORE)


def unfold_branches(x: Tensor, num_images: int) -> Tensor:
    """(B*N, P, ...) branch-major -> (N, B*P, ...): each image's rows of every branch side by side."""
    b = x.shape[0] // num_images
    rest = x.shape[2:]
    # (B*N, P, ...) -> (B, N, P, ...) -> (N, B, P, ...) -> (N, B*P, ...)
    return x.reshape(b, num_images, *x.shape[1:]).transpose(0, 1).reshape(num_images, -1, *rest)


@dataclass
class TridentBranches:
    """The detector's side of TridentNet: folding per-image inputs, the branch ranges, merging the branches.

    Args:
        valid_ranges: per branch (low, high) of sqrt(w * h) in original-image pixels.
        scale_aware: False ignores the ranges everywhere (Trident-Fast training in SimpleDet, detectron2).
    """

    valid_ranges: Sequence[Sequence[float]]
    scale_aware: bool = True
    # per device: (the valid_ranges the tensor was built from, (B, 2) float32 tensor); rebuilt when they change
    _ranges_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def num_branches(self) -> int:
        return len(self.valid_ranges)

    def ranges(self, num_images: int, num_active: int, image_scales: Tensor | None, device: torch.device,
               ) -> Tensor | None:
        """(B*N, 2) ranges in network pixels of the folded rows, or None when nothing is filtered.

        Ranges apply only when every branch runs (Trident-Fast testing runs one branch on all sizes). Without
        `image_scales` the ranges are taken in network pixels (scale 1).
        """
        if not self.scale_aware or num_active != self.num_branches:
            return None
        scales = torch.ones(num_images, device=device) if image_scales is None else image_scales.to(device)
        return branch_ranges(self._valid_ranges_tensor(device), scales.float())

    def _valid_ranges_tensor(self, device: torch.device) -> Tensor:
        """(B, 2) float32 `valid_ranges` on `device`, built once per device (and again if the ranges change)."""
        key = tuple(tuple(float(v) for v in r) for r in self.valid_ranges)
        cached = self._ranges_cache.get(torch.device(device))
        if cached is None or cached[0] != key:
            cached = (key, torch.tensor(key, dtype=torch.float32, device=device))
            self._ranges_cache[torch.device(device)] = cached
        return cached[1]

    @staticmethod
    def fold(image_sizes: Tensor, targets: list | None, num_branches: int) -> tuple[Tensor, list | None]:
        """Repeat per-image inputs once per branch, branch-major, to match the folded feature maps."""
        # (N, 2) -> (B*N, 2)
        sizes = image_sizes.repeat(num_branches, 1)
        return sizes, None if targets is None else list(targets) * num_branches

    @staticmethod
    def merge(scores: Tensor, boxes: Tensor, ranges: Tensor | None, num_images: int) -> tuple[Tensor, Tensor]:
        """Drop each branch's detections outside its range, then put an image's branches side by side.

        Args:
            scores: (B*N, P, K) class probabilities of the folded rows; boxes: (B*N, P, K or 1, 4), clipped.
            ranges: (B*N, 2) or None (no filtering).

        Returns:
            scores (N, B*P, K) with filtered entries set to 0 (below any score threshold), boxes (N, B*P, K or 1, 4).
        """
        if ranges is not None:
            # a class-specific box per (RoI, class), or one box per RoI: (B*N, P, K or 1) -> broadcast to K
            inside = box_scale_in_range(boxes, ranges[:, None, None, :])
            scores = scores * inside
        return unfold_branches(scores, num_images), unfold_branches(boxes, num_images)
