import os
import pickle
import random

import numpy as np
import pytest
import torch

from detkit.config.schema import SolverConfig
from detkit.engine import (CheckpointError, build_optimizer, build_scheduler, find_last_checkpoint, load_checkpoint,
                           rng_state, save_checkpoint, set_rng_state)
from run_configs import damage_file


def _draw():
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), float(np.random.randn()),
            torch.rand(3).tolist(), torch.randn(2).tolist())


def _touch(path):  # what a malicious pickle would run; the test checks it never does
    open(path, "w").close()


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return _touch, (self.marker,)


def test_rng_state_survives_save_and_load_exactly(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    # leave a cached Gaussian in Python's and NumPy's generators: the state must carry it too
    random.gauss(0, 1)
    np.random.randn()
    save_checkpoint(tmp_path / "model_0000001.pth", {"rng": rng_state()})
    expected = _draw()
    assert _draw() != expected  # the streams moved on

    set_rng_state(load_checkpoint(tmp_path / "model_0000001.pth")["rng"])
    assert _draw() == expected


def test_training_state_round_trips(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    solver = SolverConfig(max_length=50, steps=(30,), warmup_iters=5)
    optimizer = build_optimizer(model, solver, lr=0.1)
    scheduler = build_scheduler(optimizer, solver, iters_per_epoch=1)
    for _ in range(3):
        model(torch.randn(8, 4)).square().mean().backward()
        optimizer.step()
        scheduler.step()
    path = tmp_path / "run" / "model_0000003.pth"
    save_checkpoint(path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                           "scheduler": scheduler.state_dict(), "iteration": 3})

    assert (tmp_path / "run" / "last_checkpoint").read_text() == "model_0000003.pth"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["last_checkpoint", "model_0000003.pth",
                                                                  "model_0000003.pth.sha256"]
    state = load_checkpoint(path)
    assert state["iteration"] == 3
    for key, value in model.state_dict().items():
        assert torch.equal(state["model"][key], value), key
    optimizer2 = build_optimizer(model, solver, lr=0.1)
    optimizer2.load_state_dict(state["optimizer"])
    momentum = optimizer.state[model[0].weight]["momentum_buffer"]
    assert torch.equal(optimizer2.state[model[0].weight]["momentum_buffer"], momentum)
    assert [g["name"] for g in optimizer2.param_groups] == ["decay", "no_decay_norm", "no_decay_bias"]


def test_damaged_files_raise_checkpoint_error_naming_the_path(tmp_path):
    good = tmp_path / "good.pth"
    save_checkpoint(good, {"weights": torch.arange(2000, dtype=torch.float32)})
    data = good.read_bytes()
    zero, truncated, garbage = tmp_path / "zero.pth", tmp_path / "truncated.pth", tmp_path / "garbage.pth"
    zero.write_bytes(b"")
    truncated.write_bytes(data[: len(data) // 2])
    garbage.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CheckpointError, match="zero.pth is empty"):
        load_checkpoint(zero)
    with pytest.raises(CheckpointError, match="truncated.pth .*truncated or corrupt"):
        load_checkpoint(truncated)
    with pytest.raises(CheckpointError, match="garbage.pth"):
        load_checkpoint(garbage)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_checkpoint(tmp_path / "missing.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="holds a list, expected a dict"):
        load_checkpoint(tmp_path / "list.pth")


def test_pickled_python_objects_are_refused_not_run(tmp_path):
    marker = tmp_path / "code_ran"
    torch.save({"weights": torch.zeros(2), "payload": _Payload(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="evil.pth contains Python objects .*refuses to execute"):
        load_checkpoint(tmp_path / "evil.pth")
    with open(tmp_path / "evil.pkl", "wb") as f:  # a bare pickle, not a torch zip
        pickle.dump({"payload": _Payload(str(marker))}, f, protocol=2)
    with pytest.raises(CheckpointError, match="evil.pkl contains Python objects"):
        load_checkpoint(tmp_path / "evil.pkl")
    assert not marker.exists()


def test_keep_last_deletes_older_numbered_checkpoints_only(tmp_path):
    save_checkpoint(tmp_path / "model_final.pth", {"iteration": 0})
    (tmp_path / "notes.pth").write_bytes(b"x")
    for iteration in (100, 200, 300, 400, 500):
        save_checkpoint(tmp_path / f"model_{iteration:07d}.pth", {"iteration": iteration}, keep_last=2)
    names = sorted(p.name for p in tmp_path.glob("*.pth"))
    assert names == ["model_0000400.pth", "model_0000500.pth", "model_final.pth", "notes.pth"]
    # a restarted run writing a lower iteration keeps the file it just wrote
    save_checkpoint(tmp_path / "model_0000050.pth", {"iteration": 50}, keep_last=1)
    assert sorted(p.name for p in tmp_path.glob("model_0*.pth")) == ["model_0000050.pth", "model_0000500.pth"]
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_find_last_checkpoint(tmp_path):
    assert find_last_checkpoint(tmp_path) is None
    assert find_last_checkpoint(tmp_path / "absent") is None
    for iteration in (900, 1000, 80):  # numeric order, not the order written
        torch.save({}, tmp_path / f"model_{iteration:07d}.pth")
    assert find_last_checkpoint(tmp_path) == tmp_path / "model_0001000.pth"
    save_checkpoint(tmp_path / "model_0000900.pth", {})
    assert find_last_checkpoint(tmp_path) == tmp_path / "model_0000900.pth"  # the pointer wins
    (tmp_path / "last_checkpoint").write_text("model_0000777.pth")  # points at a deleted file
    assert find_last_checkpoint(tmp_path) == tmp_path / "model_0001000.pth"
    (tmp_path / "last_checkpoint").write_text("../model_0000900.pth")  # never outside the folder
    assert find_last_checkpoint(tmp_path) == tmp_path / "model_0001000.pth"
    # weights files are never training checkpoints, not even when the pointer names them (as it once did)
    torch.save({}, tmp_path / "model_final.pth")
    torch.save({}, tmp_path / "model_best.pth")
    assert find_last_checkpoint(tmp_path) == tmp_path / "model_0001000.pth"
    (tmp_path / "last_checkpoint").write_text("model_final.pth")
    assert find_last_checkpoint(tmp_path) == tmp_path / "model_0001000.pth"


def _damage(path, how):
    if how == "pickle":  # replaced by a file that would run code; it has the old checksum
        torch.save({"payload": _Payload(str(path) + ".ran")}, path)
    else:
        damage_file(path, how)


def test_digest_sidecar_is_written_and_checked(tmp_path):
    import hashlib

    path = tmp_path / "model_0000001.pth"
    save_checkpoint(path, {"weights": torch.arange(4000, dtype=torch.float32)})
    digest, name = (tmp_path / "model_0000001.pth.sha256").read_text().split()
    assert name == path.name and digest == hashlib.sha256(path.read_bytes()).hexdigest()
    _damage(path, "bitflip")
    with pytest.raises(CheckpointError, match="model_0000001.pth is damaged: checksum mismatch"):
        load_checkpoint(path)
    # torch alone does not see the flip: this is why the checksum exists
    flipped = load_checkpoint(path, verify=False)["weights"]
    assert flipped.shape == (4000,) and not torch.equal(flipped, torch.arange(4000, dtype=torch.float32))


@pytest.mark.parametrize("how, reason", [("truncated", "checksum mismatch"), ("zero", "empty"),
                                         ("bitflip", "checksum mismatch"), ("garbage", "checksum mismatch"),
                                         ("pickle", "checksum mismatch")])
def test_candidates_and_fallback_skip_damaged_files(tmp_path, how, reason):
    from detkit.engine.checkpoint import checkpoint_candidates, load_latest_good

    for iteration in (2, 4, 6):
        save_checkpoint(tmp_path / f"model_{iteration:07d}.pth",
                        {"iteration": iteration, "w": torch.full((500,), float(iteration))}, keep_last=3)
    assert [p.name for p in checkpoint_candidates(tmp_path)] == ["model_0000006.pth", "model_0000004.pth",
                                                                 "model_0000002.pth"]
    _damage(tmp_path / "model_0000006.pth", how)
    assert load_latest_good(tmp_path / "no-run-here") is None  # nothing to resume is not an error
    path, state, rejected = load_latest_good(tmp_path)
    assert path.name == "model_0000004.pth" and state["iteration"] == 4
    assert [(p.name, reason in r) for p, r in rejected] == [("model_0000006.pth", True)]
    # without its checksum the damage is still caught when torch cannot parse it (or refuses it)
    (tmp_path / "model_0000006.pth.sha256").unlink()
    if how in ("truncated", "zero", "garbage", "pickle"):
        assert load_latest_good(tmp_path)[0].name == "model_0000004.pth"
    for iteration in (2, 4):
        _damage(tmp_path / f"model_{iteration:07d}.pth", how)
    if how != "bitflip":
        with pytest.raises(CheckpointError) as error:
            load_latest_good(tmp_path)
        message = str(error.value)
        assert all(f"model_000000{i}.pth" in message for i in (2, 4, 6)), message
    assert not list(tmp_path.glob("*.ran"))


def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    import detkit.engine.checkpoint as checkpoint
    from detkit.engine.checkpoint import verify_checkpoint

    good = tmp_path / "model_0000002.pth"
    save_checkpoint(good, {"iteration": 2, "w": torch.ones(1000)})
    digest_before = (tmp_path / "model_0000002.pth.sha256").read_bytes()

    def full_disk_save(obj, f):
        f.write(b"x" * 1024)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk_save)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path / "model_0000004.pth", {"iteration": 4, "w": torch.ones(1000)}, keep_last=1)
    monkeypatch.undo()
    assert verify_checkpoint(good) is None and load_checkpoint(good)["iteration"] == 2
    assert (tmp_path / "last_checkpoint").read_text() == good.name
    assert (tmp_path / "model_0000002.pth.sha256").read_bytes() == digest_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000002.pth",
                                                          "model_0000002.pth.sha256"]


def test_a_real_file_size_limit_mid_write_is_survived(tmp_path):
    """The kernel refuses the write halfway through the file (EFBIG from RLIMIT_FSIZE), in a child process."""
    import subprocess
    import sys

    resource = pytest.importorskip("resource")
    del resource
    save_checkpoint(tmp_path / "model_0000002.pth", {"iteration": 2, "w": torch.ones(10)})
    script = f"""
import resource, signal, torch
from detkit.engine.checkpoint import save_checkpoint
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
try:
    save_checkpoint({str(tmp_path / 'model_0000004.pth')!r}, {{"iteration": 4, "w": torch.ones(100_000)}})
except OSError as e:
    print("errno", e.errno)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "errno 27" in result.stdout, (result.stdout, result.stderr)  # EFBIG
    assert load_checkpoint(tmp_path / "model_0000002.pth")["iteration"] == 2
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000002.pth"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000002.pth",
                                                          "model_0000002.pth.sha256"]


def test_stale_temporaries_and_orphan_sidecars_are_removed(tmp_path):
    from detkit.engine.checkpoint import remove_stale_temporaries

    dead = tmp_path / ".model_0000004.pth.999999999.tmp"  # no such pid
    mine = tmp_path / f".model_0000005.pth.{os.getpid()}.tmp"  # a killed run whose pid this process now has
    live = tmp_path / f".model_0000006.pth.{os.getppid()}.tmp"  # a live process may still be writing it
    orphan = tmp_path / "model_0000008.pth.sha256"
    for p in (dead, mine, live, orphan):
        p.write_bytes(b"x")
    save_checkpoint(tmp_path / "model_0000002.pth", {"iteration": 2})
    old = tmp_path / f".model_0000010.pth.{os.getppid()}.tmp"
    old.write_bytes(b"x")
    os.utime(old, (1, 1))  # a day-old temporary file is stale whoever holds its pid
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted([dead.name, mine.name, orphan.name, old.name])
    assert live.exists() and (tmp_path / "model_0000002.pth.sha256").exists()


def test_non_finite_state_is_found_by_name():
    from detkit.engine.checkpoint import non_finite_tensors

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    assert non_finite_tensors(state) == []
    state["model"]["bias"] = torch.tensor([0.0, float("nan")])
    state["optimizer"]["state"][0]["momentum_buffer"][0, 0] = float("inf")
    assert non_finite_tensors(state) == ["model.bias", "optimizer.state[0].momentum_buffer"]


def test_the_environment_cannot_force_unsafe_loading(tmp_path, monkeypatch):
    marker = tmp_path / "code_ran"
    torch.save({"payload": _Payload(str(marker))}, tmp_path / "evil.pth")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(CheckpointError, match="refuses to execute"):
        load_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()
