import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from pycocotools import mask as mask_utils

from detkit.config import InputConfig, TransformConfig
from detkit.data.transforms import Sample, TransformPipeline, boxes_to_original, crop, hflip, normalize, resize, \
    resize_crop


def _sample(w=120, h=80):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    boxes = np.array([[10, 20, 50, 60], [70, 5, 118, 30]], np.float32)
    poly = [np.array([10, 20, 50, 20, 50, 60, 10, 60], np.float32)]
    bitmap = np.zeros((h, w), np.uint8)
    bitmap[5:30, 70:118] = 1
    return Sample(image=img, boxes=boxes, labels=np.array([0, 3]), ignore_boxes=np.array([[0, 0, 5, 5]], np.float32),
                  masks=[poly, bitmap])


def _raster(sample):
    h, w = sample.size
    out = []
    for m in sample.masks:
        if isinstance(m, np.ndarray):
            out.append(m)
        else:
            out.append(mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([p.tolist() for p in m], h, w))))
    return out


def test_flip_twice_is_identity():
    s = _sample()
    t = hflip(hflip(s))
    np.testing.assert_allclose(t.boxes, s.boxes)
    np.testing.assert_allclose(t.ignore_boxes, s.ignore_boxes)
    assert np.array_equal(np.asarray(t.image), np.asarray(s.image))
    np.testing.assert_allclose(t.masks[0][0], s.masks[0][0])
    assert np.array_equal(t.masks[1], s.masks[1])
    assert t.affine == (1.0, 0.0, 1.0, 0.0)


def test_flip_moves_boxes_pixels_and_masks_together():
    s = hflip(_sample())
    np.testing.assert_allclose(s.boxes[0], [70, 20, 110, 60])
    for box, mask in zip(s.boxes, _raster(s)):
        ys, xs = np.nonzero(mask)
        np.testing.assert_allclose([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], box, atol=1)


def test_resize_then_map_back():
    s = _sample()
    t = resize(s, 300, 200)
    np.testing.assert_allclose(t.boxes[0], [25, 50, 125, 150])
    np.testing.assert_allclose(boxes_to_original(t.boxes, t.affine), s.boxes, atol=1e-4)
    np.testing.assert_allclose(t.masks[0][0][:2], [25, 50])
    assert t.masks[1].shape == (200, 300)


def test_crop_clips_drops_and_keeps_masks_aligned():
    s = crop(_sample(), 30, 0, 60, 80)
    # box 0 clipped to [30, 50) -> [0, 20); box 1 [70, 118) -> [40, 60)
    np.testing.assert_allclose(s.boxes, [[0, 20, 20, 60], [40, 5, 60, 30]])
    assert len(s.masks) == 2 and s.masks[1].shape == (80, 60)
    assert len(s.ignore_boxes) == 0  # the crowd box lies left of the window
    s2 = crop(_sample(), 60, 0, 60, 80)  # box 0 falls outside: label and mask go with it
    assert s2.labels.tolist() == [3] and len(s2.masks) == 1


@pytest.mark.parametrize("new_size, window", [((240, 160), (30, 20, 100, 90)), ((200, 150), (0, 0, 64, 64)),
                                               ((90, 60), (10, 5, 70, 50))])
def test_resize_crop_equals_resize_then_crop(new_size, window):
    rng = np.random.default_rng(1)
    smooth = Image.fromarray(rng.integers(0, 255, (8, 12, 3), dtype=np.uint8)).resize((120, 80), Image.BICUBIC)
    s = Sample(image=smooth, boxes=_sample().boxes, labels=_sample().labels, ignore_boxes=_sample().ignore_boxes,
               masks=_sample().masks)
    fast = resize_crop(s, *new_size, *window)
    slow = crop(resize(s, *new_size), *window)
    assert fast.size == slow.size == (window[3], window[2])
    np.testing.assert_array_equal(fast.boxes, slow.boxes)
    np.testing.assert_array_equal(fast.labels, slow.labels)
    np.testing.assert_array_equal(fast.ignore_boxes, slow.ignore_boxes)
    assert fast.affine == slow.affine
    for a, b in zip(fast.masks, slow.masks):
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_array_equal(np.concatenate(a), np.concatenate(b))
    diff = np.abs(np.asarray(fast.image, np.int16) - np.asarray(slow.image, np.int16))
    assert diff.max() <= 2  # the same resampling; only 8-bit rounding differs


@pytest.mark.parametrize("seed", range(5))
def test_scale_jitter_pipeline_round_trip(seed):
    cfg = TransformConfig(mode="scale_jitter", output_size=64, scale_range=(0.5, 2.0), flip_prob=0.5)
    pipe = TransformPipeline(cfg, train=True)
    s = pipe(_sample(), np.random.default_rng(seed))
    h, w = s.size
    assert h <= 64 and w <= 64
    assert ((s.boxes[:, 2:] <= [w, h]) & (s.boxes[:, :2] >= 0)).all()
    # Mapped back, each kept box is exactly its original box clipped to the crop window.
    window = boxes_to_original(np.array([[0, 0, w, h]], np.float32), s.affine)[0]
    orig = _sample()
    expected = np.concatenate([np.maximum(orig.boxes[:, :2], window[:2]), np.minimum(orig.boxes[:, 2:], window[2:])], 1)
    rows = [orig.labels.tolist().index(label) for label in s.labels]
    np.testing.assert_allclose(boxes_to_original(s.boxes, s.affine), expected[rows], atol=1e-3)


def test_resize_short_with_max_size_and_test_mode():
    cfg = TransformConfig(mode="resize_short", short_sizes=(40,), max_size=50)
    s = TransformPipeline(cfg, train=False)(_sample(120, 80))
    assert s.size == (33, 50)  # the long side is capped at 50
    cfg = TransformConfig(mode="scale_jitter", output_size=64, scale_range=(0.5, 2.0))
    s = TransformPipeline(cfg, train=False)(_sample(120, 80))
    assert s.size == (43, 64)  # eval: long side = output size


@pytest.mark.parametrize("normalization", ["imagenet", "caffe"])
def test_normalize_both_conventions_and_zero_padding(normalization):
    cfg = InputConfig(normalization=normalization)
    images = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    images[0, :, :2, :3] = torch.tensor([200, 100, 50], dtype=torch.uint8).view(3, 1, 1)
    out = normalize(images, torch.tensor([[2, 3]]), cfg)
    if normalization == "imagenet":
        expected = (torch.tensor([200, 100, 50.0]) - torch.tensor(cfg.pixel_mean)) / torch.tensor(cfg.pixel_std)
    else:  # BGR order, 0-255, minus pixel means
        expected = torch.tensor([50, 100, 200.0]) - torch.tensor(cfg.pixel_mean)
    torch.testing.assert_close(out[0, :, 0, 0], expected)
    assert (out[0, :, 2:, :] == 0).all() and (out[0, :, :, 3:] == 0).all()


@settings(max_examples=40, deadline=None)
@given(boxes=st.lists(st.tuples(*[st.floats(0, 1, allow_nan=False)] * 4), min_size=0, max_size=6),
       new_w=st.integers(8, 300), new_h=st.integers(8, 300), flip=st.booleans())
def test_any_resize_and_flip_maps_back_exactly(boxes, new_w, new_h, flip):
    w, h = 120, 80
    arr = np.array([[min(a, c) * w, min(b, d) * h, max(a, c) * w, max(b, d) * h] for a, b, c, d in boxes],
                   np.float32).reshape(-1, 4)
    s = Sample(image=Image.new("RGB", (w, h)), boxes=arr, labels=np.arange(len(arr)),
               ignore_boxes=np.zeros((0, 4), np.float32))
    t = resize(hflip(s) if flip else s, new_w, new_h)
    assert ((t.boxes[:, 2:] <= [new_w + 1e-3, new_h + 1e-3]).all() and (t.boxes[:, :2] >= -1e-3).all())
    np.testing.assert_allclose(boxes_to_original(t.boxes, t.affine), arr, atol=1e-3)
