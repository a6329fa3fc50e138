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


def git_commit(root: Path) -> str | None:
    """HEAD's commit, read from the .git folder's files (no git process), or None."""
    git = root / ".git"
    try:
        if git.is_file():  # a worktree: "gitdir: <path>"
            git = (root / git.read_text().split(":", 1)[1].strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head if re.fullmatch(r"[0-9a-f]{40}", head) else None
        ref = head.split(":", 1)[1].strip()
        common = git / (git / "commondir").read_text().strip() if (git / "commondir").is_file() else git
        for base in (git, common):
            if (base / ref).is_file():
                return (base / ref).read_text().strip()
        packed = common / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split()[0]
    except (OSError, IndexError):
        pass
    return None


def git_dirty(root: Path) -> bool | None:
    """Whether tracked files differ from HEAD (`git status`, without taking the index lock), or None."""
    try:
        out = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
                             cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


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
