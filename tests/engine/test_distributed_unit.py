"""engine/distributed.py: the torchrun command, norm conversion, single-process no-ops, and real gloo collectives."""
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from detkit.config.load import ConfigError
from detkit.config.schema import RuntimeConfig
from detkit.engine.distributed import (DistInfo, all_gather_objects, all_reduce_sum, barrier, broadcast_object,
                                       convert_norms_for, init_distributed, is_distributed, launch_command,
                                       prepare_model, shutdown)
from detkit.modeling.norm import FrozenBatchNorm2d, make_norm

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


def _net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), make_norm("SyncBN", 4), nn.ReLU(),
                         nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), FrozenBatchNorm2d(4)))


def test_launch_command_runs_detkit_under_torchrun_without_the_gpus_option():
    argv = ["train", "cfg.yaml", "--gpus", "4", "solver.base_lr=0.01", "--gpus=2", "--no-progress"]
    assert launch_command(argv, 4) == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                       "--nproc_per_node", "4", "-m", "detkit", "train", "cfg.yaml",
                                       "solver.base_lr=0.01", "--no-progress"]


def test_sync_batchnorm_on_cpu_with_several_processes_becomes_batchnorm(caplog):
    model = _net()
    params = list(model.parameters())
    with caplog.at_level(logging.WARNING, logger="detkit.engine.distributed"):
        converted = convert_norms_for(model, CPU, world_size=2, sync_bn=True)
    types = [type(m) for m in converted.modules()]
    assert nn.SyncBatchNorm not in types
    assert types.count(nn.BatchNorm2d) == 2 and types.count(FrozenBatchNorm2d) == 1
    assert all(a is b for a, b in zip(converted.parameters(), params))  # the optimiser's tensors carry over
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "1 layers use BatchNorm2d" in warnings[0].getMessage()


def test_one_process_keeps_sync_batchnorm_which_computes_plain_batch_statistics():
    torch.manual_seed(0)
    model = _net()
    assert convert_norms_for(model, CPU, world_size=1, sync_bn=True) is model
    assert isinstance(model[1], nn.SyncBatchNorm)
    x = torch.randn(2, 3, 8, 8)
    plain = convert_norms_for(_net(), CPU, world_size=2, sync_bn=False)
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(x), plain(x))


def test_single_process_helpers_are_no_ops(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = init_distributed(RuntimeConfig(), CPU)
    assert info == DistInfo(0, 0, 1) and info.is_main and not is_distributed()
    t = torch.tensor([1.0, 2.0])
    assert all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]
    assert all_gather_objects({"a": 1}) == [{"a": 1}]
    obj = object()
    assert broadcast_object(obj) is obj
    barrier()
    shutdown()
    model = nn.Linear(2, 2)
    assert prepare_model(model, info, RuntimeConfig(), CPU) == (model, model)


def test_nccl_without_cuda_is_a_config_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="nccl needs CUDA"):
        init_distributed(RuntimeConfig(dist_backend="nccl"), CPU)
    assert not is_distributed()


WORKER = """
import json, torch
from torch import nn
from detkit.config.schema import RuntimeConfig
from detkit.engine import distributed as d
from detkit.modeling.norm import make_norm

info = d.init_distributed(RuntimeConfig(dist_timeout_s=30), torch.device("cpu"))
out = {"info": [info.rank, info.local_rank, info.world_size], "dist": d.is_distributed()}
out["sum"] = d.all_reduce_sum(torch.tensor([info.rank + 1.0, 10.0])).tolist()
out["gathered"] = d.all_gather_objects({"rank": info.rank})
out["broadcast"] = d.broadcast_object(f"from rank {info.rank}")
torch.manual_seed(info.rank)  # different weights per rank: DDP must broadcast rank 0's
model = nn.Sequential(nn.Conv2d(3, 4, 3), make_norm("SyncBN", 4), nn.Flatten(), nn.Linear(64, 1))
ddp, core = d.prepare_model(model, info, RuntimeConfig(), torch.device("cpu"))
ddp(torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(info.rank))).sum().backward()
flat = torch.cat([p.grad.flatten() for p in core.parameters()] + [p.detach().flatten() for p in core.parameters()])
out["norm"] = type(core[1]).__name__
out["ddp_state_equal"] = all(torch.equal(a, b) for a, b in zip(d.all_gather_objects(flat), [flat] * 2))
d.barrier()
d.shutdown()
print("RESULT " + json.dumps(out))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_reduce_gather_and_broadcast():
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
           "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER], cwd=ROOT, env={**env, "RANK": str(r),
                                                                            "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for r in range(2)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=90)[0])
    finally:
        for p in procs:  # a hung rank must not outlive the test
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outputs)
    results = [json.loads(line[len("RESULT "):]) for o in outputs for line in o.splitlines()
               if line.startswith("RESULT ")]
    for rank, r in enumerate(results):
        assert r["info"] == [rank, rank, 2] and r["dist"]
        assert r["sum"] == [3.0, 20.0]
        assert r["gathered"] == [{"rank": 0}, {"rank": 1}]
        assert r["broadcast"] == "from rank 0"
        assert r["norm"] == "BatchNorm2d"
    # DDP broadcast rank 0's weights at the wrap and averaged the gradients: both ranks hold the same tensors
    assert results[0]["ddp_state_equal"] and results[1]["ddp_state_equal"]
