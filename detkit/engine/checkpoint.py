"""Checkpoints that are written atomically, load without executing code, and restore the random streams."""
from __future__ import annotations

import errno
import hashlib
import logging
import math
import os
import pickle
import random
import re
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detkit.utils.fileio import write_atomic, write_bytes_atomic
from detkit.utils.serialization import UnsafePickleError, torch_load_weights_only

logger = logging.getLogger(__name__)

POINTER = "last_checkpoint"
# weights files (model, config, classes; no optimiser, schedule or data position): never training checkpoints
FINAL = "model_final.pth"
BEST = "model_best.pth"  # also the metric value and the iteration that made it the best
WEIGHTS_ONLY = (FINAL, BEST)
DIGEST_SUFFIX = ".sha256"
_NUMBERED = re.compile(r"model_(\d+)\.pth")
_TEMPORARY = re.compile(r"\..+\.(\d+)\.tmp")
STALE_AFTER_S = 3600.0  # a temporary file this old is stale even if a process with its pid is alive
# write errors that mean "no room": the previous checkpoint stays usable and a later save may succeed
DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


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
    # Makes a rename durable across power loss; directories cannot be opened this way on Windows, and some network
    # filesystems refuse to fsync a directory.
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        logger.debug("cannot fsync directory %s: %s", directory, e)
    finally:
        os.close(fd)


def _iteration(path: Path) -> int | None:
    match = _NUMBERED.fullmatch(path.name)
    return int(match.group(1)) if match else None


def digest_path(path: str | Path) -> Path:
    """The checksum file of a checkpoint: `model_0000300.pth.sha256`, in `sha256sum` format."""
    path = Path(path)
    return path.with_name(path.name + DIGEST_SUFFIX)


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class _HashingWriter:
    """A binary file wrapper that hashes what passes through and remembers the first write error."""

    def __init__(self, f):
        self.f, self.sha256, self.error = f, hashlib.sha256(), None

    def write(self, data) -> int:
        try:
            n = self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise
        self.sha256.update(data)
        return n

    def flush(self) -> None:
        self.f.flush()


def save_checkpoint(path: str | Path, state: dict[str, Any], keep_last: int = 0, *, pointer: bool = True) -> None:
    """Write `state` to `path` atomically with its checksum, then point `last_checkpoint` in the same folder at it.

    Order of the writes, each atomic (temporary file, fsync, rename): the data to a temporary file, hashed as it
    is written; the checksum of any older file of the same name removed; the data renamed to `path`; its sha256
    to `path.sha256` (`sha256sum -c` format); the pointer. A crash at any moment leaves the previous checkpoint and
    pointer intact; a file never carries another file's checksum (at worst, right after a crash, a complete file
    has none and loads unverified), and a file that changes after it was written no longer matches its checksum,
    so `load_checkpoint` detects it.

    Args:
        path: the file to write, usually `<output_dir>/model_{iteration:07d}.pth`.
        state: tensors, numbers, strings and containers of them (anything `weights_only` loading accepts).
        keep_last: when > 0, delete numbered `model_*.pth` files (and checksums) beyond the K highest iterations.
            `model_final.pth`, `model_best.pth` and the file just written are never deleted.
        pointer: update `last_checkpoint`; False for a weights file (`model_final.pth`, `model_best.pth`), which is
            not a state to resume training from.

    Raises:
        OSError: the write failed (e.g. the disk is full); the previous checkpoint, its checksum and the pointer
            are untouched and no temporary file is left.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stream: _HashingWriter | None = None

    def write(f) -> None:
        nonlocal stream
        stream = _HashingWriter(f)
        try:
            torch.save(state, stream)
        except RuntimeError:
            # torch's zip writer turns a failed write (ENOSPC, EFBIG) into a RuntimeError when it closes the
            # archive; the OSError underneath is what the caller can act on
            if stream.error is not None:
                raise stream.error from None
            raise

    def drop_old_digest(tmp: Path) -> None:  # an older file of this name (e.g. model_final.pth) loses its checksum
        digest_path(path).unlink(missing_ok=True)

    write_atomic(path, write, before_rename=drop_old_digest)
    write_bytes_atomic(f"{stream.sha256.hexdigest()}  {path.name}\n".encode(), digest_path(path))
    _fsync_dir(path.parent)  # the checkpoint's rename must be on disk before the pointer names it
    if pointer:
        write_bytes_atomic(path.name.encode(), path.parent / POINTER)
        _fsync_dir(path.parent)
    if keep_last > 0:
        numbered = sorted((p for p in path.parent.glob("model_*.pth") if _iteration(p) is not None), key=_iteration)
        for old in numbered[:-keep_last]:
            if old.name != path.name:
                old.unlink(missing_ok=True)
                digest_path(old).unlink(missing_ok=True)


def verify_checkpoint(path: str | Path) -> str | None:
    """What is wrong with a checkpoint file before it is even parsed, or None.

    Checks that it exists, is not empty, and matches its `.sha256` file when there is one. A file without a
    checksum (written by another tool or an older detkit) is not an error; the parse then has the last word.
    """
    path = Path(path)
    if not path.is_file():
        return "it does not exist"
    if path.stat().st_size == 0:
        return "it is empty (0 bytes); it was probably cut off while being written"
    digest_file = digest_path(path)
    if not digest_file.is_file():
        logger.debug("%s has no checksum file; loading it unverified", path)
        return None
    expected = digest_file.read_text(encoding="utf-8", errors="replace").split()
    if not expected or not re.fullmatch(r"[0-9a-f]{64}", expected[0]):
        return f"its checksum file {digest_file.name} is unreadable"
    if file_sha256(path) != expected[0]:
        return ("checksum mismatch: the file changed after it was written (damaged on disk, in a copy, or "
                "overwritten)")
    return None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *,
                    verify: bool = True) -> dict[str, Any]:
    """Load a checkpoint with `torch.load(weights_only=True)`: tensors and plain containers only.

    Args:
        path: a file written by `save_checkpoint` (or any torch.save of a dict of tensors).
        map_location: where tensors are placed.
        verify: check the file against its `.sha256` checksum first (see `verify_checkpoint`). torch alone does
            not notice a flipped bit in tensor data.

    Returns:
        The saved dict.

    Raises:
        FileNotFoundError: `path` does not exist.
        CheckpointError: the file is empty, does not match its checksum, is truncated or corrupt, holds something
            other than a dict, or needs arbitrary Python objects to load.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); it was probably cut off while being written")
    if verify and (problem := verify_checkpoint(path)):
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}")
    try:
        state = torch_load_weights_only(path, map_location=map_location)
    except UnsafePickleError as e:
        raise CheckpointError(f"checkpoint {e}") from None  # it names the file and the refused object
    except pickle.UnpicklingError as e:
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


def checkpoint_candidates(directory: str | Path) -> list[Path]:
    """The checkpoints of a run folder to resume from, best first.

    The file named by `last_checkpoint` (a bare name inside the folder, nothing else is followed), then the
    numbered `model_*.pth` from the highest iteration down. No duplicates. The weights files `model_final.pth` and
    `model_best.pth` are never candidates, even when the pointer names them (as it did before detkit wrote the
    training state of the last iteration to its own numbered checkpoint).
    """
    directory = Path(directory)
    found: list[Path] = []
    pointer = directory / POINTER
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8", errors="replace").strip()
        # A bare file name only: a pointer must not lead outside the run folder.
        if name in WEIGHTS_ONLY:
            logger.warning("%s names %s, a weights file without the training state (an older detkit pointed at "
                           "it when a run finished); resuming from the numbered checkpoints instead", POINTER, name)
        elif name and Path(name).name == name and name not in (".", "..") and (directory / name).is_file():
            found.append(directory / name)
        else:
            logger.warning("%s names %r, which is not a file in %s; ignoring it", POINTER, name[:200], directory)
    numbered = [p for p in directory.glob("model_*.pth") if _iteration(p) is not None and p.is_file()]
    found += sorted(numbered, key=_iteration, reverse=True)
    return list(dict.fromkeys(found))


def find_last_checkpoint(directory: str | Path) -> Path | None:
    """The checkpoint to resume from in `directory` (the first of `checkpoint_candidates`), or None."""
    candidates = checkpoint_candidates(directory)
    return candidates[0] if candidates else None


def load_latest_good(directory: str | Path,
                     map_location: str | torch.device = "cpu") -> tuple[Path, dict, list[tuple[Path, str]]] | None:
    """Load the best checkpoint of a run folder that is intact, falling back past damaged ones.

    Args:
        directory: the run folder.
        map_location: where tensors are placed.

    Returns:
        (path, state, rejected): the file loaded, its contents, and each file tried before it with the reason; None
        when the folder holds no checkpoint at all.

    Raises:
        CheckpointError: there are checkpoints but none loads (the message lists every file and why).
    """
    candidates = checkpoint_candidates(directory)
    if not candidates:
        return None
    rejected: list[tuple[Path, str]] = []
    for path in candidates:
        try:
            return path, load_checkpoint(path, map_location), rejected
        except (CheckpointError, FileNotFoundError) as e:
            rejected.append((path, str(e)))
    lines = "\n".join(f"  {p.name}: {reason}" for p, reason in rejected)
    raise CheckpointError(f"no usable checkpoint in {directory}; every one is damaged:\n{lines}")


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete what a killed save leaves behind in a run folder: temporary files of dead processes (or older than
    an hour) and checksum files whose checkpoint does not exist. Returns the removed paths."""
    directory = Path(directory)
    removed = []
    now = time.time()
    for path in directory.iterdir() if directory.is_dir() else ():
        match = _TEMPORARY.fullmatch(path.name)
        if match and path.is_file():
            pid = int(match.group(1))
            try:
                stale = now - path.stat().st_mtime > STALE_AFTER_S or not _process_alive(pid)
            except FileNotFoundError:
                continue
        elif path.name.endswith(DIGEST_SUFFIX) and path.name.startswith("model_"):
            stale = not path.with_name(path.name[:-len(DIGEST_SUFFIX)]).exists()
        else:
            continue
        if stale:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    # Our own pid counts as dead: this runs before this process saves anything, and after a container restart a
    # new process often gets the pid of the one that was killed.
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process: assume it is writing
    return True


def non_finite_tensors(state: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors of `state["model"]` and of the optimiser state that hold NaN or inf."""
    bad = []
    for name, t in (state.get("model") or {}).items():
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad.append(f"model.{name}")
    for param_id, param_state in ((state.get("optimizer") or {}).get("state") or {}).items():
        for key, t in param_state.items():
            if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad.append(f"optimizer.state[{param_id}].{key}")
            elif isinstance(t, float) and not math.isfinite(t):
                bad.append(f"optimizer.state[{param_id}].{key}")
    return bad
