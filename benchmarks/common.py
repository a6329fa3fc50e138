"""What every benchmark shares: the machine line and writing its own section of docs/benchmarks.md."""
from __future__ import annotations

import os
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"


def machine() -> str:
    import torch

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def write_section(name: str, text: str, doc: Path = DOC) -> Path:
    """Replace (or append) the block between `<!-- name:begin -->` and `<!-- name:end -->` in `doc`
    (docs/benchmarks.md)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    doc = Path(doc)
    doc.parent.mkdir(exist_ok=True)
    current = doc.read_text() if doc.exists() else "# detkit benchmarks\n\nEvery figure here comes from a script in " \
        "`benchmarks/`, run on the machine named beside it.\n"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in current:
        head, rest = current.split(begin, 1)
        current = head + block + rest.split(end, 1)[1]
    else:
        current = current.rstrip() + "\n\n" + block + "\n"
    doc.write_text(current)
    return doc
