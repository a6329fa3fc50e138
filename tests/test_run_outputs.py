"""The files a run leaves: model_final.pth (weights and config), model_best.pth, the last training checkpoint,
metrics without undefined values; and `detkit synth`, which makes the demo's dataset and leaves no stale images."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import detkit.cli
import detkit.engine.trainer
from detkit.cli import main, shipped_config
from detkit.config import Config, load_config, to_dict
from detkit.data.synth import generate
from detkit.engine.checkpoint import checkpoint_candidates, find_last_checkpoint
from detkit.engine.inference import load_detector
from detkit.engine.trainer import Trainer
from detkit.evaluation.coco_eval import METRIC_NAMES, evaluate

REPO = Path(__file__).resolve().parents[1]
WEIGHTS_KEYS = {"model", "config", "categories", "detkit_version"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two iterations of the demo config at 64 px through the real entry point, evaluated after iteration 1
    (periodic) and at the end, a checkpoint after each iteration."""
    work = tmp_path_factory.mktemp("run_outputs")
    data = work / "data"
    generate(data, {"train": 4, "val": 3}, seed=2, workers=1, min_size=64, max_size=80, max_objects=4)
    out = work / "run"
    overrides = [f"data.train.annotations={data}/annotations/instances_train.json", f"data.train.images={data}/train",
                 f"data.val.annotations={data}/annotations/instances_val.json", f"data.val.images={data}/val",
                 "data.batch_size=2", "data.num_workers=0", "data.train_transform.short_sizes=[64]",
                 "data.train_transform.max_size=80", "data.test_transform.short_sizes=[64]",
                 "data.test_transform.max_size=80", "solver.unit=iterations", "solver.max_length=2",
                 "solver.warmup_iters=1", "runtime.log_period=1", "runtime.checkpoint_period=1",
                 "runtime.channels_last=false", "eval.period=1", f"runtime.output_dir={out}"]
    proc = subprocess.run([sys.executable, "-m", "detkit", "train",
                           str(shipped_config("retinanet-resnet18-fpn-demo.yaml")), *overrides],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": out, "data": data, "stderr": proc.stderr, "stdout": proc.stdout}


def _plain(tree):
    return json.loads(json.dumps(tree))  # tuples as lists


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _records(out):
    return [json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl"))
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def _eval_records(out):
    return [r for r in _records(out) if "bbox/AP" in r]


def test_model_final_holds_the_weights_and_config_only(run):
    out = run["out"]
    final = _load(out / "model_final.pth")
    assert set(final) == WEIGHTS_KEYS  # no optimiser, scheduler, scaler, sampler or random-stream state
    assert _plain(final["config"]) == _plain(to_dict(load_config(Config, out / "config.yaml")))  # the run's own
    assert final["config"]["solver"]["max_length"] == 2 and final["config"]["runtime"]["output_dir"] == str(out)
    assert [c["name"] for c in final["categories"]][:2] == ["circle", "square"]
    # the training state of the last iteration is the last training checkpoint, which the pointer names
    assert (out / "last_checkpoint").read_text() == "model_0000002.pth"
    last = _load(out / "model_0000002.pth")
    assert last["iteration"] == 2 and {"optimizer", "scheduler", "scaler", "data", "rng"} <= set(last)
    for name, value in last["model"].items():
        assert torch.equal(final["model"][name], value), name
    assert "model_final.pth (the weights) and model_0000002.pth (the training state)" in run["stderr"]


def test_model_best_holds_the_best_evaluation_and_its_iteration(run):
    out = run["out"]
    evaluations = _eval_records(out)
    assert [r["iteration"] for r in evaluations] == [1, 2]  # periodic after 1, final after 2
    best_value = max(r["bbox/AP"] for r in evaluations)
    best_iteration = next(r["iteration"] for r in evaluations if r["bbox/AP"] == best_value)  # the first to reach it
    best = _load(out / "model_best.pth")
    assert set(best) == WEIGHTS_KEYS | {"metric", "value", "iteration"}
    assert best["metric"] == "bbox/AP"
    assert best["value"] == pytest.approx(best_value) and best["iteration"] == best_iteration
    trained_to_then = _load(out / f"model_{best_iteration:07d}.pth")
    for name, value in trained_to_then["model"].items():
        assert torch.equal(best["model"][name], value), name
    assert _load(out / "model_0000002.pth")["best_metric"] == pytest.approx(best_value)  # resume keeps following it
    assert f"INFO detkit.train: iteration {best_iteration}: bbox/AP {best_value:.4f} (best {best_value:.4f}, saved " \
           "model_best.pth)" in run["stderr"].splitlines()


def test_undefined_coco_metrics_are_not_logged(run):
    out = run["out"]
    gt = run["data"] / "annotations" / "instances_val.json"
    stats = dict(zip(METRIC_NAMES, evaluate(gt, out / "eval" / "results.json").stats))
    undefined = {name for name, value in stats.items() if value < 0}
    assert {"APl", "ARl"} <= undefined  # 64-80 px images hold no large object
    final_eval = _eval_records(out)[-1]
    for record in _records(out):
        assert all(value >= 0 for key, value in record.items()), record
    assert {f"bbox/{name}" for name in undefined}.isdisjoint(final_eval)
    assert {f"bbox/{name}" for name in set(METRIC_NAMES) - undefined} <= set(final_eval)
    assert final_eval["bbox/AP"] == pytest.approx(stats["AP"])  # a fraction, as the 12-line block prints it
    metrics = json.loads((out / "eval" / "metrics.json").read_text(),
                         parse_constant=lambda name: pytest.fail(f"{name} in metrics.json"))["bbox"]
    assert undefined.isdisjoint(metrics) and metrics["AP"] == pytest.approx(stats["AP"])
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert "bbox/AP" in tags and not {f"bbox/{name}" for name in undefined} & tags
    assert all(e.value >= 0 for tag in tags for e in events.Scalars(tag))


def test_everything_that_loads_weights_takes_model_final_and_model_best(run, capsys, tmp_path):
    out = run["out"]
    final_ap = _eval_records(out)[-1]["bbox/AP"]
    for name in ("model_final.pth", "model_best.pth"):
        # `detkit eval --weights` (inference's load_detector) on the run's own config
        assert main(["eval", str(out / "config.yaml"), "--weights", str(out / name), "--out", str(tmp_path / name),
                     "--no-plots"]) == 0, capsys.readouterr().err
        ap = json.loads((tmp_path / name / "metrics.json").read_text())["bbox"]["AP"]
        if name == "model_final.pth":
            assert ap == pytest.approx(final_ap)
        # what `detkit benchmark --weights` calls
        cfg = load_config(Config, out / "config.yaml")
        model, categories = load_detector(cfg, str(out / name), torch.device("cpu"), prepare=False)
        assert len(categories) == 8 and sum(p.numel() for p in model.parameters()) > 1e6


def test_resume_never_takes_a_weights_file_for_a_training_checkpoint(run, capsys):
    out = run["out"]
    names = [p.name for p in checkpoint_candidates(out)]
    assert names == ["model_0000002.pth", "model_0000001.pth"]
    assert find_last_checkpoint(out) == out / "model_0000002.pth"
    cfg = load_config(Config, out / "config.yaml")
    trainer = Trainer(cfg, resume=True, progress=False)
    try:
        assert trainer.iteration == 2 and trainer.best_metric == pytest.approx(
            max(r["bbox/AP"] for r in _eval_records(out)))
    finally:
        trainer.writer.close()
        trainer.close()
    # asked for explicitly, a weights file is refused with what to do instead
    assert main(["train", str(out / "config.yaml"), "--resume", str(out / "model_final.pth"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "holds a model's weights only" in err and "model.weights=" in err


# -- detkit synth ---------------------------------------------------------------------------------------------

def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_regenerating_removes_stale_images_of_the_generated_splits_only(tmp_path):
    root = tmp_path / "data"
    kw = dict(seed=4, workers=1, min_size=48, max_size=64, max_objects=3)
    generate(root, {"train": 6, "val": 3}, **kw)
    val_before = _digest(root / "val")
    unrelated = [root / "train" / "notes.txt", root / "train" / "000001.txt", root / "train" / "my_000002.jpg",
                 root / "train" / "extra" / "000005.jpg", root / "other" / "000004.png"]
    for path in unrelated:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not synth's")
    generate(root, {"train": 3}, **kw)  # fewer images: 000003-000005 are stale
    annotations = json.loads((root / "annotations" / "instances_train.json").read_text())
    listed = {im["file_name"] for im in annotations["images"]}
    assert len(listed) == 3
    left = {p.name for p in (root / "train").iterdir() if p.is_file()}
    assert left == listed | {"notes.txt", "000001.txt", "my_000002.jpg"}
    assert all(p.read_bytes() == b"not synth's" for p in unrelated)  # other files and folders are left alone
    assert _digest(root / "val") == val_before  # a split not generated this time is not touched
    # the same as generating into an empty folder
    generate(tmp_path / "fresh", {"train": 3}, **kw)
    for name in listed:
        assert (root / "train" / name).read_bytes() == (tmp_path / "fresh" / "train" / name).read_bytes()


def test_synth_with_no_options_makes_the_demos_dataset(tmp_path, monkeypatch):
    monkeypatch.setattr(detkit.cli, "DEMO_SPLITS", {"train": 3, "val": 2})  # the demo's own sizes, made small

    class NoTraining:  # the demo generates its dataset, then stops where it would train
        def __init__(self, *args, **kwargs):
            pass

        def train(self):
            return {"stopped": "the test", "iteration": 0}

    monkeypatch.setattr(detkit.engine.trainer, "Trainer", NoTraining)
    assert main(["demo", "--data", str(tmp_path / "demo"), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert main(["synth", str(tmp_path / "synth")]) == 0
    assert len(list((tmp_path / "synth" / "train").iterdir())) == 3
    assert _digest(tmp_path / "synth") == _digest(tmp_path / "demo")
