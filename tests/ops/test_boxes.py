import math

import pytest
import torch

from detkit.ops import BoxCoder, box_area, box_ioa, box_iou, clip_boxes, cxcywh_to_xyxy, xywh_to_xyxy, \
    xyxy_to_cxcywh, xyxy_to_xywh


def _random_boxes(n, seed=0, size=100.0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * size / 2 + 1
    return torch.cat([xy, xy + wh], 1)


def _slow_iou(a, b):
    out = torch.zeros(len(a), len(b), dtype=torch.float64)
    for i, p in enumerate(a.tolist()):
        for j, q in enumerate(b.tolist()):
            iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
            ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
            inter = iw * ih
            union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
            out[i, j] = inter / union if union > 0 else 0.0
    return out


def test_iou_hand_computed():
    a = torch.tensor([[0.0, 0, 10, 10]])
    b = torch.tensor([[5.0, 5, 15, 15], [0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 5, 10]])
    torch.testing.assert_close(box_iou(a, b), torch.tensor([[25 / 175, 1.0, 0.0, 0.5]]))
    torch.testing.assert_close(box_ioa(b, a), torch.tensor([[0.25], [1.0], [0.0], [1.0]]))


def test_iou_matches_slow_reference():
    a, b = _random_boxes(30, 1), _random_boxes(20, 2)
    torch.testing.assert_close(box_iou(a, b).double(), _slow_iou(a, b), atol=1e-6, rtol=1e-5)


def test_iou_and_ioa_batched_over_images():
    a = torch.stack([_random_boxes(7, 3), _random_boxes(7, 4)])  # (2, 7, 4)
    b = torch.stack([_random_boxes(5, 5), _random_boxes(5, 6)])  # (2, 5, 4)
    iou, ioa = box_iou(a, b), box_ioa(a, b)
    assert iou.shape == ioa.shape == (2, 7, 5)
    for i in range(2):
        torch.testing.assert_close(iou[i], box_iou(a[i], b[i]))
        torch.testing.assert_close(ioa[i], box_ioa(a[i], b[i]))
    torch.testing.assert_close(box_area(a), torch.stack([box_area(a[0]), box_area(a[1])]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_iou_in_half_precision_is_computed_in_float32(dtype):
    a = torch.tensor([[0.0, 0, 900, 900]], dtype=dtype)  # area overflows float16
    b = torch.tensor([[0.0, 0, 900, 450]], dtype=dtype)
    iou = box_iou(a, b)
    assert iou.dtype == torch.float32
    torch.testing.assert_close(iou, torch.tensor([[0.5]]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert box_iou(a.float(), b.float()).dtype == torch.float32


def test_empty_and_degenerate():
    empty = torch.zeros(0, 4)
    assert box_iou(empty, _random_boxes(3)).shape == (0, 3)
    assert box_iou(_random_boxes(3), empty).shape == (3, 0)
    assert box_area(empty).shape == (0,)
    point = torch.tensor([[5.0, 5, 5, 5]])
    assert box_iou(point, point).item() == 0.0  # no NaN for an empty union


def test_iou_gradcheck():
    a = _random_boxes(4, 3).double().requires_grad_()
    b = _random_boxes(5, 4).double().requires_grad_()
    assert torch.autograd.gradcheck(box_iou, (a, b))


def test_conversions_round_trip_and_clip():
    boxes = _random_boxes(10)
    torch.testing.assert_close(xywh_to_xyxy(xyxy_to_xywh(boxes)), boxes)
    torch.testing.assert_close(cxcywh_to_xyxy(xyxy_to_cxcywh(boxes)), boxes)
    clipped = clip_boxes(torch.tensor([[-5.0, -1, 50, 300]]), (100, 40))
    assert clipped.tolist() == [[0.0, 0.0, 40.0, 100.0]]


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_box_coder_round_trip(weights):
    coder = BoxCoder(weights)
    anchors, gt = _random_boxes(50, 5), _random_boxes(50, 6)
    deltas = coder.encode(anchors, gt)
    torch.testing.assert_close(coder.decode(deltas, anchors), gt, atol=1e-3, rtol=1e-4)
    # hand-computed: a box twice the anchor's size, shifted by half an anchor width
    d = BoxCoder().encode(torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([[0.0, -5, 20, 15]]))
    torch.testing.assert_close(d, torch.tensor([[0.5, 0.0, math.log(2), math.log(2)]]))


def test_box_coder_clamp_class_specific_and_half_inputs():
    coder = BoxCoder()
    anchors = torch.tensor([[0.0, 0, 10, 10]])
    huge = coder.decode(torch.tensor([[0.0, 0, 100, 100]]), anchors)
    assert torch.isfinite(huge).all()
    assert huge[0, 2] - huge[0, 0] == pytest.approx(10 * 1000 / 16, rel=1e-4)
    two_classes = coder.decode(torch.zeros(1, 8, dtype=torch.float16), anchors.half())
    assert two_classes.dtype == torch.float32 and two_classes.shape == (1, 8)
    torch.testing.assert_close(two_classes, anchors.repeat(1, 2))
    assert coder.decode(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0, 4)
