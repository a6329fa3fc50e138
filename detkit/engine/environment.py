"""Where a measurement was made: versions, the git commit, the device. Part of every benchmark record."""
from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path

import numpy as np
import torch


def _repo_root() -> Path | None:
    for folder in Path(__file__).resolve().parents:
        if (folder / ".git").exists():
            return folder
    return None


def _git(root: Path, *args: str) -> str | None:
    """The output of `git args...` run in `root` (without taking the index lock), or None when git is missing or
    fails."""
    try:
        out = subprocess.run(["git", "--no-optional-locks", *args], cwd=root, capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_commit(root: Path) -> str | None:
    """HEAD's commit (`git rev-parse HEAD`), or None."""
    out = _git(root, "rev-parse", "HEAD")
    commit = out.strip() if out is not None else ""
    return commit if re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", commit) else None


def git_dirty(root: Path) -> bool | None:
    """Whether tracked files differ from HEAD (`git status`), or None."""
    out = _git(root, "status", "--porcelain", "--untracked-files=no")
    return bool(out.strip()) if out is not None else None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """{"git", "versions", "device"} of this run."""
    from .. import __version__

    root = _repo_root()
    commit = git_commit(root) if root is not None else None
    git = {"commit": commit, "dirty": git_dirty(root) if commit is not None else None}
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    versions = {"detkit": __version__, "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": cudnn,
                "python": platform.python_version(), "numpy": np.__version__, "platform": platform.platform()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name, memory = props.name, props.total_memory
    else:
        name, memory = _cpu_name(), os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    info = {"type": device.type, "name": name, "memory_bytes": int(memory), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    return {"git": git, "versions": versions, "device": info}


def device_slug(device: dict) -> str:
    """"cuda-nvidia-h200", "cpu-2c-intel-xeon-platinum-8480": the device part of a record's file name."""
    name = re.sub(r"\((r|tm)\)|\bcpu\b|@.*$", "", device["name"].lower())
    name = re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    if device["type"] == "cuda":
        return f"cuda-{name}"
    return f"cpu-{device['cpu_count']}c-{name}"
