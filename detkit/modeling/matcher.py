"""Assign each anchor (or proposal) to a ground-truth box by IoU, batched over images."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..ops.boxes import box_ioa, box_iou
from .batching import pad_per_image

FOREGROUND, BACKGROUND, IGNORE = 1, 0, -1


@dataclass(frozen=True)
class Matcher:
    """IoU intervals -> labels, e.g. thresholds (0.4, 0.5) with labels (0, -1, 1): IoU < 0.4 background,
    [0.4, 0.5) ignored, >= 0.5 foreground (RetinaNet); (0.5,) with (0, 1) has no ignore band (TF).

    With `allow_low_quality_matches`, the anchors with the highest IoU for a ground-truth box become
    foreground too (ties included), so every box that overlaps any anchor gets at least one. A box that
    overlaps no anchor at all does not turn zero-IoU anchors into foreground.
    """

    thresholds: Sequence[float] = (0.4, 0.5)
    labels: Sequence[int] = (BACKGROUND, IGNORE, FOREGROUND)
    allow_low_quality_matches: bool = True

    def __post_init__(self) -> None:
        if list(self.thresholds) != sorted(self.thresholds):
            raise ValueError(f"thresholds must be increasing, got {self.thresholds}")
        if len(self.labels) != len(self.thresholds) + 1:
            raise ValueError("need one more label than thresholds")

    def __call__(self, iou: Tensor, gt_valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Match.

        Args:
            iou: (..., G, A) IoU of G ground-truth boxes with A anchors (a batch may lead: (N, G, A)).
            gt_valid: optional (..., G) mask of real boxes; padding rows are never matched.

        Returns:
            matched_idxs: (..., A) int64 index of the best ground-truth box per anchor (0 where G == 0).
            labels: (..., A) int8 FOREGROUND / BACKGROUND / IGNORE.
        """
        *lead, num_gt, num_anchors = iou.shape
        if num_gt == 0:
            return (torch.zeros(*lead, num_anchors, dtype=torch.int64, device=iou.device),
                    torch.full((*lead, num_anchors), self.labels[0], dtype=torch.int8, device=iou.device))
        iou = iou.float()
        if gt_valid is not None:
            iou = iou.masked_fill(~gt_valid[..., None], -1.0)
        max_iou, matched_idxs = iou.max(dim=-2)  # (..., A)
        labels = torch.empty_like(matched_idxs, dtype=torch.int8)  # the intervals below cover every IoU
        lows = [float("-inf"), *self.thresholds]
        highs = [*self.thresholds, float("inf")]
        for low, high, label in zip(lows, highs, self.labels):
            labels.masked_fill_((max_iou >= low) & (max_iou < high), label)  # no boolean indexing: no sync
        if self.allow_low_quality_matches:
            best_per_gt = iou.max(dim=-1, keepdim=True).values  # (..., G, 1)
            is_best = ((iou == best_per_gt) & (best_per_gt > 0)).any(dim=-2)  # (..., A)
            labels.masked_fill_(is_best, FOREGROUND)
        return matched_idxs, labels


@torch.no_grad()
def match_anchors(anchors: Tensor, gt_boxes: list[Tensor], ignore_boxes: list[Tensor] | None, matcher: Matcher,
                  crowd_ioa: float = 0.5) -> tuple[Tensor, Tensor, Tensor]:
    """Match the anchors shared by a batch to each image's ground truth, with crowd regions ignored.

    Args:
        anchors: (A, 4) anchors of all levels, concatenated.
        gt_boxes: per image (G_i, 4) boxes (G_i may be 0).
        ignore_boxes: per image (M_i, 4) crowd regions, or None: background anchors covered by more than
            `crowd_ioa` of their area become IGNORE (a crowd is neither an object to find nor background).
        matcher: IoU thresholds and labels.

    Returns:
        matched_idxs: (N, A) int64 index of the matched ground truth in its image (0 where there is none).
        labels: (N, A) FOREGROUND / BACKGROUND / IGNORE.
        matched_boxes: (N, A, 4) float32 matched ground-truth box (the anchor itself where there is none).
    """
    n, a = len(gt_boxes), anchors.shape[0]
    anchors = anchors.float()
    boxes, valid = pad_per_image([b.to(anchors) for b in gt_boxes], 4)  # (N, G, 4)
    g = boxes.shape[1]
    # (N*G, A) -> (N, G, A)
    iou = box_iou(boxes.view(-1, 4), anchors).view(n, g, a)
    matched_idxs, labels = matcher(iou, valid)  # (N, A)
    if g > 0:
        # (N, G, 4) gathered at (N, A) -> (N, A, 4)
        matched_boxes = boxes.gather(1, matched_idxs[..., None].expand(n, a, 4))
    else:
        matched_boxes = anchors[None].expand(n, a, 4).clone()
    if ignore_boxes is not None and any(r.numel() for r in ignore_boxes):
        regions, region_valid = pad_per_image([r.to(anchors) for r in ignore_boxes], 4)  # (N, M, 4)
        m = regions.shape[1]
        # (A, N*M) -> (A, N, M) -> (N, A, M)
        ioa = box_ioa(anchors, regions.view(-1, 4)).view(a, n, m).permute(1, 0, 2)
        covered = (ioa * region_valid[:, None, :]).amax(dim=2) > crowd_ioa  # (N, A)
        labels = labels.masked_fill(covered & (labels == BACKGROUND), IGNORE)
    return matched_idxs, labels, matched_boxes
