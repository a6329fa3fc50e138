"""File writing that never leaves half a file behind."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, BinaryIO, Callable


def write_atomic(path: str | Path, write: Callable[[BinaryIO], Any]) -> Path:
    """Call `write(f)` on a temporary file beside `path`, fsync it, then rename it over `path`: readers see the
    old file or the whole new one, never half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
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
