"""Assign each anchor (or proposal) to a ground-truth box by IoU, batched over images."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

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
            labels[(max_iou >= low) & (max_iou < high)] = label
        if self.allow_low_quality_matches:
            best_per_gt = iou.max(dim=-1, keepdim=True).values  # (..., G, 1)
            is_best = ((iou == best_per_gt) & (best_per_gt > 0)).any(dim=-2)  # (..., A)
            labels[is_best] = FOREGROUND
        return matched_idxs, labels
