"""Progress bars that appear on a terminal only, with log lines printed above them instead of through them."""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator, Sequence, TypeVar

T = TypeVar("T")


def on_terminal() -> bool:
    """Whether stderr, where bars and logs go, is a terminal (False for a pipe, a file or a closed stream)."""
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


def _terminal_size() -> tuple[int, int] | tuple[()]:
    """(columns, lines) as stderr's terminal reports them ((0, 0) when it reports none); () when unknown."""
    try:
        return tuple(os.get_terminal_size(sys.stderr.fileno()))
    except (AttributeError, OSError, ValueError):  # no file descriptor (io.UnsupportedOperation is an OSError)
        return ()


@contextlib.contextmanager
def progress_bar(total: int | None, desc: str, *, enabled: bool = True, unit: str = "it", initial: int = 0,
                 leave: bool = True) -> Iterator:
    """A tqdm bar on stderr, drawn only when `enabled` and stderr is a terminal; while it is open, console log
    records go through `tqdm.write` (`logging_redirect_tqdm`), so that they never land in the middle of a bar.

    Redirected output (a pipe, a log file) gets no bar at all: no carriage-return redraws, no escape codes.

    Args:
        total: the count the bar runs to (None: unknown).
        desc: the bar's label.
        enabled: False turns the bar off even on a terminal (`--no-progress`).
        unit, initial, leave: as tqdm's.

    Yields:
        The bar; when it is not drawn, a disabled tqdm whose methods do nothing (test `bar.disable`).
    """
    from tqdm import tqdm

    if not (enabled and on_terminal()):
        bar = tqdm(total=total, disable=True)
        try:
            yield bar
        finally:
            bar.close()
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    # tqdm draws nothing on a terminal that reports no size (a bare pseudo-terminal, some CI runners)
    size = {"ncols": 80, "nrows": 24} if 0 in _terminal_size() else {"dynamic_ncols": True}
    with logging_redirect_tqdm():
        bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=leave, file=sys.stderr, **size)
        try:
            yield bar
        finally:
            bar.close()


def track(items: Sequence[T], desc: str, *, enabled: bool = True, unit: str = "it") -> Iterator[T]:
    """Iterate over `items` with a `progress_bar` that counts them."""
    with progress_bar(len(items), desc, enabled=enabled, unit=unit) as bar:
        for item in items:
            yield item
            bar.update()


def write_above_bars(message: str) -> None:
    """Print a line to stderr; while a bar is drawn, above it (a plain print would land in the bar's line)."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)
