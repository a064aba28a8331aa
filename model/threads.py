"""How many CPU threads training should use: the cores this process may actually run on."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cores(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a container limited to
    2 CPUs on a 64-core host). Torch's default counts the host's physical cores, and a thread pool larger than
    the quota stalls on every step."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota to honour
    return max(1, cores)


def training_threads(configured: int) -> int:
    """`RTREC_TRAIN_TORCH_THREADS`, or with 0 the usable cores."""
    return configured if configured > 0 else usable_cores()
