"""The processes of one run as one object (the idea of LitGPT's Fabric): the loop calls it the same way on one
process and under torchrun, and every call that does nothing on one process lives here, not in the loop.

The work is done by :mod:`tuneforge.train.distributed` (ranks, the batch split, collectives) and
:mod:`tuneforge.train.sharding` (FSDP2 loading, sharding, checkpoints, full weights).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from tuneforge.data.packing import PackedRow, collate
from tuneforge.train import distributed, sharding
from tuneforge.train.step import CausalLMLoss

T = TypeVar("T")


def physical_cores() -> int:
    """Physical cores (hyper-threads counted once) of the CPUs this process may run on."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores, cpu, key = set(), None, [None, None]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                name = name.strip()
                if name == "processor":
                    cpu, key = int(value), [None, None]
                elif name in ("physical id", "core id"):
                    key[name == "core id"] = value.strip()
                    if cpu in allowed and None not in key:
                        cores.add(tuple(key))
    except OSError:
        pass
    return len(cores) or len(allowed)


def default_threads() -> int:
    """Torch threads that do not oversubscribe the machine: the physical cores this process may use, less the
    cores other processes keep busy (the 1-minute load average), at least 1. One thread per busy core is what
    made a shared 2-core machine run 6x slower than with one thread."""
    cores = physical_cores()
    busy = round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    return max(1, min(cores, cores - busy))


class Runtime:
    """This process's device and its place among the run's processes."""

    def __init__(self, batch_size: int, device: torch.device) -> None:
        self.device = distributed.init(batch_size, device)  # cuda:LOCAL_RANK under torchrun
        self.is_main = distributed.is_main()
        self.all_sum = distributed.all_sum
        self.local_rows = distributed.local_rows

    def batch(self, rows: list[PackedRow], pad_id: int) -> dict[str, torch.Tensor]:
        """This process's share of one global micro-batch, collated."""
        return collate(distributed.local_rows(rows), pad_id)

    def on_main(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn`` on rank 0 (which writes files); every process gets its result or its error."""
        return distributed.on_main(fn, *args, **kwargs)

    def main_file(self, path: Path) -> Path:
        """``path`` on rank 0, the null device elsewhere."""
        return distributed.main_file(path)

    def load_placement(self, config: Any, model_given: bool) -> str:
        """Where the model is loaded: ``device``, or (under torchrun) ``host`` on rank 0 and ``meta`` elsewhere."""
        return sharding.load_placement(config, model_given)

    def setup(self, loss_model: CausalLMLoss, placement: str) -> CausalLMLoss:
        """Shard ``loss_model`` (the FSDP root) under torchrun and fill it from rank 0's weights; call it after the
        method is applied and before the optimizer is built. On one process: the model as it is."""
        loaded = sharding.host_weights(loss_model, placement)
        sharding.shard_model(loss_model, self.device)
        if placement != "device":
            sharding.fill_from_rank0(loss_model, loaded, self.device)
        return loss_model

    def save_checkpoint(self, run_dir: Path, step: int, loss_model: CausalLMLoss, optimizer: torch.optim.Optimizer,
                        scheduler: Any, trainer: dict[str, Any]) -> Path:
        return sharding.save_checkpoint(run_dir, step, loss_model, optimizer, scheduler, trainer)

    def load_checkpoint(self, path: Path, loss_model: CausalLMLoss, optimizer: torch.optim.Optimizer,
                        scheduler: Any) -> dict[str, Any]:
        return sharding.load_checkpoint(path, loss_model, optimizer, scheduler)

    def with_full_weights(self, loss_model: CausalLMLoss, fn: Callable[[], T], everything: bool = True) -> T:
        """``fn()`` on rank 0 with the full weights in place (only the trainable ones unless ``everything``)."""
        return sharding.with_full_weights(loss_model, fn, everything)

    def barrier(self) -> None:
        distributed.barrier()
