"""Kill training at every point of a step and of a checkpoint save, damage its run folder in every way listed below,
resume with `detkit train --resume`, and check that the run ends bit-identical to an uninterrupted one.

Kills (each a real signal to a real process; the exact points come from tests/engine/crash_driver.py):
- step@K for every iteration K, and mid-write / after-sidecar / after-rename / after-save at every save
  (the periodic ones and model_final.pth);
- 5 SIGKILLs from outside at random moments (an iteration from random.Random(6), then a random delay);
- the race: SIGKILL from outside as soon as a checkpoint's temporary file appears (polled every 2 ms);
- SIGTERM and SIGUSR1 from outside, sent to the whole process group.
Faults, on a run folder killed right after its save at iteration 6: a truncated, empty, bit-flipped or garbage
latest checkpoint, one holding a pickle payload, every checkpoint damaged, a pointer to a deleted file or to
`../x`, stale temporary files, a checkpoint of another detkit version, a changed config and a changed dataset.

Usage: python benchmarks/resilience.py [--out docs/resilience.md] [--quick] [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from common import ROOT, machine  # noqa: E402 (benchmarks/ is the script dir)

sys.path.insert(0, str(ROOT / "tests" / "engine"))
from crash_driver import (ENV, checkpoint_name, final_differences, finish, kill_group, last_state,  # noqa: E402
                          metrics_iterations, run, start, train_command, wait_for_iteration)

TIMEOUT = 1200.0  # one training subprocess (~6 s unloaded); only a hang comes near it
ITERATIONS, PERIOD = 8, 2  # fast_config's schedule
_PID = re.compile(r"\.\d+\.tmp\b")
_TEMPORARY = re.compile(r"\..+\.\d+\.tmp")


@dataclass
class Row:
    case: str
    kill_rc: str  # the interrupted run's exit status; for a fault, what was done to the folder
    on_disk: str
    resume_rc: int | None
    resume_did: str
    identical: str
    seconds: str


class Payload:
    """Pickles to "create this marker file": a checkpoint carrying it must be refused, never run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


# -- describing a run folder and a resume ----------------------------------------------------------------------
def _label(name: str) -> str:
    """model_0000004.pth -> 4, model_final.pth -> final."""
    match = re.fullmatch(r"model_(\d+|final)\.pth", name)
    if not match:
        return name
    return match.group(1) if match.group(1) == "final" else str(int(match.group(1)))


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def describe(run_dir: Path) -> str:
    """What a run folder holds after a kill: pointer, checkpoints (verified), temporary files, orphan checksums,
    the logged iterations."""
    from detkit.engine.checkpoint import verify_checkpoint

    if not run_dir.is_dir():
        return "no run folder"
    names = sorted(p.name for p in run_dir.iterdir())
    parts = []
    pointer = run_dir / "last_checkpoint"
    parts.append(f"pointer {_label(pointer.read_text(errors='replace').strip())}" if pointer.is_file()
                 else "no pointer")
    checkpoints = [n for n in names if re.fullmatch(r"model_(\d+|final)\.pth", n)]
    shown = []
    for name in checkpoints:
        problem = verify_checkpoint(run_dir / name)
        shown.append(_label(name) + ("" if problem is None else f" (bad: {re.split('[:;]', problem)[0]})"))
    parts.append("checkpoints " + (", ".join(shown) if shown else "none"))
    sizes = {n: (run_dir / n).stat().st_size for n in checkpoints}
    full = max(sizes.values(), default=0)
    for name in names:
        if _TEMPORARY.fullmatch(name):
            size = (run_dir / name).stat().st_size
            whole = f" of {_mb(full)}" if full and name.startswith(".model_") and ".sha256." not in name else ""
            parts.append(f"temp {_PID.sub('.PID.tmp', name)} ({_mb(size)}{whole})")
    for name in names:
        if name.endswith(".sha256") and name[:-len(".sha256")] not in names:
            parts.append(f"orphan {name}")
    logged = metrics_iterations(run_dir)
    parts.append(f"logged {logged[0]}-{logged[-1]}" if logged else "nothing logged")
    return "; ".join(parts)


def _short(text: str, limit: int = 110, first_clause: bool = False) -> str:
    text = re.sub(r"(/[^\s:;,()]+)+/", "", text)  # paths -> file names
    text = _PID.sub(".PID.tmp", text)
    text = re.sub(r"checkpoint (model_\S+\.pth) is damaged: ", "", text)
    text = re.sub(r"checkpoint (model_\S+\.pth) ", "", text)
    if first_clause:
        text = re.split(r"; | \(damaged", text)[0]
    return text if len(text) <= limit else text[:limit - 3].rstrip() + "..."


def summarize_resume(output: str) -> str:
    """The lines of a resumed run's log that say what it did with the run folder."""
    said = []
    lines = output.splitlines()
    for i, line in enumerate(lines):
        message = line.split(": ", 1)[1] if re.match(r"(INFO|WARNING|ERROR) \S+: ", line) else line
        if match := re.match(r"removed (\S+), left behind by an interrupted save", message):
            said.append(f"removed {_PID.sub('.PID.tmp', match.group(1))}")
        elif match := re.match(r"cannot resume from (\S+) \((.*)\); falling back to (\S+)$", message):
            said.append(f"{_label(match.group(1))} rejected: {_short(match.group(2), 90, first_clause=True)}; "
                        f"fell back to {_label(match.group(3))}")
        elif match := re.match(r"resumed from (\S+) at iteration (\d+)", message):
            said.append(f"resumed from {Path(match.group(1)).name} at {match.group(2)}")
        elif message.startswith("nothing to resume"):
            said.append("nothing to resume: started from scratch")
        elif "was written by detkit" in message:
            said.append(_short(message))
        elif message.startswith(("config error: ", "error: ")):
            detail = [message] + [x.strip() for x in lines[i + 1:i + 4] if x.startswith(" ")]
            said.append(_short(" / ".join(detail), 240))
    if "Traceback" in output:
        said.append("TRACEBACK")
    return "; ".join(said) or "(no log line about the folder)"


# -- the runs --------------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, work: Path):
        self.work = work
        self.config = work / "cfg.yaml"
        self.reference: dict | None = None
        self.reference_seconds = 0.0
        self.rows: list[Row] = []

    def prepare(self) -> None:
        from detkit.config import dump_yaml
        from detkit.data.synth import generate
        from run_configs import fast_config

        synth = self.work / "synth"
        if not (synth / "annotations").is_dir():  # the same dataset as the tests' synth_root fixture
            generate(synth, {"train": 24, "val": 12}, seed=3, workers=1, min_size=96, max_size=160, max_objects=6,
                     crowd_fraction=0.25, exif_fraction=0.15, gray_fraction=0.15, png_fraction=0.2)
        cfg = fast_config(synth, self.work / "unused")
        cfg.data.num_workers = 2
        dump_yaml(cfg, self.config)
        started = time.perf_counter()
        rc, output = run(train_command(self.config, self.work / "reference"), self.work / "reference.log", TIMEOUT)
        if rc != 0:
            raise SystemExit(f"the reference run failed ({rc}):\n{output}")
        self.reference = last_state(self.work / "reference")  # model_final.pth holds the weights alone
        self.reference_seconds = time.perf_counter() - started
        print(f"reference run: {self.reference_seconds:.1f} s", flush=True)

    def _resume(self, run_dir: Path, log: Path, *extra: str) -> tuple[int, str, str, float]:
        started = time.perf_counter()
        rc, output = run(train_command(self.config, run_dir, *extra, resume=True), log, TIMEOUT)
        seconds = time.perf_counter() - started
        if rc != 0:
            identical = "n/a (resume failed)"
        else:
            differences = final_differences(self.reference, run_dir)
            logged = metrics_iterations(run_dir)
            if differences:
                identical = f"NO: {', '.join(differences[:3])}"
            elif logged != list(range(1, ITERATIONS + 1)):
                identical = f"NO: metrics iterations {logged}"
            else:
                identical = "yes"
        return rc, output, identical, seconds

    def _add(self, row: Row) -> None:
        self.rows.append(row)
        print(" | ".join(str(x) for x in (row.case, row.kill_rc, row.on_disk, row.resume_rc, row.resume_did,
                                          row.identical, row.seconds)), flush=True)

    def kill_case(self, case: str, interrupt: Callable[[Path, Path], int]) -> None:
        """`interrupt(run_dir, log)` runs training and stops it somehow, returning the exit status; then resume."""
        folder = self.work / "cases" / re.sub(r"[^\w.-]+", "_", case)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        run_dir = folder / "run"
        started = time.perf_counter()
        try:
            rc = interrupt(run_dir, folder / "killed.log")
        except TimeoutError as e:
            self._add(Row(case, "timeout", str(e), None, "", "n/a", ""))
            return
        killed_seconds = time.perf_counter() - started
        said = (folder / "killed.log").read_text(errors="replace")
        kill_rc = str(rc)
        if rc == 0:
            stopped = re.search(r"stopped by (\S+) at iteration (\d+)", said)
            kill_rc += f" (stopped by {stopped.group(1)} at {stopped.group(2)})" if stopped else " (finished first)"
        if "Traceback" in said:
            kill_rc += " TRACEBACK"
        on_disk = describe(run_dir)
        resume_rc, output, identical, seconds = self._resume(run_dir, folder / "resume.log")
        self._add(Row(case, kill_rc, on_disk, resume_rc, summarize_resume(output), identical,
                      f"{killed_seconds:.1f} + {seconds:.1f}"))
        shutil.rmtree(run_dir, ignore_errors=True)

    # ways to interrupt a run
    def driver(self, point: str) -> Callable[[Path, Path], int]:
        def interrupt(run_dir: Path, log: Path) -> int:
            return finish(start(train_command(self.config, run_dir, point=point), log), TIMEOUT)
        return interrupt

    def external(self, iteration: int, delay: float, signum: int = signal.SIGKILL,
                 group: bool = False) -> Callable[[Path, Path], int]:
        def interrupt(run_dir: Path, log: Path) -> int:
            proc = start(train_command(self.config, run_dir), log)
            try:
                if wait_for_iteration(proc, run_dir, iteration, TIMEOUT):
                    time.sleep(delay)
                    if group:
                        kill_group(proc, signum)
                    else:
                        proc.send_signal(signum)
            finally:
                rc = finish(proc, TIMEOUT)
            return rc
        return interrupt

    def race(self, save: int | str) -> Callable[[Path, Path], int]:
        """SIGKILL as soon as a temporary file of checkpoint `save` appears."""
        prefix = "." + checkpoint_name(save)
        after = ITERATIONS - 1 if save == "final" else int(save) - 1

        def interrupt(run_dir: Path, log: Path) -> int:
            proc = start(train_command(self.config, run_dir), log)
            try:
                if after == 0 or wait_for_iteration(proc, run_dir, after, TIMEOUT):
                    deadline = time.monotonic() + TIMEOUT
                    while proc.poll() is None and time.monotonic() < deadline:
                        if run_dir.is_dir() and any(n.startswith(prefix) and n.endswith(".tmp")
                                                    for n in os.listdir(run_dir)):
                            proc.kill()
                            break
                        time.sleep(0.002)
            finally:
                rc = finish(proc, TIMEOUT)
            return rc
        return interrupt

    # faults on a run folder killed right after its save at 6
    def make_base(self) -> Path:
        base = self.work / "base" / "run"
        if not base.is_dir():
            base.parent.mkdir(parents=True, exist_ok=True)
            rc = self.driver("after-save@6")(base, base.parent / "killed.log")
            if rc != -signal.SIGKILL:
                raise SystemExit(f"after-save@6 did not kill the run ({rc}):\n"
                                 + (base.parent / "killed.log").read_text())
        return base

    def fault_case(self, case: str, damage: Callable[[Path], str], *extra: str,
                   check: Callable[[Path, str], str] | None = None) -> None:
        folder = self.work / "cases" / re.sub(r"[^\w.-]+", "_", case)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        run_dir = folder / "run"
        shutil.copytree(self.make_base(), run_dir)
        done = damage(run_dir)
        on_disk = describe(run_dir)
        rc, output, identical, seconds = self._resume(run_dir, folder / "resume.log", *extra)
        did = summarize_resume(output)
        if check is not None:
            did += check(folder, output)
        self._add(Row(case, done, on_disk, rc, did, identical, f"{seconds:.1f}"))
        shutil.rmtree(run_dir, ignore_errors=True)


# -- damage ----------------------------------------------------------------------------------------------------
LATEST = "model_0000006.pth"


def _truncate(run_dir: Path, name: str = LATEST) -> str:
    path = run_dir / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    return f"{_label(name)} cut to a third"


def _zero(run_dir: Path) -> str:
    (run_dir / LATEST).write_bytes(b"")
    return "6 emptied"


def _bitflip(run_dir: Path) -> str:
    path = run_dir / LATEST
    data = bytearray(path.read_bytes())
    i = int(len(data) * 0.6)
    data[i] ^= 0x01
    path.write_bytes(bytes(data))
    return f"6: bit 0 of byte {i:,} flipped"


def _garbage(run_dir: Path) -> str:
    path = run_dir / LATEST
    path.write_bytes(random.Random(0).randbytes(path.stat().st_size))
    return "6 overwritten with random bytes"


def _pickle(run_dir: Path) -> str:
    """A payload that would create a marker file when unpickled, with a matching checksum file: the checksum
    passes, so only the weights-only loader stands in the way."""
    import torch

    from detkit.engine.checkpoint import digest_path, file_sha256

    path = run_dir / LATEST
    torch.save({"model": {"w": torch.zeros(1)}, "payload": Payload(run_dir.parent / "code_ran")}, path)
    digest_path(path).write_text(f"{file_sha256(path)}  {path.name}\n")
    return "6 replaced by a pickle payload, checksum updated to match"


def _marker_check(folder: Path, output: str) -> str:
    return " (payload did NOT run)" if not (folder / "code_ran").exists() else " (PAYLOAD RAN)"


def _all_damaged(run_dir: Path) -> str:
    for name in ("model_0000002.pth", "model_0000004.pth", LATEST):
        _truncate(run_dir, name)
    return "2, 4 and 6 cut to a third"


def _deleted(run_dir: Path) -> str:
    (run_dir / LATEST).unlink()
    return "6 deleted (pointer and checksum file left)"


def _outside_pointer(run_dir: Path) -> str:
    import torch

    torch.save({"payload": Payload(run_dir.parent / "code_ran")}, run_dir.parent / "x")
    (run_dir / "last_checkpoint").write_text("../x")
    return "pointer set to ../x (a pickle payload outside the run folder)"


def _stale_temporaries(dead_pid: int) -> Callable[[Path], str]:
    def damage(run_dir: Path) -> str:
        data = (run_dir / LATEST).read_bytes()
        (run_dir / f".model_0000008.pth.{dead_pid}.tmp").write_bytes(data[: len(data) // 2])
        (run_dir / f".model_final.pth.sha256.{dead_pid}.tmp").write_bytes(b"0" * 10)
        return "temporary files of a dead pid added (half a checkpoint, a checksum)"
    return damage


def _old_live_temporary(run_dir: Path) -> str:
    # pid 1 is alive on every system; a temporary file two hours old is stale whoever holds the pid
    path = run_dir / ".model_0000008.pth.1.tmp"
    path.write_bytes(b"\0" * 1000)
    old = time.time() - 7200
    os.utime(path, (old, old))
    return "a 2-hour-old temporary file of a live pid (1) added"


def _other_version(run_dir: Path) -> str:
    from detkit.engine.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(run_dir / LATEST)
    state["detkit_version"] = "0.0.1"
    save_checkpoint(run_dir / LATEST, state)
    return "6 rewritten as detkit 0.0.1 wrote it"


def _dataset_copy_without_one_image(bench: Bench) -> Path:
    import yaml

    cfg = yaml.safe_load(bench.config.read_text())
    data = json.loads(Path(cfg["data"]["train"]["annotations"]).read_text())
    dropped = data["images"].pop()
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != dropped["id"]]
    path = bench.work / "instances_train_minus_one.json"
    path.write_text(json.dumps(data))
    return path


def _nothing(what: str) -> Callable[[Path], str]:
    return lambda run_dir: what


# -- the report ------------------------------------------------------------------------------------------------
def _rows(results) -> list[str]:
    """One markdown table row per result, in the tables' column order."""
    return ["| " + " | ".join(_cell(x) for x in (r.case, r.kill_rc, r.on_disk, r.resume_rc, r.resume_did,
                                                 r.identical, r.seconds)) + " |" for r in results]


def _cell(value: object) -> str:
    return str("" if value is None else value).replace("|", "\\|").replace("\n", " / ")


def report(bench: Bench, kills: list[Row], faults: list[Row], wall: float, quick: bool) -> str:
    """docs/resilience.md: the setup, then one table of kills and one of faults."""
    import detkit

    good = sum(r.identical == "yes" for r in kills)
    lines = [
        "# Killing and resuming training",
        "",
        "Generated by `python benchmarks/resilience.py --out docs/resilience.md"
        + (" --quick" if quick else "") + f"` on {time.strftime('%Y-%m-%d')}, in {wall / 60:.1f} min.",
        f"Machine: {machine()}; detkit {detkit.__version__}.",
        "",
        "Every run is a subprocess: `tests/engine/crash_driver.py` (which SIGKILLs its own process at an exact "
        "point) or `python -m detkit train`, then `python -m detkit train CFG --resume` in the same folder. The "
        "config is the tests' `fast_config` (RetinaNet R18-FPN with a frozen trunk, 24 synthetic images, batch 4, "
        f"{ITERATIONS} iterations, a checkpoint every {PERIOD}, 3 kept, about 47 MB each), with 2 DataLoader "
        "workers and `runtime.deterministic: true`; every process has "
        + ", ".join(f"`{k}={v}`" for k, v in ENV.items()) + ".",
        "",
        "*Bit-identical* means: every tensor of `model_final.pth`'s `model` and `optimizer` state is `torch.equal` "
        "to that of an uninterrupted run, its iteration is the same, and `metrics.jsonl` logs iterations "
        f"1-{ITERATIONS} once each. *Seconds* are wall time of the interrupted run + the resumed one, at `nice 19` "
        f"on a shared machine, so they say little about speed (the uninterrupted run took "
        f"{bench.reference_seconds:.1f} s).",
        "",
        "Crash points (`crash_driver.py`): `step@K` dies inside optimiser step K after the backward pass; "
        "`mid-write@K` after writing and fsyncing half of checkpoint K's temporary file; `after-rename@K` once "
        "the data is renamed into place but before its checksum file is written; `after-sidecar@K` once the "
        "checksum file is in place too but `last_checkpoint` still names the previous checkpoint; `after-save@K` "
        "after the whole save and pruning. "
        f"Saves happen at iterations {', '.join(str(k) for k in range(PERIOD, ITERATIONS, PERIOD))} and at the end "
        "(`final`), so the write points apply there only.",
        "",
        f"## Kills: {good} of {len(kills)} resumed bit-identical",
        "",
        "| case | kill rc | on disk after the kill | resume rc | what resume did (log) | bit-identical | seconds |",
        "|---|---:|---|---:|---|---|---:|",
    ]
    lines += _rows(kills)
    lines += [
        "",
        "## Faults in the run folder",
        "",
        "Each starts from a copy of one run folder SIGKILLed right after its save at iteration 6 (`after-save@6`: "
        "pointer 6, checkpoints 2, 4, 6), damaged as the second column says, then resumed.",
        "",
        "| case | what was done | on disk before the resume | resume rc | what resume did (log or error) "
        "| bit-identical | seconds |",
        "|---|---|---|---:|---|---|---:|",
    ]
    lines += _rows(faults)
    lines += [
        "",
        "Not covered here (in-process tests in `tests/engine/test_resilience.py` and `test_checkpoint.py`): a full "
        "disk during a save, NaN losses and rollbacks, NaN weights at a save.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "resilience.md", help="the markdown to write")
    parser.add_argument("--quick", action="store_true", help="a few cases of each kind, to check the script")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one, deleted after)")
    args = parser.parse_args()
    started = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="detkit_resilience_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        bench = Bench(work)
        print(f"machine: {machine()}; working in {work}", flush=True)
        bench.prepare()
        saves: list[int | str] = [*range(PERIOD, ITERATIONS, PERIOD), "final"]
        rng = random.Random(6)
        externals = [(rng.randint(1, ITERATIONS - 1), round(rng.uniform(0.0, 0.3), 3)) for _ in range(5)]
        if args.quick:
            points = ["step@5", "mid-write@4", "after-sidecar@4", "after-rename@6", "after-save@final",
                      "final-mid-write"]
            externals, races = externals[:1], [4]
        else:
            points = [f"step@{k}" for k in range(1, ITERATIONS + 1)]
            points += [f"{p}@{k}" for p in ("mid-write", "after-sidecar", "after-rename", "after-save") for k in saves]
            races = saves
        for point in points:
            bench.kill_case(point, bench.driver(point))
        for k, delay in externals:
            bench.kill_case(f"external SIGKILL after iteration {k} + {delay:.3f} s", bench.external(k, delay))
        for save in races:
            bench.kill_case(f"external SIGKILL when a temp file of {_label(checkpoint_name(save))} appears",
                            bench.race(save))
        bench.kill_case("SIGTERM to the process group after iteration 3",
                        bench.external(3, 0.0, signal.SIGTERM, group=True))
        if not args.quick:
            bench.kill_case("SIGUSR1 to the process group after iteration 5",
                            bench.external(5, 0.0, signal.SIGUSR1, group=True))
        kills = bench.rows
        bench.rows = []

        bench.make_base()
        dead_pid = _dead_pid()
        faults: list[tuple] = [
            ("bit-flipped latest checkpoint", _bitflip, ()),
            ("pickle payload as the latest checkpoint", _pickle, (), _marker_check),
            ("changed config", _nothing("resumed with solver.base_lr=0.01 solver.steps=[5]"),
             ("solver.base_lr=0.01", "solver.steps=[5]")),
        ]
        if not args.quick:
            faults[1:1] = [
                ("truncated latest checkpoint", _truncate, ()),
                ("empty latest checkpoint", _zero, ()),
                ("garbage latest checkpoint", _garbage, ()),
            ]
            faults += [
                ("every checkpoint damaged", _all_damaged, ()),
                ("pointer to a deleted file", _deleted, ()),
                ("pointer to ../x", _outside_pointer, (), _marker_check),
                ("stale temporary files", _stale_temporaries(dead_pid), ()),
                ("old temporary file of a live pid", _old_live_temporary, ()),
                ("checkpoint of another detkit version", _other_version, ()),
                ("harmless config changes", _nothing("resumed with data.num_workers=0 runtime.checkpoint_period=3"),
                 ("data.num_workers=0", "runtime.checkpoint_period=3")),
                ("changed dataset", _nothing("resumed with one training image dropped from the JSON"),
                 (f"data.train.annotations={_dataset_copy_without_one_image(bench)}",)),
            ]
        for case, damage, extra, *check in faults:
            bench.fault_case(case, damage, *extra, check=check[0] if check else None)
        text = report(bench, kills, bench.rows, time.perf_counter() - started, args.quick)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


if __name__ == "__main__":
    main()
