"""Helpers for tests that start other processes: a free local port, a run directory as a kill leaves it, and a
two-process torchrun launch of a worker script."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_checkpoint(src: Path, dst: Path) -> None:
    """A run directory as a kill after the step-2 checkpoint would leave it."""
    dst.mkdir()
    shutil.copytree(src / "checkpoints" / "step-2", dst / "checkpoints" / "step-2")
    for name in ("config.yaml", "metrics.jsonl", "tuneforge-run.json"):
        shutil.copy(src / name, dst / name)


def torchrun(worker_source: str, folder: Path, *args: str) -> None:
    """Write ``worker_source`` to ``folder/worker.py`` and run it in two CPU processes (gloo); fails the test with the
    end of their output when they fail."""
    (folder / "worker.py").write_text(worker_source)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(folder / "worker.py"), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
