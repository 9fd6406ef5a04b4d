"""What the run ran on: CPU or GPU model, versions, git state, and how busy the machine was."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..env import cpu_model, package_version
from .competitors import _wdopt_backends

# ----------------------------------------------------------------------------- reporting

def cpu_snapshot() -> tuple[float, float, float] | None:
    """(wall s, machine-wide busy CPU s, this process's CPU s), to measure other processes' load."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None  # not Linux
    busy = sum(fields) - fields[3] - fields[4]  # everything but idle and iowait
    own = os.times()
    return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


def others_cpu_cores(start, end) -> float | None:
    """Average number of cores other processes kept busy between two snapshots: they stall torch's
    OpenMP regions and share the memory bandwidth, so any value well above 0 makes timings noisy."""
    if start is None or end is None:
        return None
    wall, busy, own = (e - s for s, e in zip(start, end))
    return max(0.0, (busy - own) / wall)


def _git_state() -> dict:
    """The commit of the wdopt checkout being run and whether its source has uncommitted edits
    (read-only queries: GIT_OPTIONAL_LOCKS=0 keeps git from even refreshing the index)."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")

    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=root, env=env, capture_output=True, text=True, timeout=10)

    try:
        commit = git("rev-parse", "HEAD").stdout.strip()
        dirty = git("diff", "--quiet", "HEAD", "--", "wdopt", "csrc").returncode == 1
    except (OSError, subprocess.SubprocessError):
        return {"wdopt_git_commit": "unknown", "wdopt_uncommitted_edits": None}
    return {"wdopt_git_commit": commit or "unknown", "wdopt_uncommitted_edits": dirty if commit else None}


def environment(device: str, argv: list[str]) -> dict:
    """Everything needed to reproduce or compare a result: where, when, with what, run how."""
    import wdopt

    env = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": "python -m wdopt.bench" + ("" if not argv else " " + shlex.join(argv)),
        "device": device,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": package_version("triton"),
        "numpy": np.__version__,
        "wdopt": wdopt.__version__,
        "wdopt_backends_available": wdopt.available_backends(device),
        "wdopt_backends_timed": _wdopt_backends(device),
        **_git_state(),
    }
    if device == "cuda":
        env["gpu_name"] = torch.cuda.get_device_name()
        try:
            env["gpu_driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            env["gpu_driver"] = "unknown (nvidia-smi failed)"
    return env
