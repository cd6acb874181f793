"""FSDP2 sharding under ``torchrun``: loading, ``fully_shard``, full weights for saving, checkpoints.

- Only rank 0 reads the weights (into host memory); the other ranks build the model on the meta device.
  ``fully_shard`` (per decoder layer, then the root) moves each shard to its GPU and rank 0 broadcasts the
  weights one tensor at a time, so no GPU ever holds the whole model. Frozen and trainable parameters share
  units. Buffers are not sharded: a QLoRA base keeps its 4-bit codes in buffers, so each GPU holds the whole
  4-bit base (LoRA, norms, embeddings, head are sharded) and every rank loads it.
- Checkpoints are gathered to rank 0 and written in the one-process format, so a run saved by N processes
  resumes with M (any M, 1 included).

On one process every function here is a pass-through.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from tuneforge.train import checkpoint
from tuneforge.train.distributed import is_distributed, is_main, on_main, rank, world_size
from tuneforge.train.step import CausalLMLoss

T = TypeVar("T")

_DROPOUT_SEED_STRIDE = 1_000_003  # rank r > 0 draws dropout masks from seed + r·stride, not rank 0's stream


def _hf_model(root: nn.Module) -> nn.Module:
    """The HF model inside the loss wrapper (its parameter names are the checkpoint's), or ``root`` itself."""
    return root.model if isinstance(root, CausalLMLoss) else root


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP shards one by one (``model.model.layers`` for HF decoders)."""
    base = getattr(_hf_model(model), "base_model", model)
    layers = getattr(base, "layers", None) or getattr(base, "h", None)
    return list(layers) if isinstance(layers, nn.ModuleList) else []


def load_placement(config: Any, model_given: bool) -> str:
    """Where ``train`` loads the model: ``device`` on one process (or a model handed in, or QLoRA, whose 4-bit
    codes every process holds anyway); under torchrun rank 0 loads it into host memory (``host``) and the
    others build it on the meta device (``meta``), so no GPU ever holds the whole model."""
    if not is_distributed() or model_given or config.method.name == "qlora":
        return "device"
    return "host" if is_main() else "meta"


def host_weights(model: nn.Module, placement: str) -> dict[str, torch.Tensor] | None:
    """Rank 0's loaded parameters (taken after LoRA is added, before sharding), for :func:`fill_from_rank0`."""
    return {n: p.detach() for n, p in model.named_parameters()} if placement == "host" else None


def fill_from_rank0(model: nn.Module, weights: dict[str, torch.Tensor] | None, device: torch.device) -> None:
    """After :func:`shard_model` of a ``host``/``meta`` load: every rank's shards and buffers from rank 0's.

    One parameter at a time is broadcast whole, so a process holds at most one full tensor beyond its shards.
    """
    if not is_main():
        model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():  # the same order on every rank
            full = (weights[name].to(device) if is_main()
                    else torch.empty(tuple(p.shape), dtype=p.dtype, device=device))
            dist.broadcast(full, 0)
            p.copy_(_shard_like(p, full))
            del full
        for b in model.buffers():  # rotary frequencies etc.: not parameters, never in a meta model
            dist.broadcast(b, 0)


def shard_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Shard ``model`` in place with FSDP2 on ``device``: one unit per decoder layer, the rest in the root unit.

    ``model`` is the module whose ``forward`` the step calls: the loss wrapper (``train.step.CausalLMLoss``),
    so the root's parameters (embeddings, final norm, head) are gathered for the forward that reads them.

    Call after LoRA/quantization/checkpointing are set up and before the optimizer is built (the optimizer
    must see the sharded parameters). Parameters in host memory move to ``device`` shard by shard; meta ones
    stay meta (see :func:`fill_from_rank0`). A no-op on one process.
    """
    if not is_distributed():
        return model
    # optional dependency: FSDP2 is needed only under torchrun and is missing from some torch builds
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard  # optional dependency (as above)

    mesh = init_device_mesh(device.type, (world_size(),))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in _fsdp_modules(model):
        # The loss is already divided by the global token count: gradients must be summed, not averaged.
        set_factor = getattr(module, "set_gradient_divide_factor", None) or module.set_reduce_scatter_divide_factor
        set_factor(1.0)
        if hasattr(module, "set_force_sum_reduction_for_comms"):  # plain SUM (gloo has no PREMUL_SUM)
            module.set_force_sum_reduction_for_comms(True)
    _seed_dropout_for_rank()  # same init on every rank (done above), different dropout masks from here on
    return model


def _seed_dropout_for_rank() -> None:
    """Ranks above 0 draw dropout masks from their own stream (rank 0 keeps the one-process stream)."""
    if rank() > 0:
        torch.manual_seed(torch.initial_seed() + _DROPOUT_SEED_STRIDE * rank())


def _fsdp_modules(model: nn.Module) -> Iterator[nn.Module]:
    from torch.distributed.fsdp import FSDPModule  # optional dependency (see shard_model)

    return (m for m in model.modules() if isinstance(m, FSDPModule))


def _reshard(model: nn.Module) -> None:
    """Back to sharded parameters (the root stays gathered after a forward with no backward, e.g. eval)."""
    for module in _fsdp_modules(model):
        module.reshard()


def _full(t: torch.Tensor) -> torch.Tensor | None:
    """The whole of a sharded tensor, on the CPU of rank 0 (None elsewhere); every rank must call it."""
    whole = t.full_tensor() if hasattr(t, "full_tensor") else t
    out = whole.detach().cpu().contiguous() if is_main() else None
    del whole
    return out


@contextmanager
def _swapped(model: nn.Module, full: dict[int, torch.Tensor]) -> Iterator[None]:
    """Temporarily register the full tensors in ``full`` (by id of the sharded parameter) in the model."""
    swaps: list[tuple[nn.Module, str, nn.Parameter]] = []
    made: dict[int, nn.Parameter] = {}
    try:
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and id(p) in full:
                    new = made.setdefault(id(p), nn.Parameter(full[id(p)], requires_grad=p.requires_grad))
                    swaps.append((module, name, p))
                    module._parameters[name] = new
        yield
    finally:
        for module, name, p in reversed(swaps):
            module._parameters[name] = p


def with_full_weights(model: nn.Module, fn: Callable[[], T], everything: bool = True) -> T:
    """Run ``fn`` on rank 0 with the model's full (unsharded) weights in place; every rank gets its result.

    ``everything=False`` gathers only the trainable parameters (enough to save a LoRA adapter); frozen ones
    stay sharded and ``fn`` must not read them. On one process this is just ``fn()``.
    """
    if not is_distributed():
        return fn()
    _reshard(model)
    full: dict[int, torch.Tensor] = {}
    for _, p in model.named_parameters():  # the same order on every rank: one all-gather per tensor
        if everything or p.requires_grad:
            t = _full(p)
            if t is not None:
                full[id(p)] = t

    def run() -> T:
        with _swapped(model, full):
            return fn()

    return on_main(run)


# --- checkpoints in the one-process format -------------------------------------------------------

def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, trainer: dict[str, Any]) -> Path:
    """``checkpoint.save_checkpoint``; under torchrun every rank calls it and rank 0 writes the full state."""
    if not is_distributed():
        return checkpoint.save_checkpoint(run_dir, step, _hf_model(model), optimizer, scheduler, trainer)
    _reshard(model)
    weights = {n: _full(p) for n, p in _hf_model(model).named_parameters() if p.requires_grad}
    osd = optimizer.state_dict()
    osd["state"] = {i: {k: _full(v) if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                    for i, s in sorted(osd["state"].items())}
    return on_main(checkpoint.write_checkpoint, run_dir, step, weights, osd, scheduler.state_dict(), trainer)


def _shard_like(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's piece of ``full`` laid out as the sharded ``param`` (a DTensor sharded on dim 0)."""
    from torch.distributed.tensor import Shard  # optional dependency (see shard_model)

    if not hasattr(param, "to_local"):
        return full.to(param.device, param.dtype)
    if tuple(param.placements) != (Shard(0),):
        raise RuntimeError(f"unexpected sharding {param.placements}")
    out = torch.zeros_like(param)  # same placement, dtype, device
    local = out.to_local()
    step = -(-full.shape[0] // world_size())  # torch.chunk's split, as FSDP2 and DTensor use
    start = min(rank() * step, full.shape[0])
    local.copy_(full.narrow(0, start, local.shape[0]))
    return out


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any) -> dict[str, Any]:
    """``checkpoint.load_checkpoint``; under torchrun every rank reads the files and keeps its shard.

    Works whatever number of processes wrote the checkpoint (the format is always the full one-process one).
    """
    if not is_distributed():
        return checkpoint.load_checkpoint(path, _hf_model(model), optimizer, scheduler)
    _reshard(model)
    trainer = checkpoint.load_checkpoint(path, _hf_model(model), optimizer, scheduler, place=_shard_like)
    _seed_dropout_for_rank()
    return trainer
