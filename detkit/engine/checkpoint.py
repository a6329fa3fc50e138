"""Checkpoints that are written atomically, load without executing code, and restore the random streams."""
from __future__ import annotations

import os
import pickle
import random
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detkit.utils.fileio import write_atomic, write_bytes_atomic

POINTER = "last_checkpoint"
FINAL = "model_final.pth"
_NUMBERED = re.compile(r"model_(\d+)\.pth")
# Markers of torch's weights-only unpickler refusing a global or a call, as opposed to bytes it cannot parse.
_REFUSED = re.compile(r"GLOBAL|allowlist|safe_globals|call reduce")


class CheckpointError(RuntimeError):
    """A checkpoint file is unreadable: truncated, corrupt, or holding Python objects detkit will not run."""


def rng_state() -> dict[str, Any]:
    """The state of every random stream training draws from, made of tensors, numbers and tuples only.

    Returns:
        {"python", "numpy", "torch"} and, when CUDA is available, "cuda" (one state per device); loadable with
        `torch.load(weights_only=True)`.
    """
    algorithm, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        # NumPy's key is a uint32 ndarray, which weights_only refuses; int64 holds every uint32 exactly
        "numpy": {"algorithm": str(algorithm), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the streams saved by `rng_state`.

    Args:
        state: a dict from `rng_state`, possibly after a save and load. CUDA states are restored for the devices
            both runs have; they are skipped on a machine without CUDA.
    """
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["algorithm"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


def _fsync_dir(directory: Path) -> None:
    # Makes a rename durable across power loss; directories cannot be opened this way on Windows.
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _iteration(path: Path) -> int | None:
    match = _NUMBERED.fullmatch(path.name)
    return int(match.group(1)) if match else None


def save_checkpoint(path: str | Path, state: dict[str, Any], keep_last: int = 0) -> None:
    """Write `state` to `path` atomically, then point `last_checkpoint` in the same folder at it.

    A crash at any moment leaves the previous checkpoint and pointer intact: the data goes to a temporary file
    that is fsynced and renamed over `path` before the pointer changes.

    Args:
        path: the file to write, usually `<output_dir>/model_{iteration:07d}.pth`.
        state: tensors, numbers, strings and containers of them (anything `weights_only` loading accepts).
        keep_last: when > 0, delete numbered `model_*.pth` files beyond the K highest iterations. `model_final.pth`
            and the file just written are never deleted.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: torch.save(state, f))
    _fsync_dir(path.parent)  # the checkpoint's rename must be on disk before the pointer names it
    write_bytes_atomic(path.name.encode(), path.parent / POINTER)
    _fsync_dir(path.parent)
    if keep_last > 0:
        numbered = sorted((p for p in path.parent.glob("model_*.pth") if _iteration(p) is not None), key=_iteration)
        for old in numbered[:-keep_last]:
            if old.name != path.name:
                old.unlink(missing_ok=True)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with `torch.load(weights_only=True)`: tensors and plain containers only.

    Args:
        path: a file written by `save_checkpoint` (or any torch.save of a dict of tensors).
        map_location: where tensors are placed.

    Returns:
        The saved dict.

    Raises:
        FileNotFoundError: `path` does not exist.
        CheckpointError: the file is empty, truncated or corrupt, holds something other than a dict, or needs
            arbitrary Python objects to load.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); it was probably cut off while being written")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if _REFUSED.search(str(e)):
            name = re.search(r"GLOBAL ([\w.]+)", str(e))
            what = f" ({name.group(1)})" if name else ""
            raise CheckpointError(
                f"checkpoint {path} contains Python objects{what} that detkit refuses to execute; only tensors, "
                "numbers, strings and containers of them can be loaded") from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
        raise CheckpointError(f"checkpoint {path} is corrupt or not a PyTorch checkpoint"
                              f"{': ' + detail.group(1).strip() if detail else ''}") from e
    except PermissionError:
        raise
    except (RuntimeError, EOFError, OSError, ValueError, LookupError, AssertionError, struct.error) as e:
        # torch's zip reader reports a cut or damaged file with any of these, depending on where the damage is
        raise CheckpointError(f"checkpoint {path} cannot be read, it is probably truncated or corrupt: "
                              f"{_first_line(e)}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict")
    return state


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def find_last_checkpoint(directory: str | Path) -> Path | None:
    """The checkpoint to resume from in `directory`.

    Args:
        directory: a run's output folder.

    Returns:
        The file named by `last_checkpoint` when it exists; else `model_final.pth`, else the numbered
        `model_*.pth` with the highest iteration; None when there is none.
    """
    directory = Path(directory)
    pointer = directory / POINTER
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        # A bare file name only: a pointer must not lead outside the run folder.
        if name and Path(name).name == name and (directory / name).is_file():
            return directory / name
    if (directory / FINAL).is_file():
        return directory / FINAL
    numbered = [p for p in directory.glob("model_*.pth") if _iteration(p) is not None and p.is_file()]
    return max(numbered, key=_iteration) if numbered else None
