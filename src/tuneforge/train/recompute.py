"""Activation recomputation: off, on (checkpoint each decoder layer), or on with the saved inputs in host memory.

``train.gradient_checkpointing: auto`` (the default) asks the memory planner: no recomputation when the step
fits the GPU with headroom (a third less compute than recomputing), checkpointing when only that fits, and
offloaded checkpoints when even that does not. On the CPU it is off: memory there is not the limit.

Offloading: each layer's input is copied to pinned host memory on a side stream during forward and copied
back, one layer ahead, during backward, so the GPU holds one layer's activations at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def resolve_mode(setting: bool | str) -> str:
    """The config value as one of auto/off/on/offload (booleans are off/on)."""
    if isinstance(setting, bool):
        return "on" if setting else "off"
    return setting


def choose_mode(config: Any, device: torch.device) -> str:
    """The recomputation mode ``train`` uses for ``config`` on ``device`` (auto decided by the planner)."""
    mode = resolve_mode(config.train.gradient_checkpointing)
    if mode != "auto":
        return mode
    if device.type != "cuda":
        return "off"
    from tuneforge.errors import TuneforgeError
    from tuneforge.train.plan import choose_plan, plan_for_config

    try:
        return choose_plan(lambda candidate: plan_for_config(config, device=device, recompute=candidate))
    except TuneforgeError:  # a model the planner does not model: checkpointing is the safe choice
        return "on"


def enable(model: torch.nn.Module, mode: str) -> None:
    """Turn on checkpointing of every decoder layer (``on``), with inputs in host memory (``offload``)."""
    if mode == "off":
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mode == "offload":
        for m in model.modules():
            if getattr(m, "gradient_checkpointing", False):
                m._gradient_checkpointing_func = offloaded_checkpoint


class HostCopy:
    """A GPU tensor copied to pinned host memory on a side stream, brought back on demand (prefetchable)."""

    streams: dict[torch.device, torch.cuda.Stream] = {}

    def __init__(self, t: torch.Tensor, prev: HostCopy | None) -> None:
        self.prev, self.device, self.gpu, self.loaded = prev, t.device, None, False
        if not t.is_cuda:  # nothing to offload from on the CPU
            self.gpu, self.host = t, None
            return
        self.stream = HostCopy.streams.setdefault(t.device, torch.cuda.Stream(t.device))
        self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(self.stream):
            self.host.copy_(t, non_blocking=True)
        t.record_stream(self.stream)  # its memory is not reused before the copy is done

    def prefetch(self) -> None:
        if self.gpu is None and self.host is not None:
            with torch.cuda.stream(self.stream):
                self.gpu = self.host.to(self.device, non_blocking=True)

    def load(self) -> torch.Tensor:
        """The tensor on its device again; starts bringing back the previous layer's input."""
        if self.host is None:
            self.loaded = True
            out, self.gpu = self.gpu, None
            return out
        self.prefetch()
        main = torch.cuda.current_stream(self.device)
        main.wait_stream(self.stream)
        self.gpu.record_stream(main)
        if self.prev is not None:
            self.prev.prefetch()  # the layer below comes in while this one recomputes
        self.loaded = True
        out, self.gpu, self.host = self.gpu, None, None
        return out


_chain: list[HostCopy] = []


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, hidden, _needs_grad, *args):
        if _chain and _chain[-1].loaded:  # a new step: the last one's copies are spent
            _chain.clear()
        _chain.append(HostCopy(hidden, _chain[-1] if _chain else None))
        ctx.copy, ctx.run, ctx.args = _chain[-1], run, args
        dev = hidden.device.type
        ctx.amp = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        # dropout in the recompute must draw what the forward drew
        ctx.rng = (torch.get_rng_state(), torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None)
        with torch.no_grad():
            return run(hidden, *args)

    @staticmethod
    def backward(ctx, grad):
        hidden = ctx.copy.load().detach().requires_grad_(True)
        dev, enabled, dtype = ctx.amp
        cpu_rng, cuda_rng = ctx.rng
        devices = [hidden.device] if hidden.is_cuda else []
        with torch.random.fork_rng(devices=devices, device_type=dev):
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, hidden.device)
            with torch.enable_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled):
                out = ctx.run(hidden, *ctx.args)
        torch.autograd.backward(out, grad)
        return (None, hidden.grad, None) + (None,) * len(ctx.args)


_NEEDS_GRAD = torch.empty(0, requires_grad=True)  # the output needs grad even when the input does not


def offloaded_checkpoint(run: Callable[..., torch.Tensor], hidden: torch.Tensor, *args: Any, **_: Any) -> torch.Tensor:
    """Checkpoint ``run(hidden, *args)`` with ``hidden`` kept in host memory until backward."""
    return _OffloadedCheckpoint.apply(run, hidden, _NEEDS_GRAD, *args)
