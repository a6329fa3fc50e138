"""Pure box functions on plain tensors. Boxes are absolute xyxy pixels unless a name says otherwise.

IoU and areas are computed in float32 (or float64 when given float64) even under autocast: half precision
overflows on pixel areas (640 * 640 > 65504) and loses the small differences IoU thresholds depend on.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _upcast(t: Tensor) -> Tensor:
    """float16/bfloat16 -> float32; integers -> float32; float32/float64 unchanged."""
    if t.is_floating_point():
        return t if t.dtype in (torch.float32, torch.float64) else t.float()
    return t.float()


def box_area(boxes: Tensor) -> Tensor:
    """Areas of (..., N, 4) xyxy boxes -> (..., N). Degenerate boxes (x1 < x0) have area 0."""
    boxes = _upcast(boxes)
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def box_intersection(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise intersection areas of (..., N, 4) and (..., M, 4) boxes -> (..., N, M) (leading dims broadcast)."""
    boxes1, boxes2 = _upcast(boxes1), _upcast(boxes2)
    top_left = torch.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])  # (..., N, M, 2)
    bottom_right = torch.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU of (..., N, 4) and (..., M, 4) xyxy boxes -> (..., N, M) in float32 (float64 for float64
    input); leading dims (e.g. images of a batch) broadcast.

    A pair whose union is empty (two degenerate boxes) has IoU 0.
    """
    with torch.autocast(device_type=boxes1.device.type, enabled=False):
        inter = box_intersection(boxes1, boxes2)
        union = box_area(boxes1)[..., :, None] + box_area(boxes2)[..., None, :] - inter
        return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(inter))


def box_ioa(boxes: Tensor, regions: Tensor) -> Tensor:
    """Intersection over the area of each box in `boxes` (..., N, 4) with `regions` (..., M, 4) -> (..., N, M).

    This is how COCO treats crowd regions: the share of a detection (or anchor) covered by the region.
    """
    with torch.autocast(device_type=boxes.device.type, enabled=False):
        inter = box_intersection(boxes, regions)
        area = box_area(boxes)[..., :, None]
        return torch.where(area > 0, inter / area.clamp(min=torch.finfo(area.dtype).tiny), torch.zeros_like(inter))


def clip_boxes(boxes: Tensor, size: tuple[int, int] | Tensor) -> Tensor:
    """Clip (..., 4) xyxy boxes to an image of size (height, width)."""
    h, w = (int(size[0]), int(size[1]))
    x = boxes[..., 0::2].clamp(0, w)
    y = boxes[..., 1::2].clamp(0, h)
    # (..., 2), (..., 2) -> (..., 4) in x0, y0, x1, y1 order
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def clip_boxes_per_image(boxes: Tensor, image_sizes: Tensor) -> Tensor:
    """Clip (N, ..., 4) xyxy boxes of a batch to each image's own (height, width) from (N, 2)."""
    # (N, 2) -> (N, 1, ..., 1) bounds that broadcast over the boxes of each image
    sizes = image_sizes.to(boxes).view(-1, *([1] * (boxes.dim() - 2)), 2)
    w, h = sizes[..., 1], sizes[..., 0]
    return torch.stack([boxes[..., 0].clamp(min=0).minimum(w), boxes[..., 1].clamp(min=0).minimum(h),
                        boxes[..., 2].clamp(min=0).minimum(w), boxes[..., 3].clamp(min=0).minimum(h)], dim=-1)


def nonempty(boxes: Tensor, min_size: float = 0.0) -> Tensor:
    """Mask (N,) of boxes whose width and height both exceed `min_size`."""
    return ((boxes[:, 2] - boxes[:, 0]) > min_size) & ((boxes[:, 3] - boxes[:, 1]) > min_size)


def xyxy_to_xywh(boxes: Tensor) -> Tensor:
    return torch.cat([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], dim=-1)


def xywh_to_xyxy(boxes: Tensor) -> Tensor:
    return torch.cat([boxes[..., :2], boxes[..., :2] + boxes[..., 2:]], dim=-1)


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    return torch.cat([(boxes[..., :2] + boxes[..., 2:]) / 2, boxes[..., 2:] - boxes[..., :2]], dim=-1)


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    half = boxes[..., 2:] / 2
    return torch.cat([boxes[..., :2] - half, boxes[..., :2] + half], dim=-1)
