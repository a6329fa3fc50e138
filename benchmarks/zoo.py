"""Benchmark every shipped config, one `detkit benchmark` process each, then render docs/MODEL_ZOO.md.

    python benchmarks/zoo.py --device cpu --train-batch 2 --iters 1 --warmup 1 --batch-sizes 1
    python benchmarks/zoo.py --device cuda                      # the configs' own batches, default iterations

Each config runs in its own process, so each memory peak is its own and one failure (a crash, the kernel's
out-of-memory killer, a time-out, or a record whose training ran out of CUDA memory) costs only that config: it
is retried once at half the training batch (unless it was a config error), then reported, and the sweep goes on.
Records go to `--records` as `<config>__<device>.json`; with `--skip-existing` a config whose record matches its
current hash and this sweep's settings is not measured again. Logs: `--logs`/<config>.log.
Exit status: 0 when every config has a record, 1 otherwise.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="configs/*.yaml", help="glob of configs, relative to the repository")
    p.add_argument("--exclude", nargs="+", default=[], metavar="GLOB",
                   help="config file names to leave out (e.g. '*fp16*' on a CPU without float16 arithmetic)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--train-batch", type=int, help="training images per step (default: the benchmark's choice)")
    p.add_argument("--iters", type=int, help="timed iterations per phase (default: the benchmark's)")
    p.add_argument("--warmup", type=int, help="untimed iterations first (default: the benchmark's)")
    p.add_argument("--batch-sizes", nargs="+", type=int, help="inference batches (default: the benchmark's)")
    p.add_argument("--size", nargs=2, type=int, metavar=("H", "W"), help="replace the input size (quick runs)")
    p.add_argument("--records", default=str(ROOT / "benchmarks" / "records"), help="folder of the JSON records")
    p.add_argument("--logs", default=str(ROOT / "runs" / "zoo-logs"), help="folder of one log per config")
    p.add_argument("--out", default=str(ROOT / "docs" / "MODEL_ZOO.md"), help="the rendered zoo page")
    p.add_argument("--skip-existing", action="store_true", help="keep records whose config hash is current")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds one config may take")
    return p.parse_args(argv)


def device_slug(device: str) -> str:
    import torch

    from detkit.engine.environment import device_slug as slug, environment

    return slug(environment(torch.device(device))["device"])


def current_record(path: Path, config: Path, args: argparse.Namespace | None = None) -> bool:
    """Whether `path` is a record of `config` as it is now: the same hash, no overrides, the config's own size,
    and the same training batch and iteration counts as this sweep asks for."""
    if not path.exists():
        return False
    from detkit.config import Config
    from detkit.config.load import load_config
    from detkit.engine.zoo import config_hash

    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    stored, train = record.get("config", {}), record.get("train") or {}
    if args is not None:
        asked = {"batch": args.train_batch, "iters": args.iters, "warmup": args.warmup}
        if any(value is not None and train.get(key) != value for key, value in asked.items()):
            return False
    return (not stored.get("overrides") and not record.get("settings", {}).get("size")
            and stored.get("sha256") == config_hash(load_config(Config, config)))


def benchmark_command(config: Path, out: Path, args: argparse.Namespace, train_batch: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "detkit", "benchmark", str(config), "--device", args.device, "--json", str(out)]
    for flag, value in (("--train-batch", train_batch), ("--iters", args.iters), ("--warmup", args.warmup)):
        if value is not None:
            cmd += [flag, str(value)]
    if args.batch_sizes:
        cmd += ["--batch-sizes", *map(str, args.batch_sizes)]
    if args.size:
        cmd += ["--size", *map(str, args.size)]
    return cmd


def _training_oom(out: Path) -> int | None:
    """The training batch of a record whose training ran out of (CUDA) memory, else None."""
    try:
        train = json.loads(out.read_text()).get("train") or {}
    except (OSError, ValueError):
        return None
    return train.get("batch") if train.get("error") == "oom" else None


def run_one(config: Path, out: Path, log: Path, args: argparse.Namespace) -> tuple[bool, str]:
    """Benchmark `config` into `out`; when it fails or its training runs out of memory, retry once at half the
    training batch. Returns (a record was written, what happened)."""
    attempts = [args.train_batch]
    what = ""
    for attempt in range(2):
        train_batch = attempts[attempt]
        cmd = benchmark_command(config, out, args, train_batch)
        start = time.perf_counter()
        with open(log, "a") as handle:
            handle.write(f"$ {' '.join(cmd)}\n")
            handle.flush()
            try:
                rc = subprocess.run(cmd, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
                                    timeout=args.timeout).returncode
            except subprocess.TimeoutExpired:
                rc = None
        seconds = time.perf_counter() - start
        oom_batch = _training_oom(out) if rc == 0 else None
        if rc == 0 and (oom_batch is None or oom_batch <= 1 or attempt):
            retried = f" (training batch {train_batch} after a failure)" if attempt else ""
            return True, f"{seconds:.0f} s{retried}" + (", training out of memory" if oom_batch else "")
        if rc == 2:  # a config or usage error: a smaller batch would not help
            return False, "exit 2 (config error)"
        what = ("training out of memory" if rc == 0 else f"timed out after {args.timeout:.0f} s" if rc is None
                else f"killed by signal {-rc} (out of memory?)" if rc < 0 else f"exit {rc}")
        batch = oom_batch or train_batch or _config_batch(config)
        if attempt or batch <= 1:
            break
        attempts.append(max(1, batch // 2))
        print(f"  {config.stem}: {what}; retrying at training batch {attempts[-1]}", flush=True)
    return False, what


def _config_batch(config: Path) -> int:
    from detkit.config import Config
    from detkit.config.load import load_config

    return load_config(Config, config).data.batch_size


def main(argv=None) -> int:
    args = parse_args(argv)
    pattern = Path(args.configs)
    if pattern.is_absolute():
        pattern = pattern.relative_to(ROOT) if pattern.is_relative_to(ROOT) else None
    if pattern is None:
        print(f"--configs must lie inside {ROOT}, got {args.configs}", file=sys.stderr)
        return 2
    configs = sorted(p for p in ROOT.glob(str(pattern)) if fnmatch.fnmatch(p.name, "*.yaml")
                     and not any(fnmatch.fnmatch(p.name, glob) for glob in args.exclude))
    if not configs:
        print(f"no config matches {args.configs}", file=sys.stderr)
        return 2
    records, logs = Path(args.records), Path(args.logs)
    records.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    slug = device_slug(args.device)
    failed, start = [], time.perf_counter()
    for k, config in enumerate(configs, 1):
        out = records / f"{config.stem}__{slug}.json"
        if args.skip_existing and current_record(out, config, args):
            print(f"[{k}/{len(configs)}] {config.stem}: current record kept", flush=True)
            continue
        ok, what = run_one(config, out, logs / f"{config.stem}.log", args)
        print(f"[{k}/{len(configs)}] {config.stem}: {'ok' if ok else 'FAILED'}, {what}", flush=True)
        if not ok:
            failed.append(f"{config.stem} ({what}; log {logs / (config.stem + '.log')})")
    print(f"sweep: {len(configs) - len(failed)}/{len(configs)} configs in {(time.perf_counter() - start) / 60:.1f} min")
    render = [sys.executable, "-m", "detkit", "zoo-table", str(records), "--out", args.out]
    if subprocess.run(render, cwd=ROOT).returncode != 0:
        return 1
    for line in failed:
        print(f"no record: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
