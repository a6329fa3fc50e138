import math

import pytest
import torch

from detkit.ops import huber_loss, l1_loss, sigmoid_focal_loss, smooth_l1_loss


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
