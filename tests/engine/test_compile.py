"""`runtime.compile`: the dense parts compiled in place, with the same update and the same state dict.

The tests use the "eager" backend, which runs dynamo's capture and guards but no code generation, so they need
no C++ compiler and stay fast; inductor is what users run.
"""
import copy
import pickle
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from detkit.config import Config, ConfigError
from detkit.config.load import load_config

from detkit.data.loader import build_dataset, build_train_loader
from detkit.engine.compile import compile_model, dense_parts
from detkit.engine.inference import prepare_for_inference
from detkit.engine.optim import build_optimizer
from detkit.engine.schedule import build_scheduler
from detkit.engine.train_step import TrainStep
from detkit.modeling.build import build_model
from detkit.modeling.detectors.retinanet import RetinaNetLoss
from run_configs import fast_config

REPO = Path(__file__).resolve().parents[2]


def _step(model, cfg):
    optimizer = build_optimizer(model, cfg.solver, 0.01)
    scheduler = build_scheduler(optimizer, cfg.solver, iters_per_epoch=6)
    return TrainStep(model, model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False),
                     device=torch.device("cpu"), clip_grad_norm=cfg.solver.clip_grad_norm)


def test_off_by_default_and_compiles_nothing(synth_root, tmp_path):
    cfg = fast_config(synth_root, tmp_path)
    model = build_model(cfg.model, 3)
    assert cfg.runtime.compile is False and compile_model(model, cfg.runtime) == []
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in model.modules())


def test_unknown_backend_or_a_mode_for_another_backend_is_a_config_error(synth_root, tmp_path):
    cfg = fast_config(synth_root, tmp_path)
    model = build_model(cfg.model, 3)
    cfg.runtime.compile, cfg.runtime.compile_backend = True, "inductr"
    with pytest.raises(ConfigError, match="'inductr' is not a torch.compile backend"):
        compile_model(model, cfg.runtime)
    cfg.runtime.compile_backend, cfg.runtime.compile_mode = "eager", "max-autotune"
    with pytest.raises(ConfigError, match="inductor mode"):
        compile_model(model, cfg.runtime)


def test_dense_parts_of_each_detector(synth_root, tmp_path):
    cfg = fast_config(synth_root, tmp_path)
    assert list(dense_parts(build_model(cfg.model, 3))) == ["backbone", "neck", "head", "loss"]
    faster = load_config(Config, REPO / "configs" / "faster-rcnn-resnet18-fpn-demo.yaml")
    assert list(dense_parts(build_model(faster.model, 3))) == ["backbone", "neck", "rpn.head"]


def test_compiled_training_step_matches_eager_and_keeps_the_state_dict(synth_root, tmp_path):
    torch._dynamo.reset()
    counters.clear()
    cfg = fast_config(synth_root, tmp_path)
    cfg.runtime.compile, cfg.runtime.compile_backend = True, "eager"
    dataset = build_dataset(cfg.data, "train")
    batches = list(zip(range(2), build_train_loader(dataset, cfg.data, seed=0)))
    torch.manual_seed(0)
    eager = build_model(cfg.model, dataset.coco.num_classes)
    compiled = copy.deepcopy(eager)
    assert compile_model(compiled, cfg.runtime) == ["backbone", "neck", "head", "loss"]
    assert compiled.backbone._compiled_call_impl is not None
    assert list(compiled.state_dict()) == list(eager.state_dict())

    results = []
    for model in (eager, compiled):
        model.train()
        step = _step(model, cfg)
        results.append([step(iter([batch])).values["loss"] for _, batch in batches])
    assert counters["stats"]["unique_graphs"] >= 4
    # dynamo did capture the losses: their module's forward has compiled entries
    assert eager.loss._compiled_call_impl is None and compiled.loss._compiled_call_impl is not None
    assert torch._dynamo.eval_frame._debug_get_cache_entry_list(RetinaNetLoss.forward.__code__)
    assert not counters["graph_break"], dict(counters["graph_break"])  # each part is one whole graph
    assert results[0] == results[1]
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        assert torch.equal(a, b), name
    # a compiled model pickles (as its eager self), and compiling again replaces the compiled calls
    assert pickle.loads(pickle.dumps(compiled)).loss._compiled_call_impl is None
    assert compile_model(compiled, cfg.runtime) == ["backbone", "neck", "head", "loss"]


def test_compiled_inference_gives_the_same_detections(synth_root, tmp_path):
    torch._dynamo.reset()
    cfg = fast_config(synth_root, tmp_path)
    cfg.model.retinanet.score_threshold = 0.0  # random weights score about 0.01: keep detections to compare
    dataset = build_dataset(cfg.data, "train")
    batch = next(iter(build_train_loader(dataset, cfg.data, seed=0)))
    torch.manual_seed(0)
    eager, _ = prepare_for_inference(build_model(cfg.model, dataset.coco.num_classes), cfg.runtime,
                                     torch.device("cpu"))
    cfg.runtime.compile, cfg.runtime.compile_backend = True, "eager"
    compiled, _ = prepare_for_inference(copy.deepcopy(eager), cfg.runtime, torch.device("cpu"))
    assert compiled.head._compiled_call_impl is not None
    with torch.no_grad():
        expected = eager(batch.images, batch.image_sizes)
        got = compiled(batch.images, batch.image_sizes)
    assert len(expected) == len(got) == batch.images.shape[0] and sum(len(d.scores) for d in expected) > 0
    for a, b in zip(expected, got):
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores) and torch.equal(a.labels, b.labels)


def test_benchmark_excludes_compilation_from_the_timing_and_records_it(monkeypatch):
    from detkit.cli import shipped_config
    from detkit.engine import environment
    from detkit.engine.benchmark import BenchmarkOptions, run_benchmark

    torch._dynamo.reset()
    monkeypatch.setattr(environment, "git_dirty", lambda root: None)
    name = "retinanet-resnet18-fpn-demo.yaml"
    cfg = load_config(Config, shipped_config(name), ["runtime.compile=true", "runtime.compile_backend=eager"])
    options = BenchmarkOptions(config_path=str(shipped_config(name)), size=(128, 128), train_batch=1, iters=1,
                               warmup=0, batch_sizes=(1,), device="cpu")
    record = run_benchmark(cfg, options)
    assert record["settings"]["compile"] is True
    assert record["train"]["compile_seconds"] > 0 and record["train"]["bad_steps"] == 0
    assert record["inference"]["fps_batch1"] > 0
