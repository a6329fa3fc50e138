"""Greedy non-maximum suppression in pure PyTorch, exact (same kept set and order as the textbook loop).

Boxes are visited in blocks of `block_size` in descending score order. A block is first suppressed by every
box kept from earlier blocks (one batched IoU), then resolved inside by iterating
    keep_j = alive_j and not any(keep_i and iou_ij > t for i before j in the block)
to its fixed point. The fixed point is unique and equals the greedy result (entry j depends only on earlier
entries); the number of iterations is the longest chain of suppressions in the block, usually a handful.
The only Python loops are over blocks and those iterations, never over boxes.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .boxes import box_iou

KEPT_CHUNK = 8192  # kept boxes compared at once against a block: bounds memory to block_size * KEPT_CHUNK


def _suppressed_by(block: Tensor, block_ids: Tensor | None, kept: Tensor, kept_ids: Tensor | None,
                   iou_threshold: float) -> Tensor:
    """(B,) mask of block boxes overlapping any kept box (of the same class) above the threshold."""
    out = torch.zeros(block.shape[0], dtype=torch.bool, device=block.device)
    for start in range(0, kept.shape[0], KEPT_CHUNK):
        overlap = box_iou(block, kept[start:start + KEPT_CHUNK]) > iou_threshold  # (B, C)
        if block_ids is not None:
            overlap &= block_ids[:, None] == kept_ids[None, start:start + KEPT_CHUNK]
        out |= overlap.any(dim=1)
    return out


def _descending(scores: Tensor, indices: Tensor) -> Tensor:
    """`indices` ordered by descending score, ties by ascending index (the textbook loop's order)."""
    indices = indices.sort().values
    return indices[torch.sort(scores[indices].float(), descending=True, stable=True).indices]


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, idxs: Tensor | None = None,
        max_output: int | None = None, block_size: int = 512) -> Tensor:
    """Greedy NMS.

    Args:
        boxes: (N, 4) xyxy boxes, any float dtype (IoU is computed in float32).
        scores: (N,) scores; ties keep the lower index first.
        iou_threshold: a box is removed when its IoU with a higher-scoring kept box is > this.
        idxs: optional (N,) class (or image) indices: boxes of different indices never suppress each other.
            Boxes are then visited class by class, so a block meets only the kept boxes of its own classes.
        max_output: return only the first max_output kept boxes (without idxs the search also stops there).
        block_size: boxes resolved together; larger blocks mean fewer Python iterations and more memory.

    Returns:
        (K,) int64 indices of the kept boxes, in descending score order.
    """
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    all_indices = torch.arange(boxes.shape[0], device=boxes.device)
    order = _descending(scores, all_indices)
    if idxs is not None:  # class-major, each class in descending score order
        order = order[torch.sort(idxs[order], stable=True).indices]
    sorted_boxes = boxes[order].float()
    sorted_ids = idxs[order] if idxs is not None else None
    kept_chunks: list[Tensor] = []  # positions (into `order`) of kept boxes, block by block
    kept_boxes = sorted_boxes[:0]
    kept_ids = sorted_ids[:0] if sorted_ids is not None else None
    for start in range(0, sorted_boxes.shape[0], block_size):
        block = sorted_boxes[start:start + block_size]
        block_ids = sorted_ids[start:start + block_size] if sorted_ids is not None else None
        others, other_ids = kept_boxes, kept_ids
        if block_ids is not None and kept_ids.numel():
            # kept boxes are class-major too: those of this block's classes form a suffix
            first = int(torch.searchsorted(kept_ids, block_ids[:1]).item())
            others, other_ids = kept_boxes[first:], kept_ids[first:]
        alive = ~_suppressed_by(block, block_ids, others, other_ids, iou_threshold) if others.numel() else \
            torch.ones(block.shape[0], dtype=torch.bool, device=block.device)
        # suppresses[i, j]: i comes before j in the block and overlaps it
        suppresses = torch.triu(box_iou(block, block) > iou_threshold, diagonal=1)
        if block_ids is not None:
            suppresses &= block_ids[:, None] == block_ids[None, :]
        suppresses &= alive[:, None]
        keep = alive
        while True:
            new_keep = alive & ~(suppresses & keep[:, None]).any(dim=0)
            if torch.equal(new_keep, keep):
                break
            keep = new_keep
        kept_chunks.append(torch.nonzero(keep).squeeze(1) + start)
        kept_boxes = torch.cat([kept_boxes, block[keep]])
        if kept_ids is not None:
            kept_ids = torch.cat([kept_ids, block_ids[keep]])
        elif max_output is not None and kept_boxes.shape[0] >= max_output:
            break  # score order: the first max_output kept boxes are final
    kept = order[torch.cat(kept_chunks)]
    if idxs is not None:
        kept = _descending(scores, kept)
    return kept[:max_output] if max_output is not None else kept


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float,
                max_output: int | None = None) -> Tensor:
    """NMS applied independently per value of `idxs` (class or image); returns kept indices by descending score."""
    return nms(boxes, scores, iou_threshold, idxs=idxs, max_output=max_output)
