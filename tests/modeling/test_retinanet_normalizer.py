"""RetinaNet's step normaliser: micro-batches rescaled by d_est / d_true train exactly like one whole batch."""
import dataclasses

import pytest
import torch

from detkit.config.schema import BackboneConfig, FPNConfig, ModelConfig, RetinaNetConfig
from detkit.data.loader import Targets
from detkit.modeling.build import build_model

KINDS = ["num_fg", "num_fg_plus_one", "num_fg_plus_images", "ema"]
RTOL, ATOL = 1e-5, 1e-6


def _tiny_model(normalizer):
    # GroupNorm: the statistics of one image do not depend on the rest of its batch
    cfg = ModelConfig(backbone=BackboneConfig(depth=18, norm="GN", freeze_at=0), fpn=FPNConfig(out_channels=16),
                      retinanet=RetinaNetConfig(head_width=16, num_convs=1, head_norm="", normalizer=normalizer))
    torch.manual_seed(0)
    return build_model(cfg, 3).train()


def _targets(boxes, labels):
    return Targets(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(labels, dtype=torch.int64),
                   torch.zeros(0, 4))


def _batch():
    """Four images padded to one fixed size; the halves hold very different numbers of objects."""
    images = torch.randint(0, 256, (4, 3, 64, 96), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    sizes = torch.tensor([[64, 96], [60, 80], [64, 90], [50, 96]])
    targets = [_targets([[4, 6, 40, 50], [50, 10, 90, 60], [10, 30, 30, 60]], [0, 2, 1]),
               _targets([[20, 8, 70, 58], [2, 2, 34, 34]], [1, 1]),
               _targets([[30, 20, 50, 40]], [2]),
               _targets([], [])]
    return images, sizes, targets


def _loss(losses):
    return sum(v for k, v in losses.items() if k.startswith("loss"))


def _grads(model):
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _reset(model, state):
    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("normalizer", KINDS)
def test_two_micro_batches_rescaled_equal_one_batch(normalizer):
    model = _tiny_model(normalizer)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    images, sizes, targets = _batch()

    whole = model(images, sizes, targets)  # the default path: one batch of 4
    assert "num_fg_total" not in whole
    _loss(whole).backward()
    expected, expected_buffer = _grads(model), model.loss_normalizer.clone()

    _reset(model, state)
    d_est = model.normalizer_estimate()
    num_fg, logged = torch.zeros(()), torch.zeros(())
    for half in (slice(0, 2), slice(2, 4)):
        losses = model(images[half], sizes[half], targets[half], loss_normalizer=d_est)
        _loss(losses).backward()
        num_fg += losses["num_fg_total"]
        logged += _loss(losses).detach() * d_est
    assert torch.equal(model.loss_normalizer, state["loss_normalizer"])  # the micro-batches leave the EMA alone
    d_true = model.step_normalizer(num_fg, 4)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    torch._foreach_mul_(grads, d_est / d_true)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(logged / d_true, _loss(whole).detach(), rtol=1e-6, atol=0)
    if normalizer == "ema":
        torch.testing.assert_close(model.loss_normalizer, expected_buffer, rtol=1e-6, atol=0)
        torch.testing.assert_close(model.normalizer_estimate(), d_true)
    else:  # the other kinds keep the buffer near the true scale, for the next step's estimate
        moved, before = model.normalizer_estimate() - d_true, state["loss_normalizer"] - d_true
        torch.testing.assert_close(moved, 0.9 * before)

    # negative control: the old way (each micro-batch its own normaliser, losses halved) is visibly different
    _reset(model, state)
    for half in (slice(0, 2), slice(2, 4)):
        (_loss(model(images[half], sizes[half], targets[half])) / 2).backward()
    gap = max(((got - want).abs() - RTOL * want.abs()).max().item() for got, want in zip(_grads(model), expected))
    assert gap > 100 * ATOL, gap


def test_step_normalizer_kinds_by_hand():
    model = _tiny_model("num_fg")
    for kind, expected in [("num_fg", 1.0), ("num_fg_plus_one", 1.0), ("num_fg_plus_images", 6.0),
                           ("ema", 0.9 * 100 + 0.1 * 1.0)]:
        model.cfg = dataclasses.replace(model.cfg, normalizer=kind)
        model.loss_normalizer.fill_(100.0)
        assert model.step_normalizer(torch.tensor(0.0), 6).item() == pytest.approx(expected)
    model.cfg = dataclasses.replace(model.cfg, normalizer="num_fg_plus_images")
    model.loss_normalizer.fill_(100.0)
    assert model.step_normalizer(torch.tensor(40.0), torch.tensor(8)).item() == 48.0
    estimate = model.normalizer_estimate()
    estimate += 1  # a copy: the buffer is untouched
    assert model.loss_normalizer.item() == pytest.approx(0.9 * 100 + 0.1 * 48)
