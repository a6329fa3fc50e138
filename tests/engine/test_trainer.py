"""The training engine end to end on the session's small synthetic dataset."""
import json

import pytest
import torch

from detkit.cli import main
from detkit.config import dump_yaml
from detkit.engine.trainer import Trainer
from run_configs import tiny_config


def test_resume_after_a_crash_continues_the_same_run(synth_root, tmp_path, monkeypatch):
    straight = Trainer(tiny_config(synth_root, tmp_path / "a", val=False), progress=False)
    straight.train()

    crashing = Trainer(tiny_config(synth_root, tmp_path / "b", val=False), progress=False)
    step = crashing._step
    calls = []

    def crash_on_fifth_step(data_iter):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # killed during iteration 5; the last checkpoint is from iteration 3
        return step(data_iter)

    monkeypatch.setattr(crashing, "_step", crash_on_fifth_step)
    with pytest.raises(KeyboardInterrupt):
        crashing.train()
    assert (tmp_path / "b" / "model_0000003.pth").is_file()

    resumed = Trainer(tiny_config(synth_root, tmp_path / "b", val=False), resume=True, progress=False)
    assert resumed.iteration == 3
    resumed.train()
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    # one line per iteration, none repeated, and the same learning-rate schedule as the straight run (logged
    # losses are medians over a window that restarts on resume, so only the weights are compared exactly)
    assert [x["iteration"] for x in lines] == [x["iteration"] for x in reference] == [1, 2, 3, 4, 5, 6]
    assert [x["lr"] for x in lines] == [x["lr"] for x in reference]


def test_training_learns_and_the_cli_evaluates_and_predicts(synth_root, tmp_path, capsys):
    # train and evaluate on the same 24 images: the model must fit them well above chance within a minute
    cfg = tiny_config(synth_root, tmp_path / "run", max_length=200, steps=[160])
    cfg.data.val = cfg.data.train
    cfg.runtime.checkpoint_period = 1000
    config_path = tmp_path / "tiny.yaml"
    dump_yaml(cfg, config_path)
    assert main(["train", str(config_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in out
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    # an untrained model scores about 0 (its class prior keeps every score near 0.01)
    assert metrics["bbox"]["AP50"] > 0.2 and metrics["bbox"]["AP"] > 0.05, metrics["bbox"]
    assert (tmp_path / "run" / "loss_curve.png").is_file() and (tmp_path / "run" / "tensorboard").is_dir()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if "loss" in x]
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])

    weights = str(tmp_path / "run" / "model_final.pth")
    assert main(["eval", str(config_path), "--weights", weights, "--out", str(tmp_path / "ev"), "--no-plots"]) == 0
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert again["bbox"]["AP"] == pytest.approx(metrics["bbox"]["AP"])

    images = sorted((synth_root / "train").iterdir())[:2]
    assert main(["predict", str(config_path), *map(str, images), "--weights", weights,
                 "--out", str(tmp_path / "pred"), "--score-threshold", "0.2"]) == 0
    pictures = sorted((tmp_path / "pred").glob("*.png"))
    assert [p.stem for p in pictures] == sorted(p.stem for p in images)
    predictions = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert len(predictions) == 2 and all(d["score"] >= 0.2 for p in predictions for d in p["detections"])


def test_a_non_finite_loss_skips_the_step_and_training_goes_on(synth_root, tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(synth_root, tmp_path / "nan", val=False, max_length=4), progress=False)
    forward = trainer.model.forward
    calls = []

    def nan_on_second_call(*args, **kwargs):
        calls.append(1)
        losses = forward(*args, **kwargs)
        if len(calls) == 2:
            losses["loss_cls"] = losses["loss_cls"] * float("nan")
        return losses

    monkeypatch.setattr(trainer.model, "forward", nan_on_second_call)
    before_nan_step = {}

    step = trainer._step

    def snapshot_before_second_step(data_iter):
        if len(calls) == 1:
            before_nan_step.update({k: v.clone() for k, v in trainer.model.state_dict().items()})
        values = step(data_iter)
        if len(calls) == 2:
            assert values == {}  # nothing logged for the skipped step
            for name, param in trainer.model.named_parameters():
                assert torch.equal(param, before_nan_step[name]), name
        return values

    monkeypatch.setattr(trainer, "_step", snapshot_before_second_step)
    trainer.train()
    assert trainer.skipped_steps == 1 and trainer.iteration == 4 and len(calls) == 4
    final = trainer.model.state_dict()
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())
    # the steps after the skipped one moved the weights again
    assert not torch.equal(final["head.cls_logits.weight"], before_nan_step["head.cls_logits.weight"])
    state = torch.load(tmp_path / "nan" / "model_0000004.pth", weights_only=True)  # the last training state
    assert state["skipped_steps"] == 1


def test_demo_generates_data_trains_evaluates_and_draws(tmp_path, monkeypatch, capsys):
    import detkit.cli

    monkeypatch.setattr(detkit.cli, "DEMO_SPLITS", {"train": 6, "val": 3})
    data, out = tmp_path / "data", tmp_path / "demo"
    assert main(["demo", "--data", str(data), "--out", str(out), "--pictures", "2", "--no-progress",
                 "solver.unit=iterations", "solver.max_length=2", "solver.warmup_iters=1", "data.batch_size=2",
                 "data.num_workers=0", "eval.plots=false"]) == 0
    printed = capsys.readouterr().out
    assert "generating the synthetic dataset" in printed
    assert printed.count("Average Precision  (AP) @[") == 6 and printed.count("Average Recall     (AR) @[") == 6
    assert "demo finished in" in printed
    assert len(list((data / "train").iterdir())) == 6 and len(list((data / "val").iterdir())) == 3
    assert (out / "model_final.pth").is_file() and (out / "loss_curve.png").is_file()
    assert len(list((out / "predictions").glob("*.png"))) == 2
    # a second demo reuses the dataset
    assert main(["demo", "--data", str(data), "--out", str(tmp_path / "again"), "--pictures", "0", "--no-progress",
                 "solver.unit=iterations", "solver.max_length=1", "solver.warmup_iters=1", "data.batch_size=2",
                 "data.num_workers=0", "eval.plots=false"]) == 0
    assert "using the synthetic dataset" in capsys.readouterr().out
