"""Real process kills: SIGKILL at exact points of training and of a checkpoint save (through crash_driver.py) or at
a random moment from outside, and SIGTERM from outside; then `detkit train --resume` must finish the run bit for
bit as if nothing had happened. Every run is a subprocess with the same environment (crash_driver.ENV)."""
import os
import random
import re
import shutil
import signal

import pytest

from crash_driver import (final_differences, finish, kill_group, last_state, metrics_iterations, run, start,
                          train_command, wait_for_iteration)
from detkit.config import dump_yaml
from detkit.engine.checkpoint import verify_checkpoint
from run_configs import fast_config

pytestmark = pytest.mark.skipif(os.name != "posix", reason="process groups and POSIX signals")

TIMEOUT = 600.0  # seconds for one training subprocess (~6 s unloaded): only a hang, or a starved machine, trips it
EXTERNAL_K = random.Random(6).randint(3, 7)
TEMPORARY = re.compile(r"\..+\.\d+\.tmp")  # what write_atomic writes before its rename


@pytest.fixture(scope="module")
def reference(synth_root, tmp_path_factory):
    """The config file (8 iterations, a checkpoint every 2, two DataLoader workers) and the last training state
    of an uninterrupted subprocess run of it."""
    work = tmp_path_factory.mktemp("fault_tolerance")
    cfg = fast_config(synth_root, work / "unused")
    cfg.data.num_workers = 2
    assert cfg.runtime.deterministic and cfg.runtime.checkpoint_period == 2
    dump_yaml(cfg, work / "cfg.yaml")
    rc, output = run(train_command(work / "cfg.yaml", work / "reference"), work / "reference.log", TIMEOUT)
    assert rc == 0, output
    state = last_state(work / "reference")
    assert state["iteration"] == 8
    yield work / "cfg.yaml", state
    shutil.rmtree(work / "reference")  # ~190 MB of checkpoints


def _pointer(run_dir):
    return (run_dir / "last_checkpoint").read_text()


def _temporaries(run_dir):
    return sorted(p.name for p in run_dir.iterdir() if TEMPORARY.fullmatch(p.name))


def _resume_and_compare(config, run_dir, log, reference_state):
    """Resume the run in `run_dir`; assert it ends cleanly, bit-identical to the reference, metrics once each."""
    rc, output = run(train_command(config, run_dir, resume=True), log, TIMEOUT)
    assert rc == 0 and "Traceback" not in output, output
    assert final_differences(reference_state, run_dir) == []
    assert metrics_iterations(run_dir) == list(range(1, 9))
    assert _temporaries(run_dir) == []
    shutil.rmtree(run_dir)  # ~190 MB of checkpoints; the logs stay beside it
    return output


@pytest.mark.parametrize("point", ["step@5", "mid-write@4", "after-sidecar@4", "after-rename@6", "final-mid-write",
                                   f"external@{EXTERNAL_K}"])
def test_sigkill_then_resume_is_bit_identical(reference, tmp_path, point):
    config, reference_state = reference
    run_dir = tmp_path / "run"
    if point.startswith("external"):
        proc = start(train_command(config, run_dir), tmp_path / "killed.log")
        try:
            assert wait_for_iteration(proc, run_dir, EXTERNAL_K, TIMEOUT), (tmp_path / "killed.log").read_text()
            proc.kill()  # SIGKILL to the training process itself, wherever it is
        finally:
            rc = finish(proc, TIMEOUT)
    else:
        proc = start(train_command(config, run_dir, point=point), tmp_path / "killed.log")
        rc = finish(proc, TIMEOUT)
    killed_output = (tmp_path / "killed.log").read_text()
    assert rc == -signal.SIGKILL, killed_output
    if not point.startswith("external"):
        assert "crash_driver: SIGKILL at" in killed_output, killed_output

    temporaries = _temporaries(run_dir)
    files = {p.name for p in run_dir.iterdir()}
    if point == "step@5":
        assert _pointer(run_dir) == "model_0000004.pth" and temporaries == []
        assert metrics_iterations(run_dir) == [1, 2, 3, 4] and "model_0000006.pth" not in files
    elif point == "mid-write@4":
        assert _pointer(run_dir) == "model_0000002.pth"
        assert len(temporaries) == 1 and temporaries[0].startswith(".model_0000004.pth.")
        assert "model_0000004.pth" not in files and "model_0000004.pth.sha256" not in files
        half = (run_dir / temporaries[0]).stat().st_size
        assert 0 < half < (run_dir / "model_0000002.pth").stat().st_size
    elif point == "after-sidecar@4":
        assert _pointer(run_dir) == "model_0000002.pth" and temporaries == []
        assert "model_0000004.pth.sha256" in files and verify_checkpoint(run_dir / "model_0000004.pth") is None
    elif point == "after-rename@6":
        # complete and fsynced, but its checksum is not written yet: loadable, unverified
        assert _pointer(run_dir) == "model_0000004.pth" and temporaries == []
        assert "model_0000006.pth.sha256" not in files and verify_checkpoint(run_dir / "model_0000006.pth") is None
    elif point == "final-mid-write":
        # the training state of the last iteration is saved; the weights file was being written
        assert _pointer(run_dir) == "model_0000008.pth" and "model_final.pth" not in files
        assert len(temporaries) == 1 and temporaries[0].startswith(".model_final.pth.")
    else:
        # the kill lands somewhere after iteration K was logged: in K's save, in step K + 1 or its save
        pointer = _pointer(run_dir)
        assert verify_checkpoint(run_dir / pointer) is None
        saved_at = int(pointer[len("model_"):-len(".pth")])
        assert EXTERNAL_K - 2 <= saved_at <= EXTERNAL_K + 1, pointer

    output = _resume_and_compare(config, run_dir, tmp_path / "resume.log", reference_state)
    for name in temporaries:
        assert f"removed {name}, left behind by an interrupted save" in output, output


def test_sigterm_saves_and_exits_cleanly_then_resumes_bit_identical(reference, tmp_path):
    config, reference_state = reference
    run_dir = tmp_path / "run"
    proc = start(train_command(config, run_dir), tmp_path / "stopped.log")
    try:
        assert wait_for_iteration(proc, run_dir, 3, TIMEOUT), (tmp_path / "stopped.log").read_text()
        # the whole process group, as SLURM or a container runtime would: the DataLoader workers must ignore it
        kill_group(proc, signal.SIGTERM)
        rc = proc.wait(60)
    finally:
        finish(proc, TIMEOUT)
    output = (tmp_path / "stopped.log").read_text()
    assert rc == 0 and "Traceback" not in output, output
    stopped = re.search(r"stopped by SIGTERM at iteration (\d+)", output)
    assert stopped, output
    iteration = int(stopped.group(1))
    assert 3 <= iteration < 8
    assert _pointer(run_dir) == f"model_{iteration:07d}.pth"
    assert verify_checkpoint(run_dir / _pointer(run_dir)) is None
    assert metrics_iterations(run_dir) == list(range(1, iteration + 1))
    _resume_and_compare(config, run_dir, tmp_path / "resume.log", reference_state)
