"""Runs that survive what goes wrong: damaged checkpoints, changed configs or data, divergence, full disks,
stop signals and files that would run code."""
import errno
import json
import logging
import os
import signal

import pytest
import torch

from detkit.cli import main
from detkit.config import dump_yaml
from detkit.engine.divergence import DivergenceError
from detkit.engine.trainer import ResumeMismatchError, Trainer
from run_configs import damage_file, fast_config

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(autouse=True)
def _quiet_frozen_trunk_warning(caplog):
    caplog.set_level(logging.INFO)


@pytest.fixture(scope="module")
def straight_run(synth_root, tmp_path_factory):
    """An uninterrupted 8-iteration run: what every interrupted and resumed run must equal bit for bit."""
    trainer = Trainer(fast_config(synth_root, tmp_path_factory.mktemp("straight")), progress=False)
    trainer.train()
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}, trainer.out


def _interrupt_after(trainer, monkeypatch, iterations):
    step = trainer._step

    def crash(data_iter):
        if trainer.iteration == iterations:
            raise KeyboardInterrupt
        return step(data_iter)

    monkeypatch.setattr(trainer, "_step", crash)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()


def _assert_same_weights(expected, model):
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[name]), name


@pytest.mark.parametrize("how", ["truncated", "zero", "bitflip"])
def test_a_damaged_latest_checkpoint_falls_back_and_stays_bit_identical(synth_root, tmp_path, monkeypatch, caplog,
                                                                         straight_run, how):
    cfg = fast_config(synth_root, tmp_path)
    _interrupt_after(Trainer(cfg, progress=False), monkeypatch, 6)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000006.pth"
    damage_file(tmp_path / "model_0000006.pth", how)
    monkeypatch.undo()
    resumed = Trainer(cfg, resume=True, progress=False)
    assert resumed.iteration == 4
    assert any("cannot resume from model_0000006.pth" in r.getMessage() and "falling back to model_0000004.pth"
               in r.getMessage() for r in caplog.records)
    resumed.train()
    _assert_same_weights(straight_run[0], resumed.model)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == list(range(1, 9))


def test_checkpoint_records_data_position_dataset_and_version(straight_run):
    from detkit import __version__

    state = torch.load(straight_run[1] / "model_0000006.pth", weights_only=True)
    assert state["data"] == {"scheme": 2, "seed": 0, "step_batch": 4, "steps_consumed": 6}
    assert state["dataset"]["images"] == 24 and len(state["dataset"]["fingerprint"]) == 64
    assert state["detkit_version"] == __version__ and state["world_size"] == 1
    assert state["rollbacks"] == 0 and state["lr_scale"] == 1.0 and state["iteration"] == 6
    assert state["bad_streak"] == 0 and state["unreadable_images"] == []


def test_resume_refuses_a_changed_config_and_names_the_keys(synth_root, tmp_path, caplog):
    Trainer(fast_config(synth_root, tmp_path), progress=False).save()
    changed = fast_config(synth_root, tmp_path, base_lr=0.01, steps=[5])
    with pytest.raises(ResumeMismatchError) as error:
        Trainer(changed, resume=True, progress=False)
    message = str(error.value)
    assert "solver.base_lr: 0.02 in the checkpoint, 0.01 now" in message
    assert "solver.steps: [6] in the checkpoint, [5] now" in message and "--allow-changes" in message
    Trainer(changed, resume=True, progress=False, allow_changes=True)
    assert any("--allow-changes" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    # what does not change the computation may change freely
    harmless = fast_config(synth_root, tmp_path)
    harmless.runtime.log_period, harmless.data.num_workers, harmless.runtime.keep_checkpoints = 5, 2, 7
    assert Trainer(harmless, resume=True, progress=False).iteration == 0


def test_resume_refuses_a_changed_dataset(synth_root, tmp_path):
    Trainer(fast_config(synth_root, tmp_path / "run"), progress=False).save()
    data = json.loads((synth_root / "annotations/instances_train.json").read_text())
    dropped = data["images"].pop()
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != dropped["id"]]
    (tmp_path / "fewer.json").write_text(json.dumps(data))
    cfg = fast_config(synth_root, tmp_path / "run")
    cfg.data.train.annotations = str(tmp_path / "fewer.json")
    with pytest.raises(ResumeMismatchError, match=r"training set differs.*23 images.*now; 24 images"):
        Trainer(cfg, resume=True, progress=False)


def _nan_from(trainer, monkeypatch, bad_iterations):
    """Make the forward of the given iterations (1-based, counting replays after a rollback) return NaN."""
    forward = trainer.model.forward
    calls = []

    def forward_with_nan(*args, **kwargs):
        calls.append(1)
        losses = forward(*args, **kwargs)
        if bad_iterations(len(calls)):
            losses["loss_cls"] = losses["loss_cls"] * float("nan")
        return losses

    monkeypatch.setattr(trainer.model, "forward", forward_with_nan)
    return calls


def test_consecutive_bad_steps_roll_back_with_a_lower_learning_rate(synth_root, tmp_path, monkeypatch, caplog):
    cfg = fast_config(synth_root, tmp_path)
    cfg.solver.divergence.max_bad_steps, cfg.solver.divergence.lr_factor = 2, 0.5
    trainer = Trainer(cfg, progress=False)
    calls = _nan_from(trainer, monkeypatch, lambda call: call in (5, 6))
    trainer.train()
    # iterations 5 and 6 diverge: back to iteration 4, then 5..8 again with half the learning rate
    assert len(calls) == 10 and trainer.iteration == 8 and trainer.guard.rollbacks == 1
    assert any("rolled back to model_0000004.pth (iteration 4), learning rate x0.5 (rollback 1 of 3)"
               in r.getMessage() for r in caplog.records)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == list(range(1, 9))
    from detkit.engine.schedule import lr_factor

    base = trainer._base_lrs[0]
    for x in lines[4:]:  # the logged lr is the group's after the step: the schedule's value at `iteration`
        expected = 0.5 * base * lr_factor(x["iteration"], max_iter=8, schedule="step", steps=(6,), gamma=0.1,
                                          warmup_iters=2, warmup_factor=cfg.solver.warmup_factor)
        assert x["lr"] == pytest.approx(expected, rel=1e-12), x
    state = torch.load(tmp_path / "model_0000008.pth", weights_only=True)  # the last training state
    assert state["lr_scale"] == 0.5 and state["rollbacks"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_a_run_that_keeps_diverging_stops_with_an_explanation(synth_root, tmp_path, monkeypatch):
    cfg = fast_config(synth_root, tmp_path)
    cfg.solver.divergence.max_bad_steps, cfg.solver.divergence.max_rollbacks = 2, 2
    trainer = Trainer(cfg, progress=False)
    _nan_from(trainer, monkeypatch, lambda call: call >= 3)
    with pytest.raises(DivergenceError, match="after 2 rollbacks"):
        trainer.train()
    for path in tmp_path.glob("model_*.pth"):
        state = torch.load(path, weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point()), path


def test_divergence_before_the_first_checkpoint_says_what_to_do(synth_root, tmp_path, monkeypatch, capsys):
    from detkit.modeling.detectors.retinanet import RetinaNet

    forward = RetinaNet.forward

    def always_nan(self, *args, **kwargs):
        losses = forward(self, *args, **kwargs)
        if self.training:
            losses["loss_cls"] = losses["loss_cls"] * float("nan")
        return losses

    monkeypatch.setattr(RetinaNet, "forward", always_nan)
    cfg = fast_config(synth_root, tmp_path / "run")
    cfg.runtime.checkpoint_period = 100
    cfg.solver.divergence.max_bad_steps = 2
    dump_yaml(cfg, tmp_path / "cfg.yaml")
    assert main(["train", str(tmp_path / "cfg.yaml"), "--no-progress"]) == 3
    assert "before its first usable checkpoint" in capsys.readouterr().err


def test_non_finite_weights_are_never_saved(synth_root, tmp_path, monkeypatch, caplog):
    cfg = fast_config(synth_root, tmp_path)
    trainer = Trainer(cfg, progress=False)
    step = trainer._step

    def poison_before_the_save_at_4(data_iter):
        values = step(data_iter)
        if trainer.iteration == 3 and not trainer.guard.rollbacks:  # iteration 4 is being stepped
            with torch.no_grad():
                trainer.model.head.cls_logits.weight[0, 0, 0, 0] = float("nan")
        return values

    monkeypatch.setattr(trainer, "_step", poison_before_the_save_at_4)
    trainer.train()
    assert any("refusing to save model_0000004.pth: non-finite values in model.head.cls_logits.weight"
               in r.getMessage() for r in caplog.records)
    assert trainer.guard.rollbacks == 1 and trainer.iteration == 8
    for path in tmp_path.glob("model_*.pth"):
        state = torch.load(path, weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point()), path


def test_a_full_disk_at_a_periodic_save_is_survived(synth_root, tmp_path, monkeypatch, caplog, straight_run):
    import detkit.engine.trainer as trainer_module

    real_save = trainer_module.save_checkpoint
    calls = []

    def full_once(path, *args, **kwargs):
        calls.append(path.name)
        if path.name == "model_0000004.pth":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "save_checkpoint", full_once)
    trainer = Trainer(fast_config(synth_root, tmp_path), progress=False)
    trainer.train()
    assert calls == ["model_0000002.pth", "model_0000004.pth", "model_0000006.pth", "model_0000008.pth",
                     "model_final.pth"]
    assert any("cannot write a checkpoint (No space left on device); the previous one is intact"
               in r.getMessage() for r in caplog.records)
    _assert_same_weights(straight_run[0], trainer.model)


def test_sigusr1_saves_and_stops_in_process(synth_root, tmp_path, monkeypatch, straight_run):
    cfg = fast_config(synth_root, tmp_path)
    trainer = Trainer(cfg, progress=False)
    step = trainer._step
    handlers = []

    def signal_during_iteration_3(data_iter):
        if trainer.iteration == 2:
            handler = signal.getsignal(signal.SIGUSR1)
            handlers.append(handler)
            # only send it once detkit handles it: a missing handler would kill the test process
            assert getattr(handler, "__self__", None).__class__.__name__ == "StopRequest"
            os.kill(os.getpid(), signal.SIGUSR1)
        return step(data_iter)

    monkeypatch.setattr(trainer, "_step", signal_during_iteration_3)
    result = trainer.train()
    assert result == {"stopped": "SIGUSR1", "iteration": 3, "checkpoint": str(tmp_path / "model_0000003.pth")}
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # restored
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000003.pth"
    monkeypatch.undo()
    resumed = Trainer(cfg, resume=True, progress=False)
    assert resumed.iteration == 3
    resumed.train()
    _assert_same_weights(straight_run[0], resumed.model)


@pytest.mark.parametrize("where", ["resume", "eval-weights", "model-weights", "backbone-weights"])
def test_the_cli_refuses_pickled_code_everywhere(synth_root, tmp_path, capsys, where):
    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    evil = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": Payload()}, evil)
    cfg = fast_config(synth_root, tmp_path / "run", val=True)
    dump_yaml(cfg, tmp_path / "cfg.yaml")
    args = {"resume": ["train", str(tmp_path / "cfg.yaml"), "--resume", str(evil), "--no-progress"],
            "eval-weights": ["eval", str(tmp_path / "cfg.yaml"), "--weights", str(evil), "--no-plots"],
            "model-weights": ["train", str(tmp_path / "cfg.yaml"), f"model.weights={evil}", "--no-progress"],
            "backbone-weights": ["train", str(tmp_path / "cfg.yaml"), f"model.backbone.weights={evil}",
                                 "--no-progress"]}[where]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "refuses to execute" in err or "will not execute" in err, err
    assert not marker.exists() and not (tmp_path / "run" / "model_final.pth").exists()


def test_a_stored_config_is_data_not_code(synth_root, tmp_path):
    trainer = Trainer(fast_config(synth_root, tmp_path), progress=False)
    trainer.cfg.name = "!!python/object/apply:os.system ['touch code_ran']"
    trainer.save()
    resumed = Trainer(fast_config(synth_root, tmp_path), resume=True, progress=False)  # `name` may change
    assert resumed.iteration == 0 and not (tmp_path / "code_ran").exists() and not os.path.exists("code_ran")


def test_classify_step_and_guard_counting():
    from detkit.config.schema import DivergenceConfig
    from detkit.engine.divergence import DivergenceGuard, classify_step

    assert classify_step(True, True, fp16=False) == "ok"
    assert classify_step(True, False, fp16=True) == "overflow"  # the loss scaler's business, not divergence
    assert classify_step(True, False, fp16=False) == "bad"
    assert classify_step(False, True, fp16=True) == "bad"
    guard = DivergenceGuard(DivergenceConfig(max_bad_steps=2, max_rollbacks=1, lr_factor=0.5))
    assert [guard.update(k) for k in ["bad", "ok", "bad", "overflow", "bad"]] == ["skip", "ok", "skip", "skip",
                                                                                  "rollback"]
    assert guard.rolled_back() == 0.5 and guard.consecutive == 0
    assert [guard.update("bad"), guard.update("bad")] == ["skip", "stop"]
    assert DivergenceGuard(DivergenceConfig(max_bad_steps=0)).update("bad") == "skip"  # 0: skip only, forever


def test_the_dataset_fingerprint_ignores_paths_but_not_content(synth_root, tmp_path):
    import shutil

    from detkit.data.coco import CocoDataset
    from detkit.data.fingerprint import dataset_fingerprint

    annotations = synth_root / "annotations/instances_train.json"
    moved = tmp_path / "elsewhere.json"
    shutil.copy(annotations, moved)
    a = dataset_fingerprint(CocoDataset.load(annotations, synth_root / "train"), filter_empty=True)
    b = dataset_fingerprint(CocoDataset.load(moved, tmp_path / "images"), filter_empty=True)
    assert a == b and a["images"] == 24
    assert dataset_fingerprint(CocoDataset.load(moved, tmp_path), filter_empty=False) != a  # reader options count
    data = json.loads(moved.read_text())
    data["annotations"][0]["bbox"][0] += 1
    moved.write_text(json.dumps(data))
    assert dataset_fingerprint(CocoDataset.load(moved, tmp_path), filter_empty=True)["fingerprint"] \
        != a["fingerprint"]


def test_a_signal_after_the_steps_agreement_stops_at_the_next_step(synth_root, tmp_path, monkeypatch):
    """Every rank stops at the step whose all-reduce carried the signal: one arriving later (here during the
    optimiser update of iteration 3) is carried by iteration 4's."""
    trainer = Trainer(fast_config(synth_root, tmp_path), progress=False)
    optimizer_step = trainer.optimizer.step

    def step_then_signal(*args, **kwargs):
        result = optimizer_step(*args, **kwargs)
        if trainer.iteration == 2:  # inside iteration 3, after its all-reduce
            handler = signal.getsignal(signal.SIGTERM)
            assert getattr(handler, "__self__", None).__class__.__name__ == "StopRequest"  # or pytest would die
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(trainer.optimizer, "step", step_then_signal)
    assert trainer.train()["iteration"] == 4


def test_resume_followed_by_an_override_resumes_the_run_folder(synth_root, tmp_path, capsys):
    cfg = fast_config(synth_root, tmp_path / "run")
    cfg.solver.max_length = 2
    dump_yaml(cfg, tmp_path / "cfg.yaml")
    Trainer(cfg, progress=False).save()
    assert main(["train", str(tmp_path / "cfg.yaml"), "--resume", "runtime.log_period=2", "--no-progress"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == [2]  # the override applied: one line per 2 iterations
