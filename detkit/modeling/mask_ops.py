"""Mask R-CNN mask plumbing: training targets cropped to RoIs, test-time pasting into the image, COCO RLE.

Ground-truth masks arrive per image as `Targets.masks`: one entry per non-crowd object, either polygons (a list of
flat float32 arrays [x0, y0, x1, y1, ...] in network pixels) or an (H, W) uint8 bitmap (decoded RLE), both already
transformed to the network input (see `detkit.data.transforms`).

Conventions follow Detectron2 so that published mask APs are reproducible:
* polygons are moved into the RoI frame, scaled to size x size and rasterised there by pycocotools;
* bitmaps are cropped and resampled like `roi_align(aligned=True, sampling_ratio=0)`: each output cell averages
  ceil(roi_size / size) x ceil(roi_size / size) bilinear samples, pixel i's value sits at coordinate i + 0.5;
* both are binarised at 0.5;
* at test time a mask is pasted by mapping every pixel centre (x + 0.5, y + 0.5) into the box frame and sampling
  bilinearly like `grid_sample(align_corners=False, padding_mode="zeros")`. `paste_masks(mode="torchvision")`
  pastes as torchvision's `paste_masks_in_image` does instead, for its Mask R-CNN weights: the mask gets a
  one-cell zero border, its box grows by (M + 2) / M and is truncated to integer pixels, and the padded mask is
  resized bilinearly (`interpolate(align_corners=False)`) onto those x1 - x0 + 1 by y1 - y0 + 1 pixels.

Bitmaps are cropped with `detkit.ops.roi_align`. Pasting samples a regular grid, which is separable: it is written
as `W_y @ mask @ W_x^T` with small per-axis weight matrices, exact, batched, and cheap on CPU and CUDA alike.
"""
from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import torch
from torch import Tensor

from ..ops.roi_align import roi_align

# Upper bound on the float32 scratch memory of one chunk in `paste_masks`.
DEFAULT_CHUNK_BYTES = 256 * 2**20


# ---------------------------------------------------------------------------------------------------- training


@torch.no_grad()
def mask_targets_per_image(gt_masks: Sequence[list | np.ndarray] | None, matched_idxs: Tensor, rois: Tensor,
                           size: int = 28) -> Tensor:
    """Binary mask targets of the positive RoIs of one image.

    Each RoI gets the mask of its matched ground-truth object, cropped to the RoI and resampled to size x size.

    Args:
        gt_masks: `Targets.masks` of the image, G entries: polygons (list of flat float arrays, network pixels)
            or an (H, W) uint8 bitmap. May be None only when there are no positive RoIs.
        matched_idxs: (P,) int64, index into `gt_masks` of each positive RoI.
        rois: (P, 4) xyxy network pixels.
        size: output resolution (28 for the FPN mask head, 14 for C4).

    Returns:
        (P, size, size) float32 of 0s and 1s on `rois.device`.

    Polygons are rasterised on the CPU (pycocotools), one call for all polygons of the image; bitmaps are
    cropped on `rois.device`. Reading RoIs back to the host is a synchronisation, unavoidable with host masks.
    """
    device = rois.device
    num_rois = rois.shape[0]
    out = torch.zeros((num_rois, size, size), dtype=torch.float32, device=device)
    if num_rois == 0:
        return out
    if gt_masks is None:
        raise ValueError("mask targets need ground-truth masks: build the dataset with load_masks=True")
    gt_host = matched_idxs.detach().cpu().numpy().astype(np.int64)  # (P,)
    is_bitmap = np.array([isinstance(gt_masks[g], np.ndarray) for g in gt_host], dtype=bool)  # (P,)

    poly_rows = np.flatnonzero(~is_bitmap)
    if poly_rows.size:
        polygons = [gt_masks[g] for g in gt_host[poly_rows]]
        rois_host = rois[torch.from_numpy(poly_rows).to(device)].detach().to("cpu", torch.float64).numpy()
        masks = rasterize_polygons_in_boxes(polygons, rois_host, size)  # (P_poly, size, size) uint8
        out[torch.from_numpy(poly_rows).to(device)] = torch.from_numpy(masks).to(device, torch.float32)

    bitmap_rows = np.flatnonzero(is_bitmap)
    if bitmap_rows.size:
        # Upload only the bitmaps some RoI uses, as uint8: the float crop happens on the device.
        used, which = np.unique(gt_host[bitmap_rows], return_inverse=True)
        bitmaps = _stack_bitmaps([gt_masks[g] for g in used]).to(device)  # (U, H, W) uint8
        rows = torch.from_numpy(bitmap_rows).to(device)
        soft = crop_and_resize_bitmaps(bitmaps, torch.from_numpy(which.reshape(-1)).to(device), rois[rows], size)
        out[rows] = (soft >= 0.5).float()
    return out


def mask_targets(gt_masks_per_image: Sequence[Sequence[list | np.ndarray] | None],
                 matched_idxs_per_image: Sequence[Tensor], rois_per_image: Sequence[Tensor], size: int = 28) -> Tensor:
    """`mask_targets_per_image` over a batch, concatenated in image order.

    Args:
        gt_masks_per_image: N entries, `Targets.masks` of each image.
        matched_idxs_per_image: N tensors (P_i,) int64, matched ground-truth index of each positive RoI.
        rois_per_image: N tensors (P_i, 4) xyxy, the positive RoIs.
        size: output resolution.

    Returns:
        (sum P_i, size, size) float32 of 0s and 1s on the RoIs' device.
    """
    if not (len(gt_masks_per_image) == len(matched_idxs_per_image) == len(rois_per_image)):
        raise ValueError(f"got {len(gt_masks_per_image)} mask lists, {len(matched_idxs_per_image)} index tensors "
                         f"and {len(rois_per_image)} RoI tensors; expected one of each per image")
    if len(rois_per_image) == 0:
        return torch.zeros((0, size, size), dtype=torch.float32)
    return torch.cat([mask_targets_per_image(masks, idxs, rois, size)
                      for masks, idxs, rois in zip(gt_masks_per_image, matched_idxs_per_image, rois_per_image)])


def rasterize_polygons_in_boxes(polygons_per_box: Sequence[Sequence[np.ndarray]], boxes: np.ndarray,
                                size: int) -> np.ndarray:
    """Rasterise each object's polygons inside its box at size x size (Detectron2's polygon mask target).

    The polygons are translated to the box's top-left corner and scaled by size / box side (a side below 0.1
    pixel counts as 0.1), then filled by pycocotools; an object's polygons are merged by union. Polygons with
    fewer than 3 points have no area and are skipped.

    Args:
        polygons_per_box: B entries, each a list of flat [x0, y0, x1, y1, ...] arrays in image pixels.
        boxes: (B, 4) xyxy image pixels.
        size: output resolution.

    Returns:
        (B, size, size) uint8 of 0s and 1s.
    """
    from pycocotools import mask as mask_utils

    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    out = np.zeros((len(boxes), size, size), dtype=np.uint8)
    frame_polygons, owners = [], []
    for b, (polygons, box) in enumerate(zip(polygons_per_box, boxes)):
        origin = box[:2]  # (2,)
        scale = size / np.maximum(box[2:] - box[:2], 0.1)  # (2,) RoI pixels -> mask cells, x and y
        for polygon in polygons:
            if len(polygon) < 6:
                continue
            # flat (2K,) -> (K, 2) points in the RoI frame -> flat (2K,)
            points = (np.asarray(polygon, dtype=np.float64).reshape(-1, 2) - origin) * scale
            frame_polygons.append(points.reshape(-1))
            owners.append(b)
    if not frame_polygons:
        return out
    # One pycocotools call for every polygon: each becomes an RLE on the size x size grid.
    rles = mask_utils.frPyObjects(frame_polygons, size, size)
    filled = mask_utils.decode(rles)  # (size, size, K) uint8, K polygons
    filled = np.moveaxis(filled, 2, 0)  # (size, size, K) -> (K, size, size)
    np.maximum.at(out, np.asarray(owners), filled)  # union of each object's polygons
    return out


@torch.no_grad()
def crop_and_resize_bitmaps(bitmaps: Tensor, bitmap_idxs: Tensor, rois: Tensor, size: int) -> Tensor:
    """Resample bitmaps inside RoIs: `roi_align(aligned=True, sampling_ratio=0)` on one-channel maps.

    Args:
        bitmaps: (U, H, W) any dtype (uint8 0/1 masks in practice).
        bitmap_idxs: (P,) int64 index into `bitmaps` of each RoI.
        rois: (P, 4) xyxy pixels, on `bitmaps.device`.
        size: output resolution.

    Returns:
        (P, size, size) float32 soft values in [0, 1] for 0/1 bitmaps.
    """
    # (P,) + (P, 4) -> (P, 5) RoIAlign rows that name their bitmap as the "image"
    rows = torch.cat([bitmap_idxs.to(device=rois.device, dtype=torch.float32)[:, None], rois.float()], dim=1)
    with torch.autocast(device_type=bitmaps.device.type, enabled=False):
        return roi_align(bitmaps[:, None].float(), rows, size, 1.0, sampling_ratio=0, aligned=True)[:, 0]


def _stack_bitmaps(bitmaps: Sequence[np.ndarray]) -> Tensor:
    """U (H_u, W_u) uint8 arrays -> (U, H, W) uint8, zero-padded bottom/right if sizes differ.

    All bitmaps of an image share its size after the transforms; padding only guards against an RLE whose
    declared size disagrees with its image.
    """
    height = max(b.shape[0] for b in bitmaps)
    width = max(b.shape[1] for b in bitmaps)
    if all(b.shape == (height, width) for b in bitmaps):
        return torch.from_numpy(np.stack(bitmaps).astype(np.uint8, copy=False))
    out = np.zeros((len(bitmaps), height, width), dtype=np.uint8)
    for u, b in enumerate(bitmaps):
        out[u, :b.shape[0], :b.shape[1]] = b
    return torch.from_numpy(out)


# ---------------------------------------------------------------------------------------------------- inference


@torch.no_grad()
def paste_masks(mask_probs: Tensor, boxes: Tensor, image_size: tuple[int, int] | Tensor, threshold: float = 0.5,
                chunk_size: int | None = None, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                mode: Literal["detectron2", "torchvision"] = "detectron2") -> Tensor:
    """Paste per-box mask probabilities into the image and binarise them.

    "detectron2": pixel (x, y) reads the mask at its centre (x + 0.5, y + 0.5) mapped into the box frame, with
    bilinear sampling and zeros outside the mask, exactly like Detectron2's `grid_sample(align_corners=False)`
    paste. "torchvision": torchvision's `paste_masks_in_image` (see the module docstring), for its weights.
    Masks are processed in chunks; each chunk is resampled only over the union of its boxes' footprints
    (every pixel the bilinear sampling can reach), and its float32 scratch stays under `max_chunk_bytes`.

    Args:
        mask_probs: (D, M, M) probabilities of the predicted class (any float dtype; computed in float32).
        boxes: (D, 4) xyxy pixels in the image the masks are pasted into.
        image_size: (height, width) of that image.
        threshold: a pixel is in the mask when its probability is >= threshold; must be in (0, 1].
        chunk_size: masks per chunk. None: 1 on the CPU (each mask touches only its own box, which costs least
            there), otherwise as many as fit `max_chunk_bytes` at full image size.
        max_chunk_bytes: bound on one chunk's float32 scratch memory when `chunk_size` is None.
        mode: "detectron2" or "torchvision".

    Returns:
        (D, H, W) bool on `mask_probs.device`.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if mode not in ("detectron2", "torchvision"):
        raise ValueError(f"mode must be 'detectron2' or 'torchvision', got {mode!r}")
    height, width = int(image_size[0]), int(image_size[1])
    device = mask_probs.device
    num = mask_probs.shape[0]
    out = torch.zeros((num, height, width), dtype=torch.bool, device=device)
    if num == 0 or height == 0 or width == 0:
        return out
    if mask_probs.dim() != 3 or mask_probs.shape[1] != mask_probs.shape[2]:
        raise ValueError(f"mask_probs must be (D, M, M), got {tuple(mask_probs.shape)}")
    if chunk_size is None:
        chunk_size = 1 if device.type == "cpu" else max(1, max_chunk_bytes // (4 * height * width))
    size = mask_probs.shape[-1]
    boxes = boxes.to(device=device, dtype=torch.float32)
    if mode == "torchvision":
        boxes = _torchvision_paste_boxes(boxes, size)  # (D, 4) int64, inclusive pixel ranges
        # (D, 4) first and last-plus-one pixel each mask can write, x0, y0, x1, y1
        footprint = torch.cat([boxes[:, :2], boxes[:, 2:] + 1], dim=1)
    else:
        # Pixels whose centre lies within half a mask cell of the box can read a non-zero value.
        reach = boxes.clone()
        half_w = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) / (2 * size)
        half_h = (boxes[:, 3] - boxes[:, 1]).clamp(min=0) / (2 * size)
        reach[:, 0] -= half_w
        reach[:, 2] += half_w
        reach[:, 1] -= half_h
        reach[:, 3] += half_h
        footprint = torch.cat([(reach[:, :2] - 0.5).floor(), (reach[:, 2:] - 0.5).ceil() + 1], dim=1)
    footprint = footprint.tolist()  # one host synchronisation: slicing needs Python ints
    axis_weights = _paste_axis_weights_torchvision if mode == "torchvision" else _paste_axis_weights
    with torch.autocast(device_type=device.type, enabled=False):
        for start in range(0, num, chunk_size):
            stop = min(start + chunk_size, num)
            part = footprint[start:stop]
            x0 = _clip(int(min(f[0] for f in part)), width)
            x1 = _clip(int(max(f[2] for f in part)), width)
            y0 = _clip(int(min(f[1] for f in part)), height)
            y1 = _clip(int(max(f[3] for f in part)), height)
            if x1 <= x0 or y1 <= y0:
                continue
            chunk_boxes = boxes[start:stop]
            weights_y = axis_weights(chunk_boxes[:, 1], chunk_boxes[:, 3], y0, y1 - y0, size)  # (C, h, M)
            weights_x = axis_weights(chunk_boxes[:, 0], chunk_boxes[:, 2], x0, x1 - x0, size)  # (C, w, M)
            probs = mask_probs[start:stop].float()
            # (C, h, M) @ (C, M, M) @ (C, M, w) -> (C, h, w)
            region = weights_y @ probs @ weights_x.transpose(1, 2)
            out[start:stop, y0:y1, x0:x1] = region >= threshold
    return out


def _clip(value: int, length: int) -> int:
    return min(max(value, 0), length)


def _paste_axis_weights(start: Tensor, end: Tensor, first: int, count: int, size: int) -> Tensor:
    """Bilinear weights of `grid_sample(align_corners=False, padding_mode="zeros")` along one axis.

    Args:
        start, end: (C,) box extent along the axis in pixels.
        first, count: the image pixels to fill, first .. first + count - 1.
        size: mask resolution M.

    Returns:
        (C, count, M) float32: pixel first + t reads sum_m W[c, t, m] * mask[c, ..., m].
    """
    device = start.device
    centres = torch.arange(first, first + count, device=device, dtype=torch.float32) + 0.5  # (count,)
    extent = (end - start).clamp(min=torch.finfo(torch.float32).eps)
    # Same arithmetic as Detectron2 + grid_sample: pixel centre -> [-1, 1] over the box -> mask coordinate.
    grid = (centres[None, :] - start[:, None]) / extent[:, None] * 2 - 1  # (C, count)
    coord = ((grid + 1) * size - 1) / 2
    low = coord.floor()
    frac = coord - low
    cells = torch.arange(size, device=device, dtype=torch.float32)  # (M,)
    # (C, count, 1) against (M,) -> (C, count, M); cells outside 0..M-1 never match, i.e. read zero
    return ((cells == low[..., None]) * (1 - frac)[..., None]
            + (cells == low[..., None] + 1) * frac[..., None])


def _torchvision_paste_boxes(boxes: Tensor, size: int) -> Tensor:
    """(D, 4) float boxes -> the integer boxes torchvision pastes M x M masks into, (D, 4) int64.

    As `expand_masks(padding=1)` + `expand_boxes`: the half sides grow by (M + 2) / M about the centre (in the
    boxes' float32), and the corners are truncated toward zero (`.to(torch.int64)`); the mask then covers pixels
    x0..x1 and y0..y1 inclusive.
    """
    scale = (size + 2) / size
    half = (boxes[:, 2:] - boxes[:, :2]) * 0.5 * scale  # (D, 2) half width, half height
    centre = (boxes[:, 2:] + boxes[:, :2]) * 0.5
    return torch.cat([centre - half, centre + half], dim=1).to(torch.int64)


def _paste_axis_weights_torchvision(start: Tensor, end: Tensor, first: int, count: int, size: int) -> Tensor:
    """Weights of torchvision's paste along one axis: the zero-bordered mask (M + 2 cells) resized bilinearly
    (`interpolate(align_corners=False)`) to end - start + 1 pixels placed at `start`.

    Args:
        start, end: (C,) int64 first and last pixel of each expanded box along the axis.
        first, count: the image pixels to fill, first .. first + count - 1.
        size: mask resolution M.

    Returns:
        (C, count, M) float32: pixel first + t reads sum_m W[c, t, m] * mask[c, ..., m].
    """
    device = start.device
    padded = size + 2
    length = (end - start + 1).clamp(min=1)  # (C,) pixels the resized mask spans
    pixels = torch.arange(first, first + count, device=device)  # (count,)
    inside = (pixels[None, :] >= start[:, None]) & (pixels[None, :] <= end[:, None])  # (C, count)
    column = (pixels[None, :] - start[:, None]).float()  # (C, count) pixel index in the resized mask
    # interpolate's source index: in / out * (dst + 0.5) - 0.5, at least 0, in float32
    ratio = torch.full_like(length, padded, dtype=torch.float32) / length.float()  # (C,)
    source = (ratio[:, None] * (column + 0.5) - 0.5).clamp(min=0)  # (C, count)
    low = source.floor()
    frac = source - low
    high = (low + 1).clamp(max=padded - 1)
    # padded cell i holds mask cell i - 1 (cells 0 and M + 1 are the zero border and match nothing)
    cells = torch.arange(1, size + 1, device=device, dtype=torch.float32)  # (M,)
    # (C, count, 1) against (M,) -> (C, count, M)
    weights = ((cells == low[..., None]) * (1 - frac)[..., None]
               + (cells == high[..., None]) * frac[..., None])
    return weights * inside[..., None]


def masks_to_rle(masks: Tensor) -> list[dict]:
    """Encode binary masks as COCO RLE, for `segm` results.

    Args:
        masks: (D, H, W) bool (or 0/1 integer) tensor, any device.

    Returns:
        D dicts {"size": [H, W], "counts": str}.
    """
    from pycocotools import mask as mask_utils

    if masks.shape[0] == 0:
        return []
    # (D, H, W) -> C-contiguous (D, W, H) -> its transpose: a Fortran-ordered (H, W, D) view, no second copy
    columns = masks.detach().to("cpu", torch.uint8).transpose(1, 2).contiguous().numpy()
    rles = mask_utils.encode(columns.T)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles
