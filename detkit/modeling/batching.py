"""Batched helpers shared by the detectors: per-image padding, per-image NMS and the detections record."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..ops.nms import batched_nms


@dataclass
class Detections:
    """Detections of one image in network-input pixels, by descending score."""

    boxes: Tensor  # (D, 4) float32 xyxy
    scores: Tensor  # (D,)
    labels: Tensor  # (D,) int64, contiguous 0..K-1
    mask_probs: Tensor | None = None  # (D, M, M) mask probabilities inside each box (Mask R-CNN)


def pad_per_image(tensors: list[Tensor], width: int, fill: float = 0.0) -> tuple[Tensor, Tensor]:
    """Stack per-image (G_i, width) rows into (N, G_max, width) with a (N, G_max) validity mask."""
    num = max((t.shape[0] for t in tensors), default=0)
    device = tensors[0].device
    out = torch.full((len(tensors), num, width), fill, dtype=tensors[0].dtype, device=device)
    valid = torch.zeros((len(tensors), num), dtype=torch.bool, device=device)
    for i, t in enumerate(tensors):  # a loop over images, not boxes
        out[i, : t.shape[0]] = t.reshape(-1, width)
        valid[i, : t.shape[0]].fill_(True)  # fill_, not `= True`: no tensor made from a Python value
    return out, valid


def nms_per_image(boxes: Tensor, scores: Tensor, labels: Tensor, image_idxs: Tensor, num_images: int,
                  num_classes: int, *, nms_threshold: float, max_detections: int) -> tuple[Tensor, list[int]]:
    """Class-wise NMS for candidates of a whole batch in one call, then the best `max_detections` per image.

    Args:
        boxes: (C, 4) candidates of all images; scores, labels, image_idxs: (C,).

    Returns:
        Indices of the kept candidates grouped by image (by descending score within an image), and how many
        each image kept (for `split`).
    """
    # boxes of different (image, class) pairs never suppress each other
    kept = batched_nms(boxes, scores, image_idxs * num_classes + labels, nms_threshold)
    # kept is by descending score; a stable sort by image keeps that order within each image
    kept = kept[torch.sort(image_idxs[kept], stable=True).indices]
    counts = torch.bincount(image_idxs[kept], minlength=num_images)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(kept.numel(), device=boxes.device) - starts[image_idxs[kept]]
    kept = kept[rank < max_detections]
    return kept, torch.bincount(image_idxs[kept], minlength=num_images).tolist()
