"""Every command exits: the real console script, in a subprocess, with a val split and two DataLoader workers,
must be gone within LINGER_S of its last output line, and its worker processes with it.

Persistent DataLoader workers ignore SIGTERM (`seed_worker`), so a loader still holding them at interpreter exit
made multiprocessing's exit handler wait forever: `detkit train` printed its last line and hung. In-process tests
cannot see that, so every test here runs `python -m detkit` (or the installed `detkit` script) and times the gap
between the last line and the exit. Whether a loader is still alive at exit can depend on when the cyclic garbage
collector last ran, so the runs go without it (`without_cyclic_gc`), as the end of a long run often is; one
training run keeps it. Signals and launchers (SIGTERM, SIGINT, SIGKILL, coreutils `timeout`, torchrun) are covered
the same way. Each run is at most a few seconds of training on the session's synthetic dataset
(tests/conftest.py `synth_root`).
"""
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from exit_helpers import (GONE_S, Watched, assert_exits_promptly, detkit_module, detkit_script, wait_gone,
                          without_cyclic_gc)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads child processes from /proc")

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "retinanet-resnet18-fpn-demo.yaml"
PROMPT_S = 30.0  # from a stop signal to the exit: one training step, a checkpoint save and the shutdown
ITERATION = r"iteration \d+/\d+: loss"  # the training log line (with --no-progress and runtime.log_period=1)


def data_overrides(root: Path) -> list[str]:
    """The demo config on the tiny synthetic dataset: a val split, two workers, small batches and images."""
    return [f"data.train.annotations={root}/annotations/instances_train.json", f"data.train.images={root}/train",
            f"data.val.annotations={root}/annotations/instances_val.json", f"data.val.images={root}/val",
            "data.num_workers=2", "data.batch_size=2", "data.test_batch_size=2",
            "data.train_transform.short_sizes=[96]", "data.train_transform.max_size=160",
            "data.test_transform.short_sizes=[96]", "data.test_transform.max_size=160"]


def train_args(root: Path, out: Path, iterations: int = 2, *overrides: str) -> list[str]:
    """`train CONFIG overrides` for `iterations` steps into `out`, a log line every step, no progress bar."""
    return ["train", str(CONFIG), *data_overrides(root), "solver.unit=iterations",
            f"solver.max_length={iterations}", "solver.warmup_iters=1", "runtime.log_period=1",
            "runtime.checkpoint_period=1000", *overrides, "--output-dir", str(out), "--no-progress"]


@pytest.fixture(scope="module")
def no_gc(tmp_path_factory):
    """The environment of every run here but one: Python without its cyclic garbage collector."""
    return without_cyclic_gc(tmp_path_factory.mktemp("no_gc_site"))


@pytest.fixture(scope="module")
def trained(synth_root, no_gc, tmp_path_factory):
    """A finished `python -m detkit train` (2 iterations, then evaluation on the val split): (run, run folder)."""
    work = tmp_path_factory.mktemp("exits_train")
    with Watched([*detkit_module(), *train_args(synth_root, work / "run")], cwd=work, env=no_gc) as run:
        run.finish()
    return run, work / "run"


@pytest.fixture
def weights(trained):
    path = trained[1] / "model_final.pth"
    assert path.is_file(), trained[0].output()
    return path


def _assert_trained_and_exited(run: Watched, out: Path) -> None:
    assert_exits_promptly(run)
    assert any("outputs in" in line.text for line in run.lines), run.output()
    assert (out / "model_final.pth").is_file() and (out / "eval").is_dir()
    assert len(run.descendants) >= 2, f"no DataLoader workers seen: {run.descendants}"  # the test tests workers


def test_train_with_a_val_split_exits_after_its_last_line(trained):
    _assert_trained_and_exited(*trained)


def test_train_exits_with_the_garbage_collector_on(synth_root, tmp_path):
    with Watched([*detkit_module(), *train_args(synth_root, tmp_path / "run")], cwd=tmp_path) as run:
        _assert_trained_and_exited(run, tmp_path / "run")


def test_eval_with_weights_exits(synth_root, weights, no_gc, tmp_path):
    command = [*detkit_module(), "eval", str(CONFIG), *data_overrides(synth_root), "--weights", str(weights),
               "--out", str(tmp_path / "eval")]
    with Watched(command, cwd=tmp_path, env=no_gc) as run:
        assert_exits_promptly(run)
    assert (tmp_path / "eval" / "metrics.json").is_file()
    assert len(run.descendants) >= 2, f"no DataLoader workers seen: {run.descendants}"


def test_benchmark_with_weights_exits(synth_root, weights, no_gc, tmp_path):
    # --weights: AP on the val split, through the evaluation loader and its workers
    command = [*detkit_module(), "benchmark", str(CONFIG), *data_overrides(synth_root),
               f"runtime.output_dir={tmp_path}", "--weights", str(weights), "--device", "cpu", "--iters", "1",
               "--warmup", "0", "--batch-sizes", "1", "--train-batch", "1", "--size", "96", "96",
               "--eval-images", "4", "--json", str(tmp_path / "record.json")]
    with Watched(command, cwd=tmp_path, env=no_gc) as run:
        assert_exits_promptly(run)
    assert (tmp_path / "record.json").is_file()
    assert len(run.descendants) >= 2, f"no DataLoader workers seen: {run.descendants}"


def test_predict_exits(synth_root, weights, no_gc, tmp_path):
    # predict reads its images in the main process: no workers, but the same exit path after the model ran
    images = sorted((synth_root / "val").iterdir())[:2]
    command = [*detkit_module(), "predict", *map(str, images), "--weights", str(weights),
               "--out", str(tmp_path / "pictures")]
    with Watched(command, cwd=tmp_path, env=no_gc) as run:
        assert_exits_promptly(run)
    assert (tmp_path / "pictures" / "predictions.json").is_file()


def test_sigterm_during_training_saves_and_exits_zero(synth_root, no_gc, tmp_path):
    out = tmp_path / "run"
    with Watched([*detkit_module(), *train_args(synth_root, out, iterations=60)], cwd=tmp_path, env=no_gc) as run:
        assert run.wait_for_line(ITERATION), run.output()
        run.proc.send_signal(signal.SIGTERM)  # to the main process, as `kill PID` does
        sent_at = time.monotonic()
        assert_exits_promptly(run)
    assert run.exited_at - sent_at < PROMPT_S, run.output()
    stopped = re.search(r"stopped by SIGTERM at iteration (\d+)", run.output())
    assert stopped, run.output()
    assert (out / f"model_{int(stopped.group(1)):07d}.pth").is_file()
    assert not (out / "model_final.pth").exists()


@pytest.mark.parametrize("target", ["group", "main"])
def test_sigint_during_training_exits_nonzero_at_once(synth_root, no_gc, tmp_path, target):
    with Watched([*detkit_module(), *train_args(synth_root, tmp_path / "run", iterations=60)], cwd=tmp_path,
                 env=no_gc) as run:
        assert run.wait_for_line(ITERATION), run.output()
        if target == "group":
            run.kill_group(signal.SIGINT)  # as Ctrl-C in a terminal: the workers are interrupted too
        else:
            # as `kill -INT PID`: the workers run on, and the interrupted main process holds their loader in its
            # traceback until the interpreter exits
            run.proc.send_signal(signal.SIGINT)
        sent_at = time.monotonic()
        assert_exits_promptly(run, returncode=None)
    assert run.exited_at - sent_at < PROMPT_S, run.output()


def test_sigkill_of_training_leaves_no_workers_behind(synth_root, no_gc, tmp_path):
    with Watched([*detkit_module(), *train_args(synth_root, tmp_path / "run", iterations=60)], cwd=tmp_path,
                 env=no_gc) as run:
        assert run.wait_for_line(ITERATION), run.output()
        run.poll()
        workers = dict(run.descendants)
        assert len(workers) >= 2, f"no DataLoader workers seen: {workers}"
        run.proc.kill()  # the main process alone: its workers are orphaned and must notice
        run.proc.wait()
        left = wait_gone(workers)
        assert not left, f"workers {left} still running {GONE_S:.0f} s after the main process was killed"


def test_train_under_coreutils_timeout_finishes_normally(synth_root, no_gc, tmp_path):
    timeout = shutil.which("timeout")
    if timeout is None:
        pytest.skip("coreutils timeout is not installed")
    command = [timeout, "60", detkit_script(), *train_args(synth_root, tmp_path / "run")]
    with Watched(command, cwd=tmp_path, env=no_gc) as run:
        assert_exits_promptly(run)  # 124 would mean timeout had to stop it
    assert (tmp_path / "run" / "model_final.pth").is_file()


def test_train_under_torchrun_exits(synth_root, no_gc, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               "-m", "detkit", *train_args(synth_root, tmp_path / "run", 2, "runtime.device=cpu",
                                             "runtime.dist_timeout_s=120")]
    with Watched(command, cwd=tmp_path, env={**no_gc, "GLOO_SOCKET_IFNAME": "lo"}) as run:
        assert_exits_promptly(run)
    assert any("outputs in" in line.text for line in run.lines), run.output()
    assert (tmp_path / "run" / "model_final.pth").is_file()


@pytest.mark.parametrize("detector", ["cascade", "retinanet"])
def test_demo_exits_after_its_last_line(synth_root, no_gc, tmp_path, detector):
    """`detkit demo` on an existing dataset: trains, evaluates, draws, prints where everything is, and exits."""
    overrides = [o for o in data_overrides(synth_root) if not o.startswith(("data.train.", "data.val."))]
    command = [*detkit_module(), "demo", "--detector", detector, "--data", str(synth_root), "--out",
               str(tmp_path / "demo"), "--pictures", "2", "--no-progress", *overrides, "solver.unit=iterations",
               "solver.max_length=2", "solver.warmup_iters=1"]
    with Watched(command, cwd=tmp_path, env=no_gc) as run:
        run.finish()
    assert_exits_promptly(run)
    assert any(line.text.startswith("demo finished in") for line in run.lines), run.output()
    assert len(list((tmp_path / "demo" / "predictions").glob("*.png"))) == 2
    assert len(run.descendants) >= 2, f"no DataLoader workers seen: {run.descendants}"
