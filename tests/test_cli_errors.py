"""Every error a user can cause ends the command with one line on stderr, a non-zero status and no traceback;
--debug shows the traceback, an unexpected exception names its type, Ctrl-C prints `interrupted`."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import detkit.cli
from detkit.cli import main
from detkit.config import Config, dump_yaml, from_dict, to_dict

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 180  # a hang fails the test instead of the suite


def tiny_config(root: Path, out: Path, **data) -> Config:
    """A RetinaNet R18-FPN with a 32-wide head on ~100 px images of `root` (a `detkit synth` folder)."""
    return from_dict(Config, {
        "model": {"backbone": {"depth": 18, "norm": "BN", "freeze_at": 0}, "fpn": {"out_channels": 32, "max_level": 6},
                  "anchors": {"base_size": 16}, "retinanet": {"head_width": 32, "num_convs": 2, "head_norm": "BN"}},
        "data": {"train": {"annotations": str(root / "annotations/instances_train.json"), "images": str(root / "train")},
                 "val": {"annotations": str(root / "annotations/instances_val.json"), "images": str(root / "val")},
                 "train_transform": {"short_sizes": [96], "max_size": 128},
                 "test_transform": {"short_sizes": [96], "max_size": 128}, "batch_size": 2, "num_workers": 0, **data},
        "solver": {"unit": "iterations", "max_length": 1, "warmup_iters": 1, "steps": [100]},
        "runtime": {"output_dir": str(out), "device": "cpu"}, "eval": {"plots": False}})


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    """The real console entry point, `python -m detkit ARGS`, in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "detkit", *map(str, args)], capture_output=True, text=True,
                          timeout=TIMEOUT, cwd=cwd, env=env)


def one_line(stderr: str) -> str:
    """The single line a failed command prints on stderr (fails when there are more, or a traceback)."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def assert_fails(proc: subprocess.CompletedProcess, status: int, *phrases: str) -> str:
    assert proc.returncode == status, (proc.returncode, proc.stderr)
    line = one_line(proc.stderr)
    for phrase in phrases:
        assert phrase in line, line
    return line


def main_fails(capsys, argv: list[str], status: int, *phrases: str) -> str:
    """`detkit.cli.main(argv)` in this process: its status and one stderr line with `phrases`."""
    assert main([str(a) for a in argv]) == status
    line = one_line(capsys.readouterr().err)
    for phrase in phrases:
        assert phrase in line, line
    return line


@pytest.fixture(scope="module")
def setup(synth_root, tmp_path_factory):
    """A config on the session's dataset and detkit checkpoints for it, built without training: `weights` (model,
    config and classes, as a run's model_final.pth), `plain` (a bare state dict)."""
    from detkit.data.coco import load_json
    from detkit.modeling.build import build_model

    folder = tmp_path_factory.mktemp("cli_errors")
    cfg = tiny_config(synth_root, folder / "run")
    config = folder / "tiny.yaml"
    dump_yaml(cfg, config)
    categories = [{"id": c["id"], "name": c["name"]}
                  for c in sorted(load_json(cfg.data.val.annotations)["categories"], key=lambda c: c["id"])]
    torch.manual_seed(0)
    model = build_model(cfg.model, len(categories))
    weights, plain = folder / "model_final.pth", folder / "plain.pth"
    torch.save({"model": model.state_dict(), "config": to_dict(cfg), "categories": categories}, weights)
    torch.save(model.state_dict(), plain)
    return {"root": synth_root, "folder": folder, "config": config, "weights": weights, "plain": plain,
            "image": sorted((synth_root / "val").iterdir())[0]}


# --- a missing dataset: the path, the rule for relative paths, the commands that make one; no run folder --------

def test_train_with_a_missing_dataset_says_how_to_make_one_and_leaves_no_run_folder(setup, tmp_path):
    out = tmp_path / "runs" / "new"
    proc = run_cli("train", setup["config"], "--no-progress", "data.train.annotations=nowhere/instances.json",
                   f"runtime.output_dir={out}", cwd=tmp_path)
    line = assert_fails(proc, 2, "data.train.annotations", "nowhere/instances.json", "`detkit synth DIR`",
                        "`detkit demo`", f"looked in {tmp_path}", "read from the current directory")
    assert line.startswith("error: ")
    assert not (tmp_path / "runs").exists()


def test_train_with_a_missing_image_folder_names_it(setup, tmp_path, capsys):
    main_fails(capsys, ["train", setup["config"], "data.train.images=no_such_folder", "--output-dir",
                        tmp_path / "run"], 2, "data.train.images: no such folder no_such_folder", "detkit synth DIR")
    assert not (tmp_path / "run").exists()


def test_train_that_fails_after_starting_removes_the_empty_run_folder(setup, tmp_path, capsys):
    # the dataset is there, but the config asks for 5 classes of its 8: the Trainer made the folder, then failed
    line = main_fails(capsys, ["train", setup["config"], "model.num_classes=5", "--no-progress", "--output-dir",
                               tmp_path / "a" / "run"], 2, "model.num_classes is 5")
    assert line.startswith("config error: ")
    assert not (tmp_path / "a").exists()


def test_eval_with_a_missing_val_split(setup, tmp_path):
    proc = run_cli("eval", setup["config"], "--weights", setup["weights"], "data.val.annotations=val.json",
                   cwd=tmp_path)
    assert_fails(proc, 2, "data.val.annotations: no such file val.json", "detkit synth DIR", "detkit demo")


def test_benchmark_with_weights_and_a_missing_val_split(setup, tmp_path):
    proc = run_cli("benchmark", setup["config"], "--weights", setup["weights"], "--no-train", "--no-inference",
                   "data.val.images=missing_val_images", cwd=tmp_path)
    assert_fails(proc, 2, "data.val.images: no such folder missing_val_images", "detkit synth DIR")


def test_check_data_with_a_missing_dataset(setup, tmp_path, capsys):
    proc = run_cli("check-data", tmp_path / "instances_val.json", "--images", tmp_path)
    assert_fails(proc, 2, "no such annotations file", "instances_val.json", "detkit synth DIR", "detkit demo")
    main_fails(capsys, ["check-data", setup["config"], "data.val.annotations=gone.json"], 2,
               "data.val.annotations: no such file gone.json", "detkit synth DIR")


# --- configs, overrides, files ----------------------------------------------------------------------------------

def test_config_errors(setup, tmp_path, capsys):
    proc = run_cli("flops", setup["config"], "solver.base_lrr=0.1")
    assert_fails(proc, 2, "config error: unknown key 'solver.base_lrr'; did you mean 'solver.base_lr'?")
    main_fails(capsys, ["flops", setup["config"], "data.batch_size=abc"], 2,
               "data.batch_size: expected an integer, got str 'abc'")
    main_fails(capsys, ["flops", tmp_path / "absent.yaml"], 2, "config file not found", "absent.yaml")
    (tmp_path / "broken.yaml").write_text("model: [1,\nsolver: {}\n")
    main_fails(capsys, ["flops", tmp_path / "broken.yaml"], 2, "broken.yaml: not valid YAML", "line")


@pytest.mark.parametrize("override, phrase", [
    ("solver.base_lr", "unexpected argument 'solver.base_lr' (an override is key=value"),
    ("=0.1", "unexpected argument '=0.1' (an override is key=value"),
    ("solver.base_lr=[1,", "override 'solver.base_lr=[1,': the value is not valid YAML"),
])
def test_bad_override_syntax(setup, capsys, override, phrase):
    main_fails(capsys, ["flops", setup["config"], override], 2, phrase)


def test_bad_weights(setup, tmp_path, capsys):
    proc = run_cli("predict", setup["image"], "--weights", tmp_path / "absent.pth", "--out", tmp_path / "out")
    assert_fails(proc, 2, "weights file", "absent.pth does not exist")
    (tmp_path / "text.pth").write_text("not weights\n")
    main_fails(capsys, ["eval", "--weights", tmp_path / "text.pth"], 2, "text.pth is not a weights file")
    data = setup["weights"].read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 3])
    main_fails(capsys, ["predict", setup["config"], setup["image"], "--weights", tmp_path / "cut.pth", "--out",
                        tmp_path / "out"], 2, "cut.pth is corrupt or truncated")
    # a bare state dict holds no config: say which command line works instead
    main_fails(capsys, ["predict", setup["image"], "--weights", setup["plain"], "--out", tmp_path / "out"], 2,
               "plain.pth holds no config", "detkit predict CONFIG")


def test_a_pickle_that_would_run_code_is_refused(setup, tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"model": {}, "config": Payload()}, tmp_path / "evil.pth")
    main_fails(capsys, ["predict", setup["image"], "--weights", tmp_path / "evil.pth", "--out", tmp_path / "o"], 2,
               "evil.pth contains Python objects")
    assert not (tmp_path / "pwned").exists()


def test_weights_that_do_not_fit_the_config_give_one_line(setup, tmp_path, capsys):
    proc = run_cli("predict", setup["config"], setup["image"], "--weights", setup["weights"], "--out", tmp_path / "o",
                   "model.retinanet.head_width=16")
    line = assert_fails(proc, 2, "do not fit the config: head.cls_convs.0.weight is (32, 32, 3, 3) in the weights "
                                 "and (16, 32, 3, 3) in the model built from the config (model.retinanet?)",
                        "more tensors differ")
    assert "model.weights" not in line and "loaded" not in line  # no dump of the load report
    # a class count that differs: the classifier is named, with the likely cause
    main_fails(capsys, ["eval", "--weights", setup["plain"], setup["config"], "model.label_space=coco91"], 2,
               "head.cls_logits.weight is (72, 32, 3, 3) in the weights and (819, 32, 3, 3) in the model",
               "(num_classes?)")
    main_fails(capsys, ["predict", setup["image"], "--weights", setup["weights"], "--out", tmp_path / "o",
                        "model.num_classes=5"], 2, "trained on 8 categories", "model.num_classes: 5")
    # another detector altogether: the first part the weights lack
    main_fails(capsys, ["predict", setup["image"], "--weights", setup["weights"], "--out", tmp_path / "o",
                        "model.arch=faster_rcnn", "model.fpn.min_level=2"], 2,
               "the weights have head, which the model built from the config lacks; the model built from the config "
               "has rpn, stages, which the weights lack (model.arch?)")


def test_unreadable_image_lists(setup, tmp_path, capsys):
    proc = run_cli("predict", tmp_path / "nope.jpg", "--weights", setup["weights"], "--out", tmp_path / "o")
    assert_fails(proc, 2, "no such image or folder", "nope.jpg")
    (tmp_path / "empty").mkdir()
    main_fails(capsys, ["predict", tmp_path / "empty", "--weights", setup["weights"], "--out", tmp_path / "o"], 2,
               "no images in the folder", "empty")
    (tmp_path / "text.jpg").write_text("not a picture")
    assert main(["predict", str(tmp_path / "text.jpg"), "--weights", str(setup["weights"]), "--out",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "skipping" in err
    assert err.strip().splitlines()[-1].startswith("error: no image could be read (1 given")


@pytest.mark.parametrize("argv, phrase", [
    (["train", "{config}", "--gpus", "x"], "argument --gpus: invalid int value: 'x' (see `detkit train --help`)"),
    (["train", "{config}", "--gpus", "0"], "--gpus must be >= 1"),
    (["predict", "{image}", "--weights", "{weights}", "--out", "{tmp}", "--score-threshold", "2"],
     "--score-threshold must be in [0, 1]"),
    (["predict", "{image}", "--weights", "{weights}"], "the following arguments are required: --out"),
    (["eval", "--weights", "{weights}", "--iou-types", "box"], "argument --iou-types: invalid choice: 'box'"),
    (["eval", "{config}", "--weights", "{weights}", "--results", "r.json"], "give one or the other"),
    (["eval", "--gt", "{tmp}/gt.json", "--results", "{tmp}/r.json"], "--gt: no such file"),
    (["benchmark", "{config}", "--iters", "0"], "--iters must be >= 1"),
    (["benchmark", "{config}", "--batch-sizes", "1", "two"], "argument --batch-sizes: invalid int value: 'two'"),
    (["check-data", "{config}", "--max-pixels", "0"], "--max-pixels must be >= 1"),
    (["synth", "{tmp}/s", "--train", "-1"], "--train must be >= 0"),
    (["flops", "{config}", "--size", "0", "5"], "the input size must be positive"),
    (["flops", "{config}", "extra.txt"], "unexpected argument 'extra.txt'"),
    (["demo", "not-an-override"], "unexpected argument 'not-an-override'"),
    (["nosuch"], "invalid choice: 'nosuch'"),
    (["--bogus", "flops", "{config}"], "unrecognized arguments: --bogus"),
    (["train", "{config}", "--resume", "{tmp}/absent.pth"], "--resume: no such checkpoint"),
    (["train", "{config}", "runtime.device=cuda:x"], "runtime.device: 'cuda:x' is not a device"),
])
def test_invalid_flag_values(setup, tmp_path, capsys, argv, phrase):
    values = {"config": setup["config"], "image": setup["image"], "weights": setup["weights"], "tmp": tmp_path}
    main_fails(capsys, [a.format(**values) for a in argv], 2, phrase)


# --- per command, the console entry point in a subprocess -----------------------------------------------------

@pytest.mark.parametrize("argv, phrase", [
    (["demo", "--data", "{root}", "--out", "{tmp}/demo", "solver.base_lrr=1"], "did you mean 'solver.base_lr'"),
    (["synth", "{tmp}/s", "--min-size", "64", "--max-size", "32"], "--max-size (32) must be >= --min-size (64)"),
    (["zoo-table", "{tmp}/no_records", "--out", "{tmp}/zoo.md"], "no_records"),
    (["flops", "{tmp}/absent.yaml"], "config file not found"),
])
def test_other_commands_fail_in_one_line(setup, tmp_path, argv, phrase):
    values = {"root": setup["root"], "tmp": tmp_path}
    proc = run_cli(*[a.format(**values) for a in argv])
    assert_fails(proc, 2, phrase)
    assert not (tmp_path / "demo").exists()


# --- --debug, unexpected exceptions, Ctrl-C ---------------------------------------------------------------------

@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(setup, tmp_path, where):
    argv = ["train", setup["config"], "data.train.annotations=nowhere.json"]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    proc = run_cli(*argv, cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "DatasetError: data.train.annotations: no such file" in proc.stderr


def test_an_unexpected_exception_is_one_line_naming_its_type(setup, monkeypatch, capsys):
    def boom(args):
        raise RuntimeError("the flux capacitor\nis broken")

    monkeypatch.setattr(detkit.cli, "cmd_flops", boom)
    assert main(["flops", str(setup["config"])]) == 1
    assert one_line(capsys.readouterr().err) == \
        "error: RuntimeError: the flux capacitor (run with --debug for the traceback)"
    with pytest.raises(RuntimeError, match="flux capacitor"):
        main(["flops", str(setup["config"]), "--debug"])


def test_keyboard_interrupt_prints_interrupted_and_exits_130(setup, monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(detkit.cli, "cmd_flops", interrupted)
    assert main(["flops", str(setup["config"])]) == 130
    assert one_line(capsys.readouterr().err) == "interrupted"


def test_ctrl_c_in_a_real_process(setup):
    # the command sends itself SIGINT, as a terminal's Ctrl-C does, and waits to be interrupted
    script = ("import os, signal, sys, time\n"
              "import detkit.cli\n"
              "def wait(args):\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "    time.sleep(60)\n"
              "detkit.cli.cmd_flops = wait\n"
              f"sys.exit(detkit.cli.main(['flops', {str(setup['config'])!r}]))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=TIMEOUT,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 130
    assert one_line(proc.stderr) == "interrupted"


def test_a_results_file_that_is_not_json(setup, tmp_path, capsys):
    (tmp_path / "r.json").write_text("{not json")
    gt = setup["root"] / "annotations" / "instances_val.json"
    main_fails(capsys, ["eval", "--gt", gt, "--results", tmp_path / "r.json", "--out", tmp_path / "ev"], 2,
               "r.json: not valid JSON")
    assert not (tmp_path / "ev").exists()
