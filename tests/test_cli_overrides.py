"""Config overrides are spelled `key=value` and accepted before or after the flags by every command that takes a
config; predict and eval run a detkit checkpoint on the config it stores."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from detkit.cli import UsageError, main, parse_args, shipped_config
from detkit.config import dump_yaml

from test_cli_errors import one_line, tiny_config

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 180


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "detkit", *map(str, args)], capture_output=True, text=True,
                          timeout=TIMEOUT, cwd=cwd, env=env)


# --- one spelling, any position ---------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["train", "c.yaml", "a.b=1", "--no-progress", "c.d=[1, 2]"],
    ["train", "--no-progress", "a.b=1", "c.yaml", "c.d=[1, 2]"],
    ["train", "a.b=1", "c.d=[1, 2]", "--output-dir", "o", "c.yaml", "--no-progress"],
])
def test_train_overrides_before_or_after_the_flags(argv):
    args = parse_args(argv)
    assert args.config == "c.yaml" and args.overrides == ["a.b=1", "c.d=[1, 2]"] and args.no_progress


@pytest.mark.parametrize("argv, resume, overrides", [
    (["train", "c.yaml", "--resume", "a.b=1", "c.d=2"], True, ["a.b=1", "c.d=2"]),  # order kept
    (["train", "--resume", "c.yaml", "a.b=1"], True, ["a.b=1"]),  # ... or the config
    (["train", "c.yaml", "a.b=1", "--resume"], True, ["a.b=1"]),
    (["train", "c.yaml", "--resume", "runs/x/model_0000010.pth", "a.b=1"], "runs/x/model_0000010.pth", ["a.b=1"]),
])
def test_train_resume_takes_an_optional_checkpoint_but_never_an_override(argv, resume, overrides):
    args = parse_args(argv)
    assert args.config == "c.yaml" and args.resume == resume and args.overrides == overrides


@pytest.mark.parametrize("command, extra", [
    ("flops", ["--size", "64", "64"]),
    ("benchmark", ["--iters", "2", "--batch-sizes", "1", "2"]),  # a list option gives back what follows it
    ("check-data", ["--workers", "1"]),
])
def test_config_commands_take_overrides_anywhere(command, extra):
    before = parse_args([command, "c.yaml", "a.b=1", "x.y=z", *extra])
    after = parse_args([command, *extra, "c.yaml", "a.b=1", "x.y=z"])
    mixed = parse_args([command, "a.b=1", *extra, "x.y=z", "c.yaml"])
    for args in (before, after, mixed):
        assert args.config == "c.yaml" and args.overrides == ["a.b=1", "x.y=z"]
    if command == "benchmark":
        assert after.batch_sizes == [1, 2] and after.iters == 2


def test_eval_and_demo_take_overrides_anywhere():
    args = parse_args(["eval", "--weights", "w.pth", "a.b=1", "--out", "d", "--iou-types", "bbox", "segm", "c.d=2"])
    assert args.config is None and args.weights == "w.pth" and args.overrides == ["a.b=1", "c.d=2"]
    assert args.iou_types == ["bbox", "segm"]
    args = parse_args(["eval", "a.b=1", "c.yaml", "--weights", "w.pth"])
    assert args.config == "c.yaml" and args.overrides == ["a.b=1"]
    args = parse_args(["demo", "a.b=1", "--no-progress", "c.d=2", "--pictures", "0"])
    assert args.overrides == ["a.b=1", "c.d=2"] and args.pictures == 0


def test_predict_tells_config_images_and_overrides_apart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x=1.jpg").write_bytes(b"")  # an existing file is an image, even with "=" in its name
    args = parse_args(["predict", "c.yaml", "a.jpg", "folder", "a.b=1", "--weights", "w", "--out", "o", "x=1.jpg",
                       "c.d=2"])
    assert args.config == "c.yaml" and args.images == ["a.jpg", "folder", "x=1.jpg"]
    assert args.overrides == ["a.b=1", "c.d=2"]
    args = parse_args(["predict", "a.jpg", "--weights", "w", "--out", "o", "a.b=1"])
    assert args.config is None and args.images == ["a.jpg"] and args.overrides == ["a.b=1"]
    # the old spelling still works, and its words are sorted the same way
    args = parse_args(["predict", "c.yaml", "--set", "a.b=1", "--weights", "w", "--out", "o", "a.jpg"])
    assert args.images == ["a.jpg"] and args.overrides == ["a.b=1"]
    with pytest.raises(UsageError, match="give the images"):
        parse_args(["predict", "c.yaml", "a.b=1", "--weights", "w", "--out", "o"])
    with pytest.raises(UsageError, match="two configs"):
        parse_args(["predict", "c.yaml", "d.yml", "a.jpg", "--weights", "w", "--out", "o"])


# --- the overrides reach the config, whichever side of the flags they are on -------------------------------------

def test_flops_applies_overrides_on_either_side_of_the_flags(capsys):
    config = str(shipped_config("retinanet-resnet18-fpn-demo.yaml"))
    assert main(["flops", config, "--size", "64", "64", "--num-classes", "8"]) == 0
    plain = capsys.readouterr().out
    assert main(["flops", config, "--size", "64", "64", "model.fpn.out_channels=32", "--num-classes", "8"]) == 0
    after = capsys.readouterr().out
    proc = run_cli("flops", "model.fpn.out_channels=32", "--size", "64", "64", config, "--num-classes", "8")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == after != plain


def test_check_data_applies_overrides_to_its_config(synth_root, tmp_path):
    cfg = tiny_config(tmp_path / "elsewhere", tmp_path / "run")
    dump_yaml(cfg, tmp_path / "c.yaml")
    root = synth_root
    proc = run_cli("check-data", f"data.train.annotations={root}/annotations/instances_train.json", "--workers",
                   "1", f"data.train.images={root}/train", tmp_path / "c.yaml",
                   f"data.val.annotations={root}/annotations/instances_val.json", f"data.val.images={root}/val")
    assert proc.returncode == 0, proc.stderr
    assert "[train]" in proc.stdout and "[val]" in proc.stdout and "result: no problems found" in proc.stdout


@pytest.mark.parametrize("command, extra", [
    ("train", ["--no-progress"]),
    ("benchmark", ["--weights", "{weights}", "--no-train", "--no-inference"]),
    ("eval", ["--weights", "{weights}", "--no-plots"]),
])
def test_overrides_after_the_flags_reach_the_config(trained, tmp_path, command, extra):
    # an override of the dataset path, written last: the command looks for that path
    split = "train" if command == "train" else "val"
    extra = [e.format(weights=trained["weights"]) for e in extra]
    proc = run_cli(command, trained["config"], *extra, f"data.{split}.annotations=overridden.json", cwd=tmp_path)
    assert proc.returncode == 2
    assert f"data.{split}.annotations: no such file overridden.json" in one_line(proc.stderr)


def test_demo_applies_overrides_after_the_flags(synth_root, tmp_path):
    # the dataset is there (no generation); the misspelt override reaches the demo config and stops it
    proc = run_cli("demo", "--data", synth_root, "--out", tmp_path / "demo", "--no-progress", "solver.max_lenght=2")
    assert proc.returncode == 2
    assert "unknown key 'solver.max_lenght'; did you mean 'solver.max_length'?" in one_line(proc.stderr)
    assert not (tmp_path / "demo").exists()


# --- predict and eval on the config a checkpoint stores -----------------------------------------------------------

@pytest.fixture(scope="module")
def trained(synth_root, tmp_path_factory):
    """One training iteration, without a val split: a run's model_final.pth, which stores its resolved config."""
    from detkit.engine.trainer import Trainer

    folder = tmp_path_factory.mktemp("trained")
    cfg = tiny_config(synth_root, folder / "run")
    cfg.data.val.annotations = ""
    cfg.model.backbone.freeze_at = 5  # only the FPN and head train: a short step
    dump_yaml(cfg, folder / "tiny.yaml")
    Trainer(cfg, progress=False).train()
    return {"config": folder / "tiny.yaml", "weights": folder / "run" / "model_final.pth",
            "images": sorted((synth_root / "val").iterdir())[:2]}


def test_predict_needs_no_config_when_the_checkpoint_stores_one(trained, tmp_path):
    image = trained["images"][0]
    proc = run_cli("predict", image, "--weights", trained["weights"], "--out", tmp_path / "pred")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "pred" / f"{image.stem}.png").is_file()
    records = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert [r["file"] for r in records] == [str(image)]
    # overrides apply on top of the stored config: this one builds a model the weights do not fit
    proc = run_cli("predict", image, "--weights", trained["weights"], "--out", tmp_path / "again",
                   "model.fpn.out_channels=16")
    assert proc.returncode == 2
    assert "do not fit the config: neck." in one_line(proc.stderr)


def test_predict_with_a_config_anywhere_and_the_old_set_flag(trained, tmp_path, capsys):
    images = [str(p) for p in trained["images"]]
    assert main(["predict", images[0], "--weights", str(trained["weights"]), str(trained["config"]), images[1],
                 "--out", str(tmp_path / "pred"), "--score-threshold", "0.5", "runtime.fold_bn=false"]) == 0
    assert len(list((tmp_path / "pred").glob("*.png"))) == 2
    capsys.readouterr()
    assert main(["predict", str(trained["config"]), images[0], "--weights", str(trained["weights"]), "--out",
                 str(tmp_path / "set"), "--set", "data.test_transform.short_sizes=[64]"]) == 0
    assert "--set is no longer needed" in capsys.readouterr().err
    assert (tmp_path / "set" / "predictions.json").is_file()


def test_eval_weights_needs_no_config_and_takes_overrides(trained, synth_root, tmp_path, capsys):
    # the stored config has no val split: the error says so, and overrides supply one
    assert main(["eval", "--weights", str(trained["weights"])]) == 2
    assert "data.val.annotations is not set" in one_line(capsys.readouterr().err)
    proc = run_cli("eval", "--weights", trained["weights"], "--out", tmp_path / "ev", "--no-plots",
                   f"data.val.annotations={synth_root}/annotations/instances_val.json",
                   f"data.val.images={synth_root}/val")
    assert proc.returncode == 0, proc.stderr
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in proc.stdout
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert 0.0 <= metrics["bbox"]["AP"] <= 1.0


def test_a_stored_config_that_no_longer_validates_says_where_it_came_from(trained, tmp_path, capsys):
    import torch

    state = torch.load(trained["weights"], weights_only=True)
    state["config"]["solver"]["base_lrr"] = 0.1  # a key this detkit does not know
    torch.save(state, tmp_path / "old.pth")
    assert main(["predict", str(trained["images"][0]), "--weights", str(tmp_path / "old.pth"), "--out",
                 str(tmp_path / "o")]) == 2
    line = one_line(capsys.readouterr().err)
    assert f"the config stored in {tmp_path / 'old.pth'}: unknown key 'solver.base_lrr'" in line
