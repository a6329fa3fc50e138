import os
import pickle
import random

import numpy as np
import pytest
import torch

from detkit.config.schema import SolverConfig
from detkit.engine import (CheckpointError, build_optimizer, build_scheduler, find_last_checkpoint, load_checkpoint,
                           rng_state, save_checkpoint, set_rng_state)


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
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["last_checkpoint", "model_0000003.pth"]
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
    torch.save({}, tmp_path / "model_final.pth")
    assert find_last_checkpoint(tmp_path) == tmp_path / "model_final.pth"
