"""The RetinaNet training step makes the host wait for the device only once, in its deliberate `.tolist()`.

On CPU nothing can wait, so the audit looks at what would: operators whose output size or value depends on the data
(nonzero, boolean indexing, unique, `.item()`), and tensors made from Python values inside the step (`torch.tensor`
of a list: on CUDA a copy from pageable host memory that blocks).
"""
import collections
import traceback

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from detkit.config import Config
from detkit.config.load import load_config
from detkit.data.loader import build_dataset, build_train_loader
from detkit.engine.optim import build_optimizer
from detkit.engine.schedule import build_scheduler
from detkit.engine.train_step import TrainStep
from detkit.modeling.build import build_model
from run_configs import exact_config, fast_config

REPO = Path(__file__).resolve().parents[2]

WAITING_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::equal", "aten::unique", "aten::_unique2",
               "aten::unique_consecutive", "aten::unique_dim", "aten::bincount", "aten::masked_select",
               "aten::lift_fresh", "aten::repeat_interleave"}


class HostSyncAudit(TorchDispatchMode):
    """Counts the waiting operators by the detkit line that issued them."""

    def __init__(self):
        super().__init__()
        self.hits = collections.Counter()
        self.places = collections.Counter()  # (file, function) -> hits

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        flagged = name in WAITING_OPS
        if name in ("aten::index", "aten::index_put_", "aten::index_put"):
            flagged = any(t is not None and t.dtype == torch.bool for t in args[1])
        if flagged:
            frames = [f for f in traceback.extract_stack() if "/detkit/" in f.filename]
            where = f"{frames[-1].filename.split('/detkit/')[-1]}:{frames[-1].lineno}" if frames else "outside"
            self.hits[f"{name} at {where}"] += 1
            named = [f for f in frames if not f.name.startswith("<")]  # the function around a comprehension
            self.places[(named[-1].filename.split('/detkit/')[-1], named[-1].name) if named else ("outside", "")] \
                += 1
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


# The two-stage step waits where the amount of work depends on the data, and nowhere else. Each place, by
# (file, function), with why it has to read:
TWO_STAGE_READS = {
    ("ops/nms.py", "nms"): "NMS keeps a data-dependent number of proposals",
    ("modeling/rpn.py", "generate_proposals"): "the proposals' per-image split after NMS",
    ("ops/roi_align.py", "_sample_groups"): "adaptive sampling (sampling_ratio 0) sizes its computation per RoI",
    ("ops/roi_align.py", "roi_align"): "the RoIs grouped by sample count, back in their order",
    ("modeling/detectors/rcnn.py", "_mask_loss"): "mask targets: the foreground RoIs go to the host",
    ("modeling/mask_ops.py", "mask_targets_per_image"): "the ground-truth polygons are rasterised on the host",
}


@pytest.mark.parametrize("stem", ["faster-rcnn-resnet18-fpn-demo", "mask-rcnn-resnet18-fpn-demo"])
def test_two_stage_training_step_reads_only_where_the_work_depends_on_the_data(synth_root, stem):
    """Anchor and RoI matching, sampling, box targets and the losses wait for nothing; the pooler's only read is
    its level split's `.tolist()`, which the audit does not see (its nonzero per level is gone)."""
    cfg = load_config(Config, REPO / "configs" / f"{stem}.yaml", [
        f"data.train.annotations={synth_root / 'annotations/instances_train.json'}",
        f"data.train.images={synth_root / 'train'}", "data.val.annotations=", "data.num_workers=0",
        "data.batch_size=2", "solver.optimizer=sgd"])  # AdamW reads its CPU step counters on CPU only
    cfg.data.train_transform.short_sizes, cfg.data.train_transform.max_size = (96,), 128
    dataset = build_dataset(cfg.data, "train")
    batches = [next(iter(build_train_loader(dataset, cfg.data, seed=0)))]
    torch.manual_seed(0)
    model = build_model(cfg.model, dataset.coco.num_classes).train()
    optimizer = build_optimizer(model, cfg.solver, 0.01)
    step = TrainStep(model, model, optimizer, build_scheduler(optimizer, cfg.solver, 6),
                     torch.amp.GradScaler("cpu", enabled=False), device=torch.device("cpu"), clip_grad_norm=10.0)
    step(iter(batches))
    with HostSyncAudit() as audit:
        result = step(iter(batches))
    assert result.kind == "ok"
    unexpected = {place: n for place, n in audit.places.items() if place not in TWO_STAGE_READS}
    assert not unexpected, (unexpected, dict(audit.hits))
    assert not any("lift_fresh" in hit for hit in audit.hits if "mask_ops" not in hit), dict(audit.hits)
    assert ("ops/nms.py", "nms") in audit.places  # the audit does see the proposals' NMS
