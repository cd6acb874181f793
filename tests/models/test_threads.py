"""One rule for the CPU thread count: explicit, else $OMP_NUM_THREADS, else the physical cores this process may use."""

from __future__ import annotations

import os

import torch

from tuneforge.models import threads


def test_explicit_then_environment_then_cores(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert threads.apply_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert threads.default_threads() == 3
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
        monkeypatch.setattr(threads, "_physical_cores", lambda cpus: len(cpus) // 2)  # hyper-threads count once
        monkeypatch.setattr(threads, "_cgroup_quota", lambda: None)
        assert threads.default_threads() == 2
        monkeypatch.setattr(threads, "_cgroup_quota", lambda: 1)
        assert threads.default_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_default_never_exceeds_the_affinity_set(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert 1 <= threads.default_threads() <= len(os.sched_getaffinity(0))
