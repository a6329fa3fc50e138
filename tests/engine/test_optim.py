import pytest
import torch
from torch import nn

from detkit.config.schema import SolverConfig
from detkit.engine import build_optimizer
from detkit.modeling.norm import FrozenBatchNorm2d


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, bias=False)
        self.stem_norm = FrozenBatchNorm2d(4)  # buffers only: nothing to optimise
        self.frozen = nn.Conv2d(4, 4, 1)
        self.frozen.requires_grad_(False)
        self.conv = nn.Conv2d(4, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.gn = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, 5)
        self.fc_again = self.fc  # a shared module: its parameters must be listed once
        self.ln = nn.LayerNorm(5)


SOLVER = SolverConfig(momentum=0.8, weight_decay=1e-4, weight_decay_norm=2e-5, weight_decay_bias=3e-6)


def test_parameters_land_in_the_right_group_with_the_right_decay():
    model = _Net()
    optimizer = build_optimizer(model, SOLVER, lr=0.05)
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    expected = {
        "stem.weight": "decay", "conv.weight": "decay", "fc.weight": "decay",
        "conv.bias": "no_decay_bias", "fc.bias": "no_decay_bias", "bn.bias": "no_decay_bias",
        "gn.bias": "no_decay_bias", "ln.bias": "no_decay_bias",
        "bn.weight": "no_decay_norm", "gn.weight": "no_decay_norm", "ln.weight": "no_decay_norm",
    }
    decay = {"decay": 1e-4, "no_decay_norm": 2e-5, "no_decay_bias": 3e-6}
    named = dict(model.named_parameters())
    assert set(named) == set(expected) | {"frozen.weight", "frozen.bias"}
    for name, group_name in expected.items():
        group = group_of[id(named[name])]
        assert group["name"] == group_name, name
        assert group["weight_decay"] == decay[group_name], name
    assert id(named["frozen.weight"]) not in group_of and id(named["frozen.bias"]) not in group_of
    # each trainable parameter exactly once
    listed = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert len(listed) == len(set(listed)) == len(expected)
    assert [g["name"] for g in optimizer.param_groups] == ["decay", "no_decay_norm", "no_decay_bias"]
    for group in optimizer.param_groups:
        assert group["lr"] == group["initial_lr"] == 0.05
        assert group["momentum"] == 0.8
    assert isinstance(optimizer, torch.optim.SGD)


def test_empty_groups_are_left_out_and_frozen_models_are_refused():
    optimizer = build_optimizer(nn.Linear(3, 2, bias=False), SOLVER, lr=0.1)
    assert [g["name"] for g in optimizer.param_groups] == ["decay"]
    frozen = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(frozen, SOLVER, lr=0.1)


def test_a_step_applies_each_groups_weight_decay():
    # zero gradients: the update is -lr * weight_decay * param, so each group's decay is visible
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    solver = SolverConfig(momentum=0.0, weight_decay=0.5, weight_decay_norm=0.25, weight_decay_bias=0.0)
    optimizer = build_optimizer(model, solver, lr=0.1)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
            p.grad = torch.zeros_like(p)
    optimizer.step()
    assert torch.allclose(model[0].weight, torch.full((2, 2), 1 - 0.1 * 0.5))
    assert torch.allclose(model[1].weight, torch.full((2,), 1 - 0.1 * 0.25))
    assert torch.equal(model[0].bias, torch.ones(2)) and torch.equal(model[1].bias, torch.ones(2))
