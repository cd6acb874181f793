"""Several processes under ``torchrun``: who is who, the global batch split over ranks, collectives.

``torchrun --nproc_per_node N -m tuneforge.cli train ...`` starts N copies of the same run; each finds its
rank in the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``). Started any other way (``WORLD_SIZE``
unset or 1) every function here is a pass-through, so the loop has one code path.

What a run means does not depend on the number of processes:

- ``train.batch_size`` is the *global* rows per micro-batch. Every rank draws the same global order
  (``micro_batches``) and keeps its share of each micro-batch (``local_rows``).
- Each rank sums its loss; the trained-token count is summed over ranks, every rank divides by that global
  count, and FSDP sums (not averages) the gradients: they equal the one-process gradients.
- Rank 0 writes files (run directory, metrics, plots, outputs); :func:`on_main` runs such work there and
  hands every rank its result or error. FSDP2 sharding and checkpoints are in :mod:`tuneforge.train.sharding`.
"""

from __future__ import annotations

import atexit
import gc
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from tuneforge.data.packing import IGNORE, PackedRow
from tuneforge.errors import ConfigError, TuneforgeError

T = TypeVar("T")
def world_size() -> int:
    """Processes in this run (1 unless launched by torchrun with several)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_distributed() -> bool:
    return world_size() > 1


def is_main() -> bool:
    """True on the one process that prints and writes files (rank 0)."""
    return rank() == 0


# --- setup ---------------------------------------------------------------------------------------

def init(batch_size: int, device: torch.device) -> torch.device:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU); return this process's device.

    On CUDA each process takes ``cuda:LOCAL_RANK``. Raises ConfigError when ``batch_size`` (``train.batch_size``,
    global rows per micro-batch) cannot be split evenly over the processes.
    """
    if not is_distributed():
        return device
    world = world_size()
    if batch_size % world:
        raise ConfigError(
            f"train.batch_size={batch_size} is the global number of rows per micro-batch and must be divisible "
            f"by the {world} processes (each takes batch_size/{world}); use e.g. train.batch_size="
            f"{max(world, batch_size // world * world)} (and train.grad_accum for a larger batch)")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
        atexit.register(_shutdown)
    return device


def _shutdown() -> None:
    if dist.is_initialized():
        # Sharded models still waiting for the garbage collector hold the device mesh, whose process groups
        # then die during interpreter teardown and gloo aborts the process: free them first.
        gc.collect()
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process (gloo aborts a process whose peer has already torn down); no-op on one."""
    if is_distributed() and dist.is_initialized():
        dist.barrier()


def _comm_device() -> torch.device:
    """Where small tensors for collectives live: the current GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --- the global batch ----------------------------------------------------------------------------

def local_rows(rows: list[PackedRow]) -> list[PackedRow]:
    """This rank's share of one global micro-batch: ``rows[rank::world]``.

    A micro-batch with fewer rows than processes (the last one of an epoch) is shared another way, because
    every rank must run a forward and backward: ranks that share a row each train on every k-th of its
    trained labels, so the summed loss and gradient are still those of the whole micro-batch.
    """
    world, r = world_size(), rank()
    if world == 1 or not rows:
        return rows
    if len(rows) >= world:
        return rows[r::world]
    i = r % len(rows)
    sharing = [q for q in range(world) if q % len(rows) == i]
    j, k = sharing.index(r), len(sharing)
    row = rows[i]
    trained = [p for p in range(1, len(row.labels)) if row.labels[p] != IGNORE]
    keep = set(trained[j::k])
    labels = [lab if p == 0 or p in keep else IGNORE for p, lab in enumerate(row.labels)]
    return [replace(row, labels=labels)]


def all_sum(value: T) -> T:
    """``value`` (an int or float) summed over all processes; unchanged on one process."""
    if not is_distributed():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return type(value)(t.item()) if isinstance(value, int) else t.item()


def scalar(t: torch.Tensor | float) -> float:
    """A Python float of a tensor that may be a DTensor (e.g. the gradient norm of sharded gradients)."""
    full = getattr(t, "full_tensor", None)
    return float(full() if callable(full) else t)


# --- rank 0 does, everyone learns the outcome ----------------------------------------------------

def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` on rank 0 only; every rank returns its result or raises its error (so none waits forever)."""
    if not is_distributed():
        return fn(*args, **kwargs)
    box: list[Any] = [None]
    if is_main():
        try:
            box[0] = (True, fn(*args, **kwargs))
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            box[0] = (False, e if isinstance(e, TuneforgeError) else RuntimeError(f"rank 0: {e!r}"))
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def main_file(path: Path) -> Path:
    """``path`` on rank 0, the null device elsewhere: for files only rank 0 writes (metrics.jsonl)."""
    return path if is_main() else Path(os.devnull)
