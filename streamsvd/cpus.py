"""The CPU cores this process may use, and threads that fit them.

torch starts one intra-op thread per core of the machine, whatever the process's CPU
affinity (`taskset`, a batch scheduler's cpuset) or its cgroup's CPU quota (a container's
`--cpus`) allow. More threads than usable cores spin against each other: on a 2-core
machine shared with two other jobs, identical blocks took 0.7 s to 42 s each.
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs' worth of time the cgroup may use per period (cgroup v2 `cpu.max`, or v1's
    `cpu.cfs_quota_us` / `cpu.cfs_period_us`); None where there is no limit."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def usable_cpus(root: Path = Path("/sys/fs/cgroup")) -> int:
    """Cores this process may run on (its affinity), capped by its cgroup's quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota(root)
    return max(1, min(cores, math.floor(quota))) if quota else cores


def process_threads(requested: int) -> int:
    """Intra-op threads for this process: `requested` (torch's default: OMP_NUM_THREADS, else
    one per core) capped at the usable cores. Several processes on one machine (torchrun's
    LOCAL_WORLD_SIZE) share the usable cores evenly instead; torchrun's own
    OMP_NUM_THREADS=1 would leave all but one core per process idle."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local > 1:
        return max(1, usable_cpus() // local)
    return min(requested, usable_cpus())
