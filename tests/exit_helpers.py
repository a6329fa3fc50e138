"""Run a command in a subprocess and watch it end: when each output line came, when the process exited, and which
of its descendants (DataLoader workers, torchrun's ranks) outlived it. Not a test module; tests/test_exits.py
uses it.

Linux only: descendants are found through /proc/<pid>/task/*/children.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

LINGER_S = 10.0  # a command must have exited this long after its last output line
QUIET_S = 60.0  # alive and silent this long: stop waiting (no tiny run is silent for so long; a hang is)
TIMEOUT_S = 300.0  # the most one tiny run may take in all, on a loaded 2-core machine
GONE_S = 15.0  # a process's descendants must be gone this long after it ended
# Unbuffered output, so that a line's arrival time is when it was printed (as on a terminal), not when a pipe
# buffer happened to be flushed; one thread each, so that these runs disturb the machine little.
ENV = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def detkit_module() -> list[str]:
    """`python -m detkit` with this interpreter."""
    return [sys.executable, "-m", "detkit"]


def detkit_script() -> str:
    """The installed `detkit` console script: beside this interpreter (a virtual environment), else on PATH."""
    beside = Path(sys.executable).with_name("detkit")
    found = str(beside) if beside.is_file() else shutil.which("detkit")
    if found is None:
        raise FileNotFoundError("no installed `detkit` console script beside the interpreter or on PATH")
    return found


def without_cyclic_gc(folder: Path) -> dict[str, str]:
    """Environment variables under which Python processes run without the cyclic garbage collector: a
    sitecustomize.py written to `folder` (put first on PYTHONPATH) disables it at start-up.

    Objects in reference cycles are then still alive when the interpreter exits, as they often are after a long
    run, whose old objects the collector seldom visits: a loader's workers kept alive that way hang the exit. A
    run of a few steps would otherwise pass or fail on whether the collector happened to run before the end.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text("import gc\n\ngc.disable()  # tests/exit_helpers.py without_cyclic_gc\n")
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": str(folder) if not path else f"{folder}{os.pathsep}{path}"}


# -- processes under /proc ----------------------------------------------------------------------------------------
def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of `pid`, or None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ": field 3 onwards
    return fields[0], int(fields[19])


def descendants(pid: int) -> dict[int, int]:
    """Every live descendant of `pid`, as {pid: start time}; the start time tells a reused pid apart."""
    found: dict[int, int] = {}
    todo = [pid]
    while todo:
        parent = todo.pop()
        for children in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                pids = [int(p) for p in children.read_text().split()]
            except (FileNotFoundError, ProcessLookupError):
                continue
            for child in pids:
                stat = _stat(child)
                if stat is not None and child not in found:
                    found[child] = stat[1]
                    todo.append(child)
    return found


def alive(pid: int, start: int) -> bool:
    """Whether the process `pid` that started at `start` still runs (a zombie has ended: only its entry is left)."""
    stat = _stat(pid)
    return stat is not None and stat[1] == start and stat[0] not in ("Z", "X")


def wait_gone(processes: dict[int, int], timeout: float = GONE_S) -> list[int]:
    """Wait until none of `processes` ({pid: start time}) runs; return the pids still running after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        left = [pid for pid, start in processes.items() if alive(pid, start)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


# -- a watched command --------------------------------------------------------------------------------------------
@dataclass
class Line:
    at: float  # time.monotonic() when it was read
    stream: str  # "stdout" or "stderr"
    text: str


class Watched:
    """A command in its own session (process group), its stdout and stderr read line by line as they come.

    Use it as a context manager: on leaving, whatever of the group still runs is killed, so a hang fails a test
    instead of hanging the suite. `finish()` waits for the end and records when it came; `descendants` holds
    every descendant seen while the command ran ({pid: start time}), sampled every 0.1 s.
    """

    def __init__(self, command: Sequence[str], *, cwd: str | Path, env: dict[str, str] | None = None):
        self.command = [str(c) for c in command]
        self.proc = subprocess.Popen(self.command, cwd=cwd, env={**os.environ, **ENV, **(env or {})},
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, errors="replace", start_new_session=True)
        self.started_at = time.monotonic()
        self.exited_at: float | None = None  # when it was seen to have exited on its own
        self.killed = False  # whether it was still running when the tests killed it
        self.lines: list[Line] = []
        self.descendants: dict[int, int] = {}
        self._changed = threading.Condition()
        # daemon threads: a descendant that outlives the command keeps the pipes open, and must not block the tests
        self._readers = [threading.Thread(target=self._read, args=(stream, name), daemon=True)
                         for stream, name in ((self.proc.stdout, "stdout"), (self.proc.stderr, "stderr"))]
        for reader in self._readers:
            reader.start()

    def _read(self, stream, name: str) -> None:
        for text in iter(stream.readline, ""):
            with self._changed:
                self.lines.append(Line(time.monotonic(), name, text.rstrip("\r\n")))
                self._changed.notify_all()

    def __enter__(self) -> "Watched":
        return self

    def __exit__(self, *exc) -> None:
        if not self.poll():
            self._kill()
        if any(alive(p, s) for p, s in self.descendants.items()):
            self.kill_group(signal.SIGKILL)
        self.proc.wait()
        for reader in self._readers:
            reader.join(timeout=2)

    def kill_group(self, signum: int) -> None:
        """Send `signum` to the command's whole process group (as Ctrl-C or a job scheduler does)."""
        try:
            os.killpg(self.proc.pid, signum)
        except ProcessLookupError:
            pass

    def _kill(self) -> None:
        self.killed = True
        self.kill_group(signal.SIGKILL)
        self.proc.wait()

    def poll(self) -> bool:
        """Record the descendants now and whether the command has exited on its own; return whether it has."""
        if self.exited_at is None and not self.killed:
            self.descendants.update(descendants(self.proc.pid))
            if self.proc.poll() is not None:
                self.exited_at = time.monotonic()
        return self.exited_at is not None

    @property
    def last_line_at(self) -> float:
        with self._changed:
            return self.lines[-1].at if self.lines else self.started_at

    def output(self, tail: int = 6000) -> str:
        """The output so far, both streams interleaved as read, each line marked with its time since the start."""
        with self._changed:
            text = "\n".join(f"[{line.at - self.started_at:6.1f} s {line.stream}] {line.text}" for line in self.lines)
        return text[-tail:]

    def wait_for_line(self, pattern: str, timeout: float = TIMEOUT_S) -> Line | None:
        """The first line matching `pattern` (a regex), waiting for it until `timeout` or the command's end."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            with self._changed:
                for line in self.lines[seen:]:
                    if regex.search(line.text):
                        return line
                seen = len(self.lines)
                self._changed.wait(0.1)
            if self.poll() or time.monotonic() > deadline:
                with self._changed:  # a matching line may have come with the end
                    return next((line for line in self.lines[seen:] if regex.search(line.text)), None)

    def finish(self, timeout: float = TIMEOUT_S, quiet: float = QUIET_S) -> bool:
        """Wait for the command to exit: at most `timeout` from its start, or `quiet` after its last output line.
        Returns whether it exited; if it did not, its group is killed (`exited_at` stays None)."""
        deadline = self.started_at + timeout
        while not self.poll():
            now = time.monotonic()
            if self.killed or now > deadline or now - self.last_line_at > quiet:
                if not self.killed:
                    self._kill()
                return False
            time.sleep(0.1)
        for reader in self._readers:  # the last lines, if nothing else holds the pipes
            reader.join(timeout=2)
        return True

    def linger(self) -> float:
        """Seconds from the last output line to the exit (call after `finish()` returned True)."""
        assert self.exited_at is not None
        return self.exited_at - self.last_line_at


def assert_exits_promptly(run: Watched, *, returncode: int | None = 0, linger: float = LINGER_S) -> None:
    """Wait for `run` and assert that it exited no later than `linger` seconds after its last output line, with
    `returncode` (None: any non-zero status), and that none of its descendants outlived it by more than GONE_S."""
    exited = run.finish()
    where = f"{' '.join(run.command)}\n{run.output()}"
    assert exited, f"still running {time.monotonic() - run.last_line_at:.0f} s after its last line:\n{where}"
    assert run.linger() < linger, f"exited {run.linger():.1f} s after its last line:\n{where}"
    if returncode is None:
        assert run.proc.returncode != 0, where
    else:
        assert run.proc.returncode == returncode, f"exit status {run.proc.returncode}:\n{where}"
    left = wait_gone(run.descendants)
    assert not left, f"processes {left} outlived the command by {GONE_S:.0f} s:\n{where}"
