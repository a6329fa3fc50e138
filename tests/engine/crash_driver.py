"""Run `detkit` and SIGKILL it at an exact point of training or of a checkpoint save, plus the helpers that the
kill-and-resume tests and benchmarks/resilience.py share. Not a test module.

Usage:
    python tests/engine/crash_driver.py POINT [K] -- train CFG [overrides] [--output-dir DIR] ...

POINT is one of (K is an iteration, or `final` for model_final.pth; `step@5` is the same as `step 5`):
    step@K            inside optimiser step K: after the backward pass, before the optimiser updates the weights
    mid-write@K       half of model_K's bytes written to its temporary file and fsynced
    after-rename@K    model_K.pth renamed into place, its checksum file not yet written
    after-sidecar@K   model_K.pth and its checksum file in place, `last_checkpoint` not yet updated
    after-save@K      model_K.pth saved completely: checksum, data, pointer, pruning
    final-mid-write   the same as mid-write@final

The driver patches functions in its own process only, then calls `detkit.cli.main`; detkit itself has no
fault-injection hooks. It dies by `os.kill(os.getpid(), SIGKILL)`, so no `finally` block, atexit handler or buffer
flush runs: the run folder is left exactly as a power cut of the process would leave it. When the point is never
reached the driver prints why and exits with NOT_REACHED.
"""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

NOT_REACHED = 97  # exit status when training ended without passing the crash point
POINTS = ("step", "mid-write", "after-sidecar", "after-rename", "after-save")
# Every subprocess of the kill tests runs with this environment: oneDNN results can depend on the thread count,
# and a hash seed makes any dependence on set order fail the same way every time.
ENV = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "PYTHONHASHSEED": "0"}
DRIVER = Path(__file__).resolve()


# -- the driver ------------------------------------------------------------------------------------------------
def parse_point(words: Sequence[str]) -> tuple[str, int | str]:
    """`["step@5"]`, `["step", "5"]` or `["final-mid-write"]` -> ("step", 5), ("mid-write", "final")."""
    text = "@".join(words)
    if text == "final-mid-write":
        return "mid-write", "final"
    point, _, k = text.partition("@")
    if point not in POINTS or not k:
        raise SystemExit(f"crash_driver: unknown crash point {text!r}; expected one of "
                         f"{', '.join(p + '@K' for p in POINTS)}, final-mid-write")
    if k == "final":
        if point == "step":
            raise SystemExit("crash_driver: step@K needs an iteration number")
        return point, k
    return point, int(k)


def checkpoint_name(k: int | str) -> str:
    return "model_final.pth" if k == "final" else f"model_{int(k):07d}.pth"


def _die(where: str) -> None:
    sys.stderr.write(f"crash_driver: SIGKILL at {where}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # SIGKILL is delivered before this returns; never fall through into detkit again


def _real_file(f: Any) -> Any:
    """The OS-level file under detkit's stream wrappers (they keep it as `.f`)."""
    seen = 0
    while not hasattr(f, "fileno") and hasattr(f, "f") and seen < 8:
        f, seen = f.f, seen + 1
    return f


def install(point: str, k: int | str) -> None:
    """Patch this process so that it SIGKILLs itself at `point` for iteration (or `final`) `k`."""
    import torch

    from detkit.engine.trainer import Trainer

    target = checkpoint_name(k)
    where = f"{point}@{k}"
    if point == "step":
        trainers: list[Trainer] = []
        train, scaler_step = Trainer.train, torch.amp.GradScaler.step

        def train_and_remember(self, *args, **kwargs):
            trainers.append(self)
            return train(self, *args, **kwargs)

        def step_or_die(self, optimizer, *args, **kwargs):
            # the trainer counts an iteration once its step is done, so step K runs while iteration is K - 1
            if trainers and trainers[-1].iteration + 1 == k:
                _die(where)
            return scaler_step(self, optimizer, *args, **kwargs)

        Trainer.train, torch.amp.GradScaler.step = train_and_remember, step_or_die
    elif point == "mid-write":
        temporary = re.compile(rf"\.{re.escape(target)}\.\d+\.tmp")
        save = torch.save

        def save_half_then_die(obj, f, *args, **kwargs):
            real = _real_file(f)
            if not temporary.fullmatch(Path(str(getattr(real, "name", ""))).name):
                return save(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            f.write(data[:len(data) // 2])
            f.flush()
            os.fsync(real.fileno())
            _die(where)

        torch.save = save_half_then_die
    elif point in ("after-sidecar", "after-rename"):
        replace = os.replace

        # the data is renamed first, then its checksum file: die right after the one the point names
        renamed = target + ".sha256" if point == "after-sidecar" else target

        def replace_and_maybe_die(src, dst, *args, **kwargs):
            result = replace(src, dst, *args, **kwargs)
            if Path(dst).name == renamed:
                _die(where)
            return result

        os.replace = replace_and_maybe_die
    else:  # after-save
        trainer_save = Trainer.save

        def save_then_die(self, *args, **kwargs):
            path = trainer_save(self, *args, **kwargs)
            if Path(path).name == target:
                _die(where)
            return path

        Trainer.save = save_then_die


def main(argv: Sequence[str]) -> int:
    if "--" not in argv:
        raise SystemExit(__doc__)
    split = list(argv).index("--")
    point, k = parse_point(argv[:split])
    install(point, k)
    from detkit.cli import main as detkit_main

    rc = detkit_main(list(argv[split + 1:]))
    sys.stderr.write(f"crash_driver: {point}@{k} was never reached (detkit returned {rc})\n")
    return NOT_REACHED


# -- helpers for the tests and the benchmark --------------------------------------------------------------------
def environment() -> dict[str, str]:
    """os.environ with the fixed thread count and hash seed of `ENV`."""
    return {**os.environ, **ENV}


def train_command(config: str | Path, run_dir: str | Path, *overrides: str, resume: bool = False,
                  point: str | None = None) -> list[str]:
    """The command line of `detkit train` (`--resume` last, so that it never takes an override for its optional
    checkpoint argument), through the crash driver when `point` is given."""
    args = ["train", str(config), *overrides, "--output-dir", str(run_dir), "--no-progress"]
    args += ["--resume"] if resume else []
    if point is None:
        return [sys.executable, "-m", "detkit", *args]
    return [sys.executable, str(DRIVER), point, "--", *args]


def start(command: list[str], log: str | Path) -> subprocess.Popen:
    """Start `command` in a new session (its own process group), stdout and stderr into `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=environment(), start_new_session=True)


def kill_group(proc: subprocess.Popen, signum: int = signal.SIGKILL) -> None:
    """Signal the process group that `start` created for `proc` (the process and its DataLoader workers)."""
    try:
        os.killpg(proc.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def finish(proc: subprocess.Popen, timeout: float) -> int:
    """Wait for `proc`; on timeout SIGKILL its group and raise TimeoutError. DataLoader workers that outlive a
    killed parent (they notice within seconds) are killed with the group. Returns the exit status."""
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        proc.wait()
        raise TimeoutError(f"{' '.join(map(str, proc.args))} did not finish within {timeout:.0f} s") from None
    kill_group(proc)
    return rc


def run(command: list[str], log: str | Path, timeout: float = 180.0) -> tuple[int, str]:
    """Run `command` to the end; returns (exit status, its output)."""
    rc = finish(start(command, log), timeout)
    return rc, Path(log).read_text(errors="replace")


def metrics_iterations(run_dir: str | Path) -> list[int]:
    """The iterations logged in `run_dir/metrics.jsonl`, in file order (complete lines only)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    found = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            found.append(int(json.loads(line)["iteration"]))
        except (ValueError, KeyError, TypeError):
            continue
    return found


def wait_for_iteration(proc: subprocess.Popen, run_dir: str | Path, iteration: int, timeout: float,
                       poll: float = 0.02) -> bool:
    """Poll metrics.jsonl until `iteration` is logged (True), or the process exits or time runs out (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if iteration in metrics_iterations(run_dir):
            return True
        time.sleep(poll)
    return False


def state_differences(expected: Any, actual: Any, where: str = "") -> list[str]:
    """Paths inside two nested checkpoint values where they differ; tensors must be `torch.equal` (and of the
    same dtype), everything else `==`."""
    import torch

    if torch.is_tensor(expected) or torch.is_tensor(actual):
        same = (torch.is_tensor(expected) and torch.is_tensor(actual) and expected.dtype == actual.dtype
                and torch.equal(expected, actual))
        return [] if same else [where or "<root>"]
    if isinstance(expected, dict) and isinstance(actual, dict):
        if set(expected) != set(actual):
            return [f"{where}: keys {sorted(map(str, set(expected) ^ set(actual)))[:5]}"]
        return [d for key in expected for d in state_differences(expected[key], actual[key], f"{where}.{key}")]
    if isinstance(expected, (list, tuple)) and isinstance(actual, (list, tuple)):
        if len(expected) != len(actual):
            return [f"{where}: length {len(expected)} vs {len(actual)}"]
        return [d for i, (a, b) in enumerate(zip(expected, actual)) for d in state_differences(a, b, f"{where}[{i}]")]
    return [] if expected == actual else [where or "<root>"]


def last_state(run_dir: str | Path) -> dict:
    """The training state a finished run ends with: the checkpoint `last_checkpoint` names (model_final.pth holds
    the weights alone)."""
    import torch

    name = (Path(run_dir) / "last_checkpoint").read_text()
    return torch.load(Path(run_dir) / name, map_location="cpu", weights_only=True)


def final_differences(reference: dict, run_dir: str | Path) -> list[str]:
    """How the run in `run_dir` ended differently from `reference` (a finished run's `last_state`): the model,
    optimiser and iteration of its last training checkpoint, and the weights of its model_final.pth; [] when
    bit-identical."""
    import torch

    path = Path(run_dir) / "model_final.pth"
    if not path.is_file():
        return ["model_final.pth is missing"]
    final = torch.load(path, map_location="cpu", weights_only=True)
    state = last_state(run_dir)
    return (state_differences(reference["model"], final["model"], "model_final.model")
            + state_differences(reference["model"], state["model"], "model")
            + state_differences(reference["optimizer"], state["optimizer"], "optimizer")
            + state_differences(reference["iteration"], state["iteration"], "iteration"))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
