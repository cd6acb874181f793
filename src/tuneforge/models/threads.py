"""How many CPU threads torch uses: one rule for every command.

torch's own default is every logical CPU of the machine, which on a busy or hyper-threaded machine
oversubscribes the cores: a training step on a shared 2-core machine took 15x longer with it than with one
thread. The rule: an explicit setting (``--threads``, ``train.threads``, ``threads:``) wins; else
``OMP_NUM_THREADS`` when set; else the physical cores among the CPUs this process may run on (its affinity
set, e.g. ``taskset`` or a container's cpuset), capped by a cgroup CPU quota.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch


def default_threads() -> int:
    """The thread count used when none is set (see the module docstring)."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    n = min(len(cpus), _physical_cores(cpus))
    quota = _cgroup_quota()
    return max(1, min(n, quota) if quota else n)


def apply_threads(threads: int | None) -> int:
    """Set torch's intra-op threads to ``threads`` (None: :func:`default_threads`); return the count set."""
    n = threads or default_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def _physical_cores(cpus: list[int]) -> int:
    """Distinct physical cores among ``cpus`` (hyper-thread siblings count once); ``len(cpus)`` if unknown."""
    cores = set()
    for cpu in cpus:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/core_cpus_list").read_text().strip())
        except OSError:
            return len(cpus)
    return len(cores) or len(cpus)


def _cgroup_quota() -> int | None:
    """The cgroup v2 CPU quota in whole CPUs (rounded up), or None when unlimited or unknown."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, math.ceil(int(quota) / int(period)))
