"""Mask targets, pasting and RLE: hand-made cases, slow references, chunking and empty inputs."""
from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from reference_ops import slow_roi_align

from detkit.modeling.mask_ops import (crop_and_resize_bitmaps, mask_targets, mask_targets_per_image,
                                      masks_to_rle, paste_masks, rasterize_polygons_in_boxes)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def _square(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([x0, y0, x1, y0, x1, y1, x0, y1], dtype=np.float32)


def _star(cx: float, cy: float, r_out: float, r_in: float, points: int = 7) -> np.ndarray:
    angles = np.arange(2 * points) * math.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, r_out, r_in)
    return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1).reshape(-1).astype(np.float32)


def _full_size(polygons: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """(H, W) uint8: the polygons rasterised over the whole image by pycocotools."""
    rle = mask_utils.merge(mask_utils.frPyObjects([p.astype(np.float64) for p in polygons], height, width))
    return mask_utils.decode(rle)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _reference_crop(full: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """Slow: each output cell reads the full-size mask at the pixel under its centre."""
    x0, y0, x1, y1 = box
    out = np.zeros((size, size), dtype=np.uint8)
    for i in range(size):
        for j in range(size):
            x = int(math.floor(x0 + (j + 0.5) * (x1 - x0) / size))
            y = int(math.floor(y0 + (i + 0.5) * (y1 - y0) / size))
            if 0 <= y < full.shape[0] and 0 <= x < full.shape[1]:
                out[i, j] = full[y, x]
    return out


# ------------------------------------------------------------------------------------------------- mask targets


def test_square_polygon_and_bitmap_hand_made():
    # GT square covering pixels 8..23; RoI (0, 0, 32, 32) at 28x28: cell j covers [j * 8/7, (j + 1) * 8/7)
    # pixels, so the square occupies cells 7..20 in both axes.
    expected = torch.zeros(28, 28)
    expected[7:21, 7:21] = 1
    polygon = [_square(8, 8, 24, 24)]
    bitmap = np.zeros((40, 40), dtype=np.uint8)
    bitmap[8:24, 8:24] = 1
    rois = torch.tensor([[0.0, 0.0, 32.0, 32.0], [8.0, 8.0, 24.0, 24.0]])
    for gt in (polygon, bitmap):
        targets = mask_targets_per_image([gt], torch.zeros(2, dtype=torch.int64), rois)
        assert targets.shape == (2, 28, 28) and targets.dtype == torch.float32
        assert torch.equal(targets[0], expected)
        assert torch.equal(targets[1], torch.ones(28, 28))  # RoI equal to the square: all foreground


def test_polygon_targets_match_full_size_rasterisation():
    rng = np.random.default_rng(0)
    height, width = 120, 160
    objects = [[_star(50, 60, 40, 18)], [_square(90, 10, 150, 50), _star(120, 80, 25, 10, 5)]]
    fulls = [_full_size(polys, height, width) for polys in objects]
    matched, rois = [], []
    for _ in range(12):
        g = int(rng.integers(2))
        ys, xs = np.nonzero(fulls[g])
        box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)
        box += rng.uniform(-6, 6, 4)  # proposals jitter around the object
        matched.append(g)
        rois.append(box)
    rois_t = torch.tensor(np.array(rois), dtype=torch.float32)
    targets = mask_targets_per_image(objects, torch.tensor(matched), rois_t).numpy()
    for target, g, box in zip(targets, matched, rois_t.numpy()):
        assert _iou(target, _reference_crop(fulls[g], box, 28)) > 0.9


def test_bitmap_crop_matches_literal_roi_align():
    rng = np.random.default_rng(1)
    bitmaps = (rng.random((2, 17, 23)) > 0.5).astype(np.uint8)
    boxes = np.array([[2.0, 3.0, 15.0, 12.0],  # inside
                      [-4.5, -3.2, 9.7, 30.0],  # off the top-left and the bottom
                      [14.3, 6.1, 26.0, 16.9],  # past the right edge
                      [20.0, 5.0, 20.0, 9.0],  # zero width: no samples, all zero
                      [3.3, 1.7, 40.0, 25.0]])  # several samples per bin
    which = np.array([0, 1, 0, 1, 1])
    soft = crop_and_resize_bitmaps(torch.from_numpy(bitmaps), torch.from_numpy(which),
                                   torch.tensor(boxes, dtype=torch.float32), 7)
    for got, b, box in zip(soft.numpy(), which, boxes):
        # the slow reference of roi_align(aligned=True, sampling_ratio=0) on that one bitmap
        reference = slow_roi_align(torch.from_numpy(bitmaps[b].astype(np.float64))[None, None],
                                   torch.tensor([[0.0, *box]]), (7, 7), 1.0, 0, True)[0, 0]
        np.testing.assert_allclose(got, reference.numpy(), atol=1e-5)


def test_bitmap_crop_chunked_equals_unchunked(monkeypatch):
    rng = np.random.default_rng(2)
    bitmaps = torch.from_numpy((rng.random((3, 60, 80)) > 0.5).astype(np.uint8))
    xy = rng.uniform(0, 60, (20, 2))
    rois = torch.tensor(np.concatenate([xy, xy + rng.uniform(2, 50, (20, 2))], 1), dtype=torch.float32)
    which = torch.from_numpy(rng.integers(0, 3, 20))
    whole = crop_and_resize_bitmaps(bitmaps, which, rois, 28)
    # the crop is RoIAlign's: a budget below one RoI makes it process the RoIs one chunk at a time
    monkeypatch.setattr(importlib.import_module("detkit.ops.roi_align"), "CHUNK_BUDGET", 1)
    one_by_one = crop_and_resize_bitmaps(bitmaps, which, rois, 28)
    torch.testing.assert_close(whole, one_by_one, atol=1e-6, rtol=0)


def test_bitmap_and_polygon_inputs_agree():
    height, width = 100, 140
    polygons = [_star(70, 50, 45, 20)]
    bitmap = _full_size(polygons, height, width)
    rois = torch.tensor([[20.0, 0.0, 120.0, 100.0], [30.5, 10.2, 90.1, 70.9], [60.0, 40.0, 118.0, 98.0]])
    idxs = torch.zeros(3, dtype=torch.int64)
    from_polygons = mask_targets_per_image([polygons], idxs, rois)
    from_bitmap = mask_targets_per_image([bitmap], idxs, rois)
    for a, b in zip(from_polygons.numpy(), from_bitmap.numpy()):
        assert _iou(a, b) > 0.9
        assert (a != b).mean() < 0.05


def test_mixed_masks_batch_and_empty_inputs():
    bitmap = np.zeros((50, 60), dtype=np.uint8)
    bitmap[10:30, 20:50] = 1
    image_a = [[_square(5, 5, 25, 35)], bitmap]
    image_b = [[_square(0, 0, 10, 10), np.zeros(4, np.float32)]]  # a 2-point polygon has no area: skipped
    rois_a = torch.tensor([[20.0, 10.0, 50.0, 30.0], [5.0, 5.0, 25.0, 35.0], [0.0, 0.0, 60.0, 50.0]])
    idxs_a = torch.tensor([1, 0, 1])
    rois_b = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    batch = mask_targets([image_a, image_b, None], [idxs_a, torch.tensor([0]), torch.zeros(0, dtype=torch.int64)],
                         [rois_a, rois_b, torch.zeros(0, 4)], size=14)
    assert batch.shape == (4, 14, 14)
    one_by_one = torch.cat([mask_targets_per_image(image_a, idxs_a, rois_a, 14),
                            mask_targets_per_image(image_b, torch.tensor([0]), rois_b, 14)])
    assert torch.equal(batch, one_by_one)
    assert torch.equal(batch[0], torch.ones(14, 14)) and torch.equal(batch[1], torch.ones(14, 14))
    assert torch.equal(batch[3], torch.ones(14, 14))
    # rows 10..29 of 50 -> cells 3..7 (bin centres at 3.57 (i + 0.5) - 0.5); columns 20..49 of 60 -> cells 5..11
    assert torch.equal(batch[2].nonzero()[[0, -1]], torch.tensor([[3, 5], [7, 11]]))
    assert batch[2].sum() == 5 * 7

    assert mask_targets_per_image(None, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4)).shape == (0, 28, 28)
    assert mask_targets([], [], []).shape == (0, 28, 28)
    assert rasterize_polygons_in_boxes([[]], np.array([[0, 0, 4, 4]]), 5).sum() == 0
    with pytest.raises(ValueError):
        mask_targets_per_image(None, torch.zeros(1, dtype=torch.int64), torch.zeros(1, 4))


# ------------------------------------------------------------------------------------------------- paste


def _reference_paste(mask_probs: torch.Tensor, boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Detectron2's whole-image paste: pixel centres mapped into each box, grid_sample(align_corners=False)."""
    x0, y0, x1, y1 = boxes[:, 0:1], boxes[:, 1:2], boxes[:, 2:3], boxes[:, 3:4]  # (D, 1)
    img_y = (torch.arange(height, dtype=torch.float32) + 0.5 - y0) / (y1 - y0) * 2 - 1  # (D, H)
    img_x = (torch.arange(width, dtype=torch.float32) + 0.5 - x0) / (x1 - x0) * 2 - 1  # (D, W)
    grid = torch.stack([img_x[:, None, :].expand(-1, height, -1), img_y[:, :, None].expand(-1, -1, width)], 3)
    return F.grid_sample(mask_probs[:, None], grid, align_corners=False)[:, 0]  # (D, H, W)


def test_paste_all_ones_fills_exactly_the_box_pixels():
    boxes = torch.tensor([[10.0, 20.0, 50.0, 60.0],  # pixel centres inside: x 10..49, y 20..59
                          [10.3, 20.7, 49.4, 59.5],  # x: centres 10.5..48.5 -> 10..48; y: 21..58, 59.5 on the edge
                          [-5.0, 90.0, 12.0, 130.0]])  # clipped by the image: x 0..11, y 90..99
    pasted = paste_masks(torch.ones(3, 28, 28), boxes, (100, 80))
    assert pasted.shape == (3, 100, 80) and pasted.dtype == torch.bool
    expected = torch.zeros(3, 100, 80, dtype=torch.bool)
    expected[0, 20:60, 10:50] = True
    expected[1, 21:60, 10:49] = True  # row 59: centre 59.5 on the box edge reads 0.5 x the column's value,
    expected[1, 59, 10] = False  # and column 10 (centre 0.2 px inside) reads 1 - 0.357: 0.5 * 0.643 < 0.5
    expected[2, 90:100, 0:12] = True
    assert torch.equal(pasted, expected)


def test_paste_matches_grid_sample_reference():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(6, 28, 28, generator=g)
    xy = torch.rand(6, 2, generator=g) * 70 - 10
    boxes = torch.cat([xy, xy + torch.rand(6, 2, generator=g) * 60 + 0.5], 1)
    reference = _reference_paste(probs, boxes, 64, 90)
    pasted = paste_masks(probs, boxes, (64, 90), threshold=0.4)
    decided = (reference - 0.4).abs() > 1e-5  # pixels not on the threshold within rounding
    assert torch.equal(pasted[decided], (reference >= 0.4)[decided])
    assert decided.float().mean() > 0.99


def _random_masks_and_boxes(n: int, seed: int, corner_range: float, max_side: float):
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(n, 28, 28, generator=g)
    xy = torch.rand(n, 2, generator=g) * corner_range
    return probs, torch.cat([xy, xy + torch.rand(n, 2, generator=g) * max_side + 1], 1)


def test_paste_chunked_equals_unchunked_and_empty():
    probs, boxes = _random_masks_and_boxes(9, 1, 100, 80)
    one = paste_masks(probs, boxes, (120, 150), chunk_size=1)
    for chunk_size in (2, 4, 9, None):
        assert torch.equal(paste_masks(probs, boxes, (120, 150), chunk_size=chunk_size), one)
    assert torch.equal(paste_masks(probs.half(), boxes, (120, 150)), paste_masks(probs.half().float(), boxes,
                                                                                 (120, 150)))
    empty = paste_masks(torch.zeros(0, 28, 28), torch.zeros(0, 4), (120, 150))
    assert empty.shape == (0, 120, 150) and empty.dtype == torch.bool
    assert not paste_masks(torch.ones(1, 28, 28), torch.tensor([[200.0, 200.0, 300.0, 300.0]]), (120, 150)).any()
    with pytest.raises(ValueError):
        paste_masks(probs, boxes, (120, 150), threshold=0.0)


def test_masks_to_rle_round_trips():
    g = torch.Generator().manual_seed(2)
    masks = torch.rand(4, 37, 53, generator=g) > 0.6
    rles = masks_to_rle(masks)
    assert len(rles) == 4 and all(isinstance(r["counts"], str) for r in rles)
    assert all(list(r["size"]) == [37, 53] for r in rles)
    decoded = mask_utils.decode([{"size": r["size"], "counts": r["counts"].encode()} for r in rles])  # (H, W, D)
    assert np.array_equal(decoded.transpose(2, 0, 1), masks.numpy().astype(np.uint8))
    assert masks_to_rle(torch.zeros(0, 37, 53, dtype=torch.bool)) == []


@cuda
def test_cpu_equals_cuda():
    probs, boxes = _random_masks_and_boxes(20, 3, 300, 200)
    on_cpu = paste_masks(probs, boxes, (400, 600), threshold=0.3)
    on_gpu = paste_masks(probs.cuda(), boxes.cuda(), (400, 600), threshold=0.3)
    assert (on_gpu.cpu() != on_cpu).float().mean() < 1e-5

    bitmap = _full_size([_star(70, 50, 45, 20)], 100, 140)
    rois = torch.tensor([[20.0, 0.0, 120.0, 100.0], [30.5, 10.2, 90.1, 70.9]])
    idxs = torch.zeros(2, dtype=torch.int64)
    polygon_case = [[_star(70, 50, 45, 20)]]
    for gt in ([bitmap], polygon_case):
        cpu_targets = mask_targets_per_image(gt, idxs, rois)
        gpu_targets = mask_targets_per_image(gt, idxs.cuda(), rois.cuda())
        assert gpu_targets.device.type == "cuda"
        assert (gpu_targets.cpu() != cpu_targets).float().mean() < 1e-3


def _torchvision_reference_paste(mask_probs: torch.Tensor, boxes: torch.Tensor, height: int,
                                 width: int) -> torch.Tensor:
    """torchvision's paste_masks_in_image written out mask by mask (slow, obvious): a one-cell zero border, the box
    grown by (M + 2) / M and truncated to int64, the padded mask resized with F.interpolate onto the box's
    x1 - x0 + 1 by y1 - y0 + 1 pixels and copied into the image where it overlaps. Returns (D, H, W) soft."""
    size = mask_probs.shape[-1]
    padded = F.pad(mask_probs, (1, 1, 1, 1))  # (D, M + 2, M + 2)
    scale = (size + 2) / size
    half_w, half_h = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale, (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    centre_x, centre_y = (boxes[:, 2] + boxes[:, 0]) * 0.5, (boxes[:, 3] + boxes[:, 1]) * 0.5
    grown = torch.stack([centre_x - half_w, centre_y - half_h, centre_x + half_w, centre_y + half_h], 1).long()
    out = torch.zeros(len(boxes), height, width)
    for d, (x0, y0, x1, y1) in enumerate(grown.tolist()):
        resized = F.interpolate(padded[d][None, None], size=(max(y1 - y0 + 1, 1), max(x1 - x0 + 1, 1)),
                                mode="bilinear", align_corners=False)[0, 0]
        cx0, cx1, cy0, cy1 = max(x0, 0), min(x1 + 1, width), max(y0, 0), min(y1 + 1, height)
        if cx1 > cx0 and cy1 > cy0:
            out[d, cy0:cy1, cx0:cx1] = resized[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
    return out


def test_torchvision_paste_all_ones_hand_computed():
    # box 10..50 x 20..60: grown by 30/28 about its centre -> x 8.57..51.43, y 18.57..61.43 -> ints 8..51, 18..61;
    # 44 pixels resample the 30 padded cells at 30/44 * (j + 0.5) - 0.5, which is in [0.5, 28.5] (value >= 0.5)
    # for j = 1..42: columns 9..50 and rows 19..60, one pixel more on each side than the detectron2 paste. The edge
    # pixels j = 1 and 42 read 0.5227 (src 0.523 and 28.477), so the four corners read 0.5227^2 < 0.5
    pasted = paste_masks(torch.ones(1, 28, 28), torch.tensor([[10.0, 20.0, 50.0, 60.0]]), (100, 80),
                         mode="torchvision")
    expected = torch.zeros(1, 100, 80, dtype=torch.bool)
    expected[0, 19:61, 9:51] = True
    expected[0, [19, 19, 60, 60], [9, 50, 9, 50]] = False
    assert torch.equal(pasted, expected)
    with pytest.raises(ValueError, match="mode"):
        paste_masks(torch.ones(1, 28, 28), torch.tensor([[10.0, 20.0, 50.0, 60.0]]), (100, 80), mode="mmdet")


def test_torchvision_paste_matches_interpolate_reference():
    g = torch.Generator().manual_seed(4)
    probs = torch.rand(12, 28, 28, generator=g)
    xy = torch.rand(12, 2, generator=g) * 90 - 15  # some boxes leave the image on the left, top, right, bottom
    sides = torch.cat([torch.rand(6, 2, generator=g) * 20 + 0.3, torch.rand(6, 2, generator=g) * 70 + 25])
    boxes = torch.cat([xy, xy + sides], 1)  # small boxes shrink the 30 padded cells, large ones stretch them
    reference = _torchvision_reference_paste(probs, boxes, 64, 90)
    for chunk_size in (1, 5, None):
        pasted = paste_masks(probs, boxes, (64, 90), threshold=0.4, chunk_size=chunk_size, mode="torchvision")
        decided = (reference - 0.4).abs() > 1e-5  # pixels not on the threshold within rounding
        assert torch.equal(pasted[decided], (reference >= 0.4)[decided])
        assert decided.float().mean() > 0.99
    assert pasted.any() and not paste_masks(torch.ones(1, 28, 28), torch.tensor([[200.0, 200.0, 300.0, 300.0]]),
                                            (64, 90), mode="torchvision").any()
