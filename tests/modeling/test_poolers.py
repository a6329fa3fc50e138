import pytest
import torch

from detkit.modeling.poolers import MultiScaleRoIPooler, assign_levels, boxes_to_rois
from detkit.ops.roi_align import roi_align

SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)


def _square(side, x=10.0, y=20.0):
    return [x, y, x + side, y + side]


def test_assign_levels_hand_made_boxes():
    boxes = torch.tensor([_square(224), _square(112), _square(448), _square(56), [0, 0, 112, 448],
                          _square(223.9), _square(2), _square(5000), [5, 5, 5, 300], [50, 50, 10, 10]])
    expected = [4, 3, 5, 2, 4, 3, 2, 5, 2, 2]  # ... 223.9 just misses P4; empty and inverted boxes go to min
    assert assign_levels(boxes, 2, 5).tolist() == expected
    assert assign_levels(boxes, 2, 5).dtype == torch.int64
    assert assign_levels(boxes.half(), 2, 5).tolist() == expected
    # the mmdetection form: finest scale 56 at level 0 of (0..3), i.e. the same rule shifted by 2
    assert (assign_levels(boxes, 0, 3, canonical_size=56, canonical_level=0) + 2).tolist() == expected
    assert assign_levels(torch.zeros(0, 4), 2, 5).shape == (0,)


def test_boxes_to_rois():
    rois = boxes_to_rois([torch.tensor([[1.0, 2, 3, 4]]), torch.zeros(0, 4), torch.tensor([[5.0, 6, 7, 8]] * 2)])
    assert rois.tolist() == [[0, 1, 2, 3, 4], [2, 5, 6, 7, 8], [2, 5, 6, 7, 8]]
    assert boxes_to_rois([torch.zeros(0, 4)]).shape == (0, 5)


def _pyramid(num_images=2, channels=3, height=256, width=320, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(num_images, channels, int(height * s), int(width * s), generator=g,
                        requires_grad=requires_grad) for s in SCALES]


def _boxes(n, seed, height=256, width=320):
    g = torch.Generator().manual_seed(seed)
    size = 2 ** (torch.rand(n, 1, generator=g) * 6 + 3.5)  # sqrt(area) 11 .. 724 px: every level and beyond
    aspect = 2 ** (torch.rand(n, 1, generator=g) - 0.5)
    sides = torch.cat([size * aspect, size / aspect], 1)
    corner = torch.rand(n, 2, generator=g) * torch.tensor([width, height]) - sides / 4
    return torch.cat([corner, corner + sides], 1)


@pytest.mark.parametrize("sampling_ratio,aligned", [(0, True), (2, False)])
def test_rows_equal_roi_align_on_the_assigned_level(sampling_ratio, aligned):
    features = _pyramid()
    boxes = [_boxes(30, seed=1), _boxes(25, seed=2)]
    pooler = MultiScaleRoIPooler(7, SCALES, sampling_ratio=sampling_ratio, aligned=aligned)
    out = pooler(features, boxes)
    assert out.shape == (55, 3, 7, 7)
    rois = boxes_to_rois(boxes)
    levels = assign_levels(rois[:, 1:], 2, 5)
    assert set(levels.tolist()) == {2, 3, 4, 5}
    expected = torch.cat([roi_align(features[lv - 2], roi[None], 7, SCALES[lv - 2], sampling_ratio, aligned)
                          for roi, lv in zip(rois, levels.tolist())])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_gradients_reach_only_the_levels_used():
    features = _pyramid(requires_grad=True)
    small = torch.tensor([[10.0, 10, 40, 50], [100, 100, 120, 110]])  # both on P2
    out = MultiScaleRoIPooler((7, 5), SCALES)(features, [small, torch.zeros(0, 4)])
    assert out.shape == (2, 3, 7, 5)
    out.sum().backward()
    assert features[0].grad.abs().sum() > 0
    assert all(f.grad is not None and f.grad.abs().sum() == 0 for f in features[1:])


def test_a_nan_box_goes_to_the_first_level_and_pools_without_error():
    boxes = torch.tensor([[float("nan"), 10, 40, 50], [0.0, 0, 500, 500], [10, 10, 40, 50]])
    assert assign_levels(boxes, 2, 5).tolist() == [2, 5, 2]
    for sampling_ratio, aligned in ((0, True), (2, False)):
        out = MultiScaleRoIPooler(7, SCALES, sampling_ratio=sampling_ratio, aligned=aligned)(
            _pyramid(), [boxes, torch.zeros(0, 4)])
        assert out.shape == (3, 3, 7, 7) and torch.isfinite(out).all()
        assert (out[0] == 0).all() and out[1:].abs().sum() > 0  # the NaN box pools to 0, the others as usual


def test_no_boxes_at_all():
    features = _pyramid(requires_grad=True)
    out = MultiScaleRoIPooler(7, SCALES)(features, [torch.zeros(0, 4), torch.zeros(0, 4)])
    assert out.shape == (0, 3, 7, 7)
    out.sum().backward()
    assert all(f.grad is not None and f.grad.abs().sum() == 0 for f in features)


def test_single_level_uses_no_assignment():
    features = _pyramid()[2:3]  # stride 16 only: every box, large or small, is pooled from it
    boxes = [_boxes(10, seed=3), _boxes(4, seed=4)]
    out = MultiScaleRoIPooler(14, SCALES[2:3], sampling_ratio=0)(features, boxes)
    torch.testing.assert_close(out, roi_align(features[0], boxes_to_rois(boxes), 14, 1 / 16, 0))


def test_half_precision_features():
    features = [f.bfloat16() for f in _pyramid()]
    boxes = [_boxes(8, seed=5), _boxes(3, seed=6)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = MultiScaleRoIPooler(7, SCALES)(features, boxes)
    assert out.dtype == torch.bfloat16 and out.shape == (11, 3, 7, 7)


def test_rejects_bad_configuration():
    with pytest.raises(ValueError, match="scales"):
        MultiScaleRoIPooler(7, (1 / 4, 1 / 16))
    with pytest.raises(ValueError, match="scales"):
        MultiScaleRoIPooler(7, (1 / 4, 1 / 6))
    pooler = MultiScaleRoIPooler(7, SCALES)
    assert (pooler.min_level, pooler.max_level) == (2, 5)
    with pytest.raises(ValueError, match="feature levels"):
        pooler(_pyramid()[:3], [torch.zeros(0, 4)] * 2)
    with pytest.raises(ValueError, match="images"):
        pooler(_pyramid(), [torch.zeros(0, 4)])
