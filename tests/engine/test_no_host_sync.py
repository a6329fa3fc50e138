"""The RetinaNet training step makes the host wait for the device only once, in its deliberate `.tolist()`.

On CPU nothing can wait, so the audit looks at what would: operators whose output size or value depends on the data
(nonzero, boolean indexing, unique, `.item()`), and tensors made from Python values inside the step (`torch.tensor`
of a list: on CUDA a copy from pageable host memory that blocks).
"""
import collections
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from detkit.data.loader import build_dataset, build_train_loader
from detkit.engine.optim import build_optimizer
from detkit.engine.schedule import build_scheduler
from detkit.engine.train_step import TrainStep
from detkit.modeling.build import build_model
from run_configs import exact_config, fast_config

WAITING_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::equal", "aten::unique", "aten::_unique2",
               "aten::unique_consecutive", "aten::unique_dim", "aten::bincount", "aten::masked_select",
               "aten::lift_fresh", "aten::repeat_interleave"}


class HostSyncAudit(TorchDispatchMode):
    """Counts the waiting operators by the detkit line that issued them."""

    def __init__(self):
        super().__init__()
        self.hits = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        flagged = name in WAITING_OPS
        if name in ("aten::index", "aten::index_put_", "aten::index_put"):
            flagged = any(t is not None and t.dtype == torch.bool for t in args[1])
        if flagged:
            frames = [f for f in traceback.extract_stack() if "/detkit/" in f.filename]
            where = f"{frames[-1].filename.split('/detkit/')[-1]}:{frames[-1].lineno}" if frames else "outside"
            self.hits[f"{name} at {where}"] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("config, accumulate", [(fast_config, 1), (exact_config, 2)])
def test_retinanet_training_step_has_no_data_dependent_ops(synth_root, tmp_path, config, accumulate):
    cfg = config(synth_root, tmp_path, accumulate=accumulate)
    cfg.data.batch_size = 2
    dataset = build_dataset(cfg.data, "train")
    batches = [b for _, b in zip(range(accumulate), build_train_loader(dataset, cfg.data, seed=0,
                                                                       accumulate=accumulate))]
    model = build_model(cfg.model, dataset.coco.num_classes).train()
    optimizer = build_optimizer(model, cfg.solver, 0.01)
    step = TrainStep(model, model, optimizer, build_scheduler(optimizer, cfg.solver, 6),
                     torch.amp.GradScaler("cpu", enabled=False), device=torch.device("cpu"), accumulate=accumulate,
                     clip_grad_norm=10.0, step_normalized=accumulate > 1)
    step(iter(batches))  # the first step fills the caches (anchors per feature-map shape, normalisation constants)
    with HostSyncAudit() as audit:
        result = step(iter(batches), stop="SIGTERM")
    assert result.kind == "ok" and result.stop == "SIGTERM"
    assert not audit.hits, dict(audit.hits)


def test_the_audit_sees_what_would_wait():
    x = torch.randn(10)
    with HostSyncAudit() as audit:
        x[x > 0]  # a boolean index: its size depends on the data
        torch.tensor([1.0, 2.0])  # made from Python values
        x.sum().item()
    assert len(audit.hits) == 3 and all("test_no_host_sync" not in k or "outside" in k for k in audit.hits)
