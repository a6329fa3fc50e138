"""Multi-process training under torchrun: process group, collectives, norm conversion and the DDP wrap.

Every helper works in a single process too (world size 1, no process group), where the collectives do nothing,
so the trainer calls them unconditionally.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..config.load import ConfigError
from ..config.schema import RuntimeConfig
from .compile import compile_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: global rank, rank on its node (its GPU), and the number of processes."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs, writes files and saves checkpoints."""
        return self.rank == 0


def init_distributed(runtime: RuntimeConfig, device: torch.device) -> DistInfo:
    """Join the process group that torchrun describes in RANK, WORLD_SIZE and LOCAL_RANK.

    Without those variables (a plain `detkit train`), or with a world of one, there is no process group. The
    backend `auto` is nccl for CUDA and gloo for CPU. On CUDA each process uses GPU `local_rank`.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world_size)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    backend = runtime.dist_backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError(f"runtime.dist_backend nccl needs CUDA, but the device is {device}; use gloo (or auto)")
    if device.type == "cuda":
        if device.index is not None and device.index != info.local_rank:
            logger.warning("runtime.device %s ignored under torchrun: rank %d uses cuda:%d (its LOCAL_RANK)",
                           device, info.rank, info.local_rank)
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend, rank=info.rank, world_size=world_size,
                            timeout=timedelta(seconds=runtime.dist_timeout_s))
    logger.debug("rank %d of %d joined the %s process group", info.rank, world_size, backend)
    return info


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum `tensor` over ranks, in place; returns it (unchanged in one process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: Any) -> list:
    """Every rank's `obj`, in rank order. Objects are pickled: only for data made inside this job."""
    if not is_distributed():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (pickled, like `all_gather_objects`)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shutdown() -> None:
    """Leave the process group, if there is one."""
    if is_distributed():
        dist.destroy_process_group()


def _as_batchnorm(sync: nn.SyncBatchNorm) -> nn.BatchNorm2d:
    """A BatchNorm2d sharing `sync`'s parameters and buffers (so optimiser state and checkpoints carry over)."""
    bn = nn.BatchNorm2d(sync.num_features, sync.eps, sync.momentum, sync.affine, sync.track_running_stats,
                        device=sync.running_mean.device if sync.running_mean is not None else None)
    if sync.affine:
        bn.weight, bn.bias = sync.weight, sync.bias
    if sync.track_running_stats:
        bn.running_mean, bn.running_var = sync.running_mean, sync.running_var
        bn.num_batches_tracked = sync.num_batches_tracked
    bn.train(sync.training)
    return bn


def _revert_sync_batchnorm(module: nn.Module) -> tuple[nn.Module, int]:
    """Replace every SyncBatchNorm below `module` (or `module` itself) by a BatchNorm2d; returns (module, count)."""
    if isinstance(module, nn.SyncBatchNorm):
        return _as_batchnorm(module), 1
    count = 0
    for name, child in module.named_children():
        new, n = _revert_sync_batchnorm(child)
        if new is not child:
            setattr(module, name, new)
        count += n
    return module, count


def convert_norms_for(model: nn.Module, device: torch.device, world_size: int, sync_bn: bool) -> nn.Module:
    """Make the model's norm layers fit the device and the number of processes.

    - CUDA, several processes, `sync_bn`: every BatchNorm becomes a SyncBatchNorm (statistics over all ranks).
    - CPU, several processes: torch refuses SyncBatchNorm on CPU as soon as a process group exists, so any
      SyncBatchNorm (`runtime.sync_bn` or a `SyncBN` norm in the model config) becomes a per-process BatchNorm2d,
      with one warning.
    - One process: unchanged; without a process group SyncBatchNorm already computes plain batch statistics.
    """
    if world_size <= 1:
        return model
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model) if sync_bn else model
    model, count = _revert_sync_batchnorm(model)
    if count:
        logger.warning("SyncBatchNorm does not run on CPU: %d layers use BatchNorm2d instead, with statistics "
                       "from each rank's own batch", count)
    elif sync_bn:
        logger.warning("runtime.sync_bn ignored: SyncBatchNorm does not run on CPU")
    return model


def prepare_model(model: nn.Module, info: DistInfo, runtime: RuntimeConfig,
                  device: torch.device) -> tuple[nn.Module, nn.Module]:
    """Convert the norms, compile the dense parts (`runtime.compile`) and, with several processes, wrap the model
    in DistributedDataParallel.

    Returns:
        (ddp_or_model, core_model): call the first for training steps; use the second for everything else
        (state dicts, `step_normalizer`, evaluation, parameter groups).
    """
    model = convert_norms_for(model, device, info.world_size, runtime.sync_bn).to(device)
    compile_model(model, runtime)
    if info.world_size <= 1:
        return model, model
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model, device_ids=[info.local_rank] if device.type == "cuda" else None,
                                  find_unused_parameters=runtime.find_unused_parameters)
    return ddp, model


def launch_command(argv: list[str], nproc: int) -> list[str]:
    """The torchrun command line that runs `detkit <argv>` in `nproc` local processes (`--gpus` removed)."""
    args, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--gpus":
            skip = True
        elif not arg.startswith("--gpus="):
            args.append(arg)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "detkit", *args]
