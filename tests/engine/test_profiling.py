"""The step-time split from the profiler: nested core ops count once, and the shares add up."""
from types import SimpleNamespace

import torch
from torch import nn

from detkit.engine.profiling import _bucket, _is_core_root, op_time_split


def test_a_toy_step_splits_into_core_and_outside():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 32 * 32, 10))
    x = torch.randn(8, 3, 32, 32)

    def step():
        loss = (model(x).sigmoid() * 2 - 1).pow(2).sum()
        loss.backward()

    split = op_time_split(step, warmup=1, active=2)
    assert 0 < split.core_seconds < split.profiled_seconds
    assert 0 < split.outside < 1 and split.step_seconds > 0
    # the self times of the other aten ops fit in the outside share, and the unclaimed rest completes it
    unclaimed = split.buckets["unattributed"]
    assert 0 <= unclaimed < split.outside
    assert abs(sum(split.buckets.values()) - split.outside) < 1e-9
    assert "step" in split.format()


def test_nested_core_ops_count_once_and_buckets():
    conv = SimpleNamespace(name="aten::convolution", cpu_parent=None)
    inner = SimpleNamespace(name="aten::addmm", cpu_parent=SimpleNamespace(name="aten::_slow_conv2d_forward",
                                                                           cpu_parent=conv))
    alone = SimpleNamespace(name="aten::mm", cpu_parent=SimpleNamespace(name="aten::linear", cpu_parent=None))
    assert _is_core_root(conv) and not _is_core_root(inner) and _is_core_root(alone)
    assert _bucket("aten::native_batch_norm_backward") == "batch norm"
    assert _bucket("aten::_foreach_mul_") == "optimizer" and _bucket("aten::threshold_backward") == "activation"
    assert _bucket("aten::index_select") == "other" and _bucket("aten::softplus") == "elementwise"
