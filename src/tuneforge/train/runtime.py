"""The processes of one run as one object (the idea of LitGPT's Fabric): the loop calls it the same way on one
process and under torchrun, and every call that does nothing on one process lives here, not in the loop.

The work is done by :mod:`tuneforge.train.distributed` (ranks, the batch split, collectives) and
:mod:`tuneforge.train.sharding` (FSDP2 loading, sharding, checkpoints, full weights).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from tuneforge.data.packing import PackedRow, collate
from tuneforge.train import distributed, sharding
from tuneforge.train.step import CausalLMLoss

T = TypeVar("T")


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
