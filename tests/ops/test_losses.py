import math

import pytest
import torch

from detkit.ops import huber_loss, l1_loss, sigmoid_focal_loss, sigmoid_focal_loss_from_labels, smooth_l1_loss


def test_focal_loss_hand_computed():
    logits = torch.tensor([0.0, 2.0])
    targets = torch.tensor([1.0, 0.0])
    p = torch.sigmoid(logits)
    expected = torch.stack([
        0.25 * (1 - p[0]) ** 2 * -torch.log(p[0]),
        0.75 * p[1] ** 2 * -torch.log(1 - p[1]),
    ])
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets), expected)
    # gamma 0 and no alpha is plain BCE
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, alpha=-1, gamma=0),
                               torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none"))


def test_smooth_l1_l1_huber():
    x = torch.tensor([0.5, 2.0])
    t = torch.zeros(2)
    torch.testing.assert_close(smooth_l1_loss(x, t, beta=1.0), torch.tensor([0.125, 1.5]))
    torch.testing.assert_close(smooth_l1_loss(x, t, beta=0.0), l1_loss(x, t))
    torch.testing.assert_close(huber_loss(x, t, delta=1.0), torch.tensor([0.125, 1.5]))
    torch.testing.assert_close(huber_loss(x, t, delta=0.1), 0.1 * smooth_l1_loss(x, t, beta=0.1))


@pytest.mark.parametrize("fn", [
    lambda x, t: sigmoid_focal_loss(x, t),
    lambda x, t: smooth_l1_loss(x, t, beta=0.11),
    lambda x, t: huber_loss(x, t, delta=0.5),
])
def test_gradcheck(fn):
    x = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    t = (torch.rand(6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) > 0.5).double()
    # the losses upcast to float32; check float64 gradients of the same formulas through double inputs
    assert torch.autograd.gradcheck(lambda a: fn(a.float(), t.float()).double(), (x,), eps=1e-3, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_give_float32_losses(dtype):
    x = torch.tensor([20.0, -20.0], dtype=dtype)
    t = torch.tensor([0.0, 1.0], dtype=dtype)
    loss = sigmoid_focal_loss(x, t)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    assert smooth_l1_loss(x, t).dtype == torch.float32


def test_empty_inputs():
    e = torch.zeros(0)
    for reduction in ("sum", "mean"):
        assert sigmoid_focal_loss(e, e, reduction=reduction).item() == 0.0
        assert smooth_l1_loss(e, e, reduction=reduction).item() == 0.0
    assert not math.isnan(l1_loss(e, e, reduction="mean").item())


def _dense_reference(logits, labels, alpha, gamma):
    k = logits.shape[-1]
    rows = torch.where(labels >= 0, labels, k)  # ignored rows (-1) have all-zero targets, like background (k)
    one_hot = torch.nn.functional.one_hot(rows, k + 1)[..., :k].to(logits.dtype)
    return sigmoid_focal_loss(logits, one_hot, alpha, gamma).sum(-1)


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1.0, 0.0), (0.5, 1.5)])
def test_focal_loss_from_labels_equals_dense_one_hot(alpha, gamma):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 50, 7, generator=g) * 4).requires_grad_()
    labels = torch.randint(-1, 8, (2, 50), generator=g)  # -1 ignored, 0..6 foreground, 7 background
    assert {-1, 0, 7} <= set(labels.unique().tolist())
    upstream = torch.rand(2, 50, generator=g)
    got = sigmoid_focal_loss_from_labels(logits, labels, alpha, gamma)
    (got_grad,) = torch.autograd.grad((got * upstream).sum(), logits)
    ref = _dense_reference(logits, labels, alpha, gamma)
    (ref_grad,) = torch.autograd.grad((ref * upstream).sum(), logits)
    assert got.shape == (2, 50) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, ref_grad, rtol=1e-5, atol=1e-6)


def test_focal_loss_from_labels_gradcheck():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 4, dtype=torch.float64, generator=g).requires_grad_()
    labels = torch.tensor([0, 3, 4, -1, 2])
    assert torch.autograd.gradcheck(lambda a: sigmoid_focal_loss_from_labels(a, labels, 0.25, 2.0), (x,))
    assert torch.autograd.gradcheck(lambda a: sigmoid_focal_loss_from_labels(a, labels, -1, 1.5), (x,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_focal_loss_from_labels_half_inputs(dtype):
    logits = torch.tensor([[30.0, -30.0, 0.0], [-30.0, 30.0, 2.0]], dtype=dtype, requires_grad=True)
    labels = torch.tensor([0, 3])
    loss = sigmoid_focal_loss_from_labels(logits, labels)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    loss.sum().backward()
    assert logits.grad.dtype == dtype and torch.isfinite(logits.grad).all()
    torch.testing.assert_close(loss, _dense_reference(logits.detach().float(), labels, 0.25, 2.0))


def test_focal_loss_from_labels_empty():
    logits = torch.zeros(0, 5, requires_grad=True)
    loss = sigmoid_focal_loss_from_labels(logits, torch.zeros(0, dtype=torch.int64))
    assert loss.shape == (0,)
    loss.sum().backward()
    assert logits.grad.shape == (0, 5)
