import importlib

import pytest
import torch

from detkit.ops.roi_align import roi_align
from reference_ops import slow_roi_align

# the module itself: `detkit.ops.roi_align` as an attribute is the function that the package re-exports
roi_align_module = importlib.import_module("detkit.ops.roi_align")


def _random_rois(n, num_images, height, width, seed, scale=1.0):
    """Boxes of all kinds in image pixels: inside, straddling the border, outside, tiny, huge, degenerate."""
    g = torch.Generator().manual_seed(seed)
    h, w = height / scale, width / scale
    centre = torch.rand(n, 2, generator=g) * torch.tensor([w, h]) * 1.6 - torch.tensor([w, h]) * 0.3
    size = torch.rand(n, 2, generator=g) ** 2 * torch.tensor([w, h]) * 1.5
    boxes = torch.cat([centre - size / 2, centre + size / 2], 1)
    boxes[:3, 2:] = boxes[:3, :2]  # zero size
    boxes[3, 2:] = boxes[3, :2] - 2  # inverted
    batch = torch.randint(0, num_images, (n, 1), generator=g).float()
    return torch.cat([batch, boxes], 1)


def _ramp(height, width, row_step=10.0):
    """(1, 1, H, W) map whose value is row_step * y + x: bilinear sampling of it is exact inside the map."""
    y, x = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                          indexing="ij")
    return (row_step * y + x)[None, None]


def test_ramp_inside_the_map_is_the_bin_centre():
    # box (2, 3)-(6, 7), 2x2 bins of 2 px. Aligned: box shifted by -0.5 -> bin centres x 2.5, 4.5 and y 3.5, 5.5.
    # Legacy: no shift -> x 3, 5 and y 4, 6. The samples of a bin are symmetric about its centre.
    features, rois = _ramp(10, 10), torch.tensor([[0.0, 2, 3, 6, 7]])
    for sampling_ratio in (0, 1, 2, 3):
        aligned = roi_align(features, rois, 2, 1.0, sampling_ratio, aligned=True)
        legacy = roi_align(features, rois, 2, 1.0, sampling_ratio, aligned=False)
        torch.testing.assert_close(aligned[0, 0], torch.tensor([[37.5, 39.5], [57.5, 59.5]]))
        torch.testing.assert_close(legacy[0, 0], torch.tensor([[43.0, 45.0], [63.0, 65.0]]))


def test_ramp_spatial_scale():
    # the same box in a 2x larger image at scale 0.5
    features, rois = _ramp(10, 10), torch.tensor([[0.0, 4, 6, 12, 14]])
    out = roi_align(features, rois, 2, 0.5, 2, aligned=True)
    torch.testing.assert_close(out[0, 0], torch.tensor([[37.5, 39.5], [57.5, 59.5]]))


def test_ramp_clamped_at_the_border():
    # whole 4x5 map, value 5y + x, aligned, adaptive: box (-0.5, -0.5)-(4.5, 3.5), bins 2 x 2.5 px, 2 x 3 samples.
    # y samples 0, 1 | 2, 3. x samples -1/12 (clamped to 0), 0.75, 19/12 | 29/12, 3.25, 49/12 (clamped to 4).
    out = roi_align(_ramp(4, 5, row_step=5.0), torch.tensor([[0.0, 0, 0, 5, 4]]), 2, 1.0, 0, aligned=True)
    x_left, x_right = (0 + 0.75 + 19 / 12) / 3, (29 / 12 + 3.25 + 4) / 3
    expected = torch.tensor([[2.5 + x_left, 2.5 + x_right], [12.5 + x_left, 12.5 + x_right]])
    torch.testing.assert_close(out[0, 0], expected)
    top_row_max = roi_align(_ramp(4, 5, row_step=5.0), torch.tensor([[0.0, 0, 0, 5, 4]]), 2, 1.0, 0, mode="max")
    torch.testing.assert_close(top_row_max[0, 0, 0], torch.tensor([5.0 + 19 / 12, 5.0 + 4]))


def test_outside_and_degenerate_boxes():
    features = _ramp(10, 10) + 1.0
    rois = torch.tensor([[0.0, -20, -20, -5, -5],  # every sample beyond -1: zero
                         [0.0, 4, 4, 4, 4],  # empty, aligned + adaptive: no samples, zero
                         [0.0, -0.6, 3, 0.2, 4]])  # one sample at x = -0.7: reads column 0
    out = roi_align(features, rois, 1, 1.0, 0, aligned=True)
    assert out[0].abs().max() == 0 and out[1].abs().max() == 0
    torch.testing.assert_close(out[2, 0, 0, 0], torch.tensor(1.0 + 10 * 3.0))
    # legacy forces a 1x1 RoI: the empty box at (2, 3) samples (x, y) = (2.5, 3.5)
    legacy = roi_align(features, torch.tensor([[0.0, 2, 3, 2, 3]]), 1, 1.0, 0, aligned=False)
    torch.testing.assert_close(legacy[0, 0, 0, 0], torch.tensor(1.0 + 35 + 2.5))


@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_matches_slow_reference(sampling_ratio, aligned, mode):
    g = torch.Generator().manual_seed(sampling_ratio + 2 * aligned)
    features = torch.randn(2, 3, 12, 16, generator=g, dtype=torch.float64)
    rois = _random_rois(24, 2, 12, 16, seed=sampling_ratio + 2 * aligned, scale=0.5).double()
    expected = slow_roi_align(features, rois, (3, 2), 0.5, sampling_ratio, aligned, mode)
    torch.testing.assert_close(roi_align(features, rois, (3, 2), 0.5, sampling_ratio, aligned, mode), expected,
                               atol=1e-10, rtol=0)
    out32 = roi_align(features.float(), rois.float(), (3, 2), 0.5, sampling_ratio, aligned, mode)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_chunked_and_one_by_one_equal_batched(monkeypatch, sampling_ratio, mode):
    g = torch.Generator().manual_seed(5)
    features = torch.randn(2, 4, 12, 16, generator=g)
    rois = _random_rois(40, 2, 12, 16, seed=5)
    batched = roi_align(features, rois, 4, 1.0, sampling_ratio, mode=mode)
    one_by_one = torch.cat([roi_align(features, roi[None], 4, 1.0, sampling_ratio, mode=mode) for roi in rois])
    torch.testing.assert_close(batched, one_by_one, atol=1e-6, rtol=1e-6)
    monkeypatch.setattr(roi_align_module, "CHUNK_BUDGET", 100)
    torch.testing.assert_close(roi_align(features, rois, 4, 1.0, sampling_ratio, mode=mode), batched,
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_gradcheck(sampling_ratio, aligned, mode):
    g = torch.Generator().manual_seed(1)
    features = torch.randn(2, 2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0.3, 0.7, 4.1, 3.9], [1, -1.2, 1.1, 7.3, 6.2], [1, 2.2, 2.6, 2.9, 3.1],
                         [0, 1.0, 0.5, 10.0, 2.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f: roi_align(f, rois, (2, 3), 1.0, sampling_ratio, aligned, mode),
                                    (features,))


@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_empty_rois(sampling_ratio, mode):
    features = torch.randn(2, 3, 8, 8, requires_grad=True)
    out = roi_align(features, torch.zeros(0, 5), (7, 5), 0.25, sampling_ratio, mode=mode)
    assert out.shape == (0, 3, 7, 5) and out.dtype == features.dtype
    out.sum().backward()
    assert features.grad is not None and features.grad.abs().sum() == 0


def test_gradient_is_a_scatter_of_the_bilinear_weights():
    # one 1x1 bin, one sample at (y, x) = (1.25, 2.5) (box shifted by -0.5): rows 1 and 2 weigh 0.75 and 0.25,
    # columns 2 and 3 weigh 0.5 each
    features = torch.zeros(1, 1, 4, 4, requires_grad=True)
    out = roi_align(features, torch.tensor([[0.0, 2.5, 1.25, 3.5, 2.25]]), 1, 1.0, 1, aligned=True)
    out.sum().backward()
    expected = torch.zeros(4, 4)
    expected[1, 2:4] = 0.375
    expected[2, 2:4] = 0.125
    torch.testing.assert_close(features.grad[0, 0], expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    g = torch.Generator().manual_seed(2)
    features = torch.randn(2, 8, 12, 16, generator=g).to(dtype)
    rois = _random_rois(30, 2, 12, 16, seed=2)
    # the same rounded features in float32: only the weighted sum runs in the half type
    expected = roi_align(features.float(), rois, 7, 1.0, 0)
    low = features.clone().requires_grad_()
    out = roi_align(low, rois, 7, 1.0, 0)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=0.03, rtol=0.02)
    out.float().sum().backward()
    assert low.grad.dtype == dtype and torch.isfinite(low.grad.float()).all()
    # half-precision rois are accepted (their coordinates are upcast before use)
    assert roi_align(features, rois.to(dtype), 7, 1.0, 0).shape == (30, 8, 7, 7)


def test_autocast_keeps_the_features_dtype():
    g = torch.Generator().manual_seed(3)
    features = torch.randn(1, 4, 10, 10, generator=g)
    rois = _random_rois(10, 1, 10, 10, seed=3)
    expected = roi_align(features, rois, 3, 1.0, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = roi_align(features, rois, 3, 1.0, 2)
        out_low = roi_align(features.bfloat16(), rois, 3, 1.0, 2)
    assert out.dtype == torch.float32 and out_low.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected)


def test_rejects_bad_arguments():
    features = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="rois"):
        roi_align(features, torch.zeros(3, 4), 2, 1.0)
    with pytest.raises(ValueError, match="mode"):
        roi_align(features, torch.zeros(3, 5), 2, 1.0, mode="sum")
    with pytest.raises(ValueError, match="features"):
        roi_align(features[0], torch.zeros(3, 5), 2, 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_cuda_matches_cpu(sampling_ratio, mode):
    g = torch.Generator().manual_seed(4)
    features = torch.randn(2, 8, 12, 16, generator=g, requires_grad=True)
    rois = _random_rois(50, 2, 12, 16, seed=4)
    out = roi_align(features, rois, 5, 1.0, sampling_ratio, mode=mode)
    out.backward(torch.ones_like(out))
    features_cuda = features.detach().cuda().requires_grad_()
    out_cuda = roi_align(features_cuda, rois.cuda(), 5, 1.0, sampling_ratio, mode=mode)
    out_cuda.backward(torch.ones_like(out_cuda))
    torch.testing.assert_close(out_cuda.cpu(), out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features_cuda.grad.cpu(), features.grad, atol=1e-4, rtol=1e-4)
    with torch.autocast("cuda", dtype=torch.float16):
        assert roi_align(features_cuda.half(), rois.cuda(), 5, 1.0, sampling_ratio, mode=mode).dtype == torch.float16
