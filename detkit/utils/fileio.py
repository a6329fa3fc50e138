"""File writing that never leaves half a file behind."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, BinaryIO, Callable


def temporary_name(path: str | Path) -> Path:
    """The temporary file `write_atomic` fills before renaming it to `path`: `.NAME.PID.tmp` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_atomic(path: str | Path, write: Callable[[BinaryIO], Any],
                 before_rename: Callable[[Path], Any] | None = None) -> Path:
    """Call `write(f)` on a temporary file beside `path`, fsync it, then rename it over `path`: readers see the
    old file or the whole new one, never half of it.

    Args:
        path: the file to write.
        write: fills the open binary file.
        before_rename: called with the complete, fsynced temporary file just before it is renamed (e.g. to write a
            checksum of it first). If it raises, `path` is left as it was.
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_bytes_atomic(data: bytes, path: str | Path) -> Path:
    """`data` at `path`, atomically."""
    return write_atomic(path, lambda f: f.write(data))


def write_json_atomic(obj: Any, path: str | Path) -> Path:
    """`obj` as compact JSON at `path`, atomically."""
    return write_bytes_atomic(json.dumps(obj, separators=(",", ":")).encode(), path)
