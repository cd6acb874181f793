"""Activation recomputation: off, on (checkpoint each decoder layer), or on with the saved inputs in host memory.

Which mode a run uses is the planner's call (:func:`tuneforge.train.plan.choose_recompute`); this module
carries a mode out.

``on`` is transformers' public ``gradient_checkpointing_enable`` with torch's non-reentrant checkpoint. That
checkpoint saves each layer's inputs as ordinary saved tensors (and drops everything inside the layer), so
``offload`` adds :class:`OffloadedActivations`, a ``torch.autograd.graph.saved_tensors_hooks`` pair entered
around the decoder: each tensor saved outside a checkpointed layer (chiefly the layer inputs) is copied to
pinned host memory on a side stream during forward and brought back, one ahead, during backward, so the GPU
holds about one layer's activations at a time.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch


def enable(model: torch.nn.Module, mode: str) -> None:
    """Checkpoint every decoder layer for ``on`` and ``offload`` (offloading itself: :class:`OffloadedActivations`)."""
    if mode in ("on", "offload"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class _HostCopy:
    """A GPU tensor copied to pinned host memory on a side stream, brought back on demand (prefetchable)."""

    def __init__(self, t: torch.Tensor, stream: torch.cuda.Stream, prev: _HostCopy | None) -> None:
        self.prev, self.device, self.stream, self.gpu, self.uses = prev, t.device, stream, None, 1
        self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(stream):
            self.host.copy_(t, non_blocking=True)
        t.record_stream(stream)  # its memory is not reused before the copy is done

    def prefetch(self) -> None:
        if self.gpu is None and self.host is not None:
            with torch.cuda.stream(self.stream):
                self.gpu = self.host.to(self.device, non_blocking=True)

    def load(self) -> torch.Tensor:
        """The tensor on its device again; starts bringing back the one saved before it."""
        self.prefetch()
        main = torch.cuda.current_stream(self.device)
        main.wait_stream(self.stream)
        self.gpu.record_stream(main)
        if self.prev is not None:
            self.prev.prefetch()  # the layer below comes in while this one recomputes
        out, self.gpu, self.uses = self.gpu, None, self.uses - 1
        if not self.uses:
            self.host = None
        return out


class OffloadedActivations:
    """A context factory: tensors autograd saves inside ``with offloader():`` wait for backward in host memory.

    CPU tensors stay as they are (nothing to offload from). A tensor saved several times in one forward (the
    rotary tables every layer reads) is copied once. Each ``with`` block starts a new chain of copies.
    """

    def __init__(self) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def __call__(self) -> torch.autograd.graph.saved_tensors_hooks:
        last: list[_HostCopy | None] = [None]
        seen: dict[int, tuple[weakref.ref, _HostCopy]] = {}

        def pack(t: torch.Tensor) -> Any:
            if not t.is_cuda:
                return t
            ref, copy = seen.get(id(t), (None, None))
            if ref is not None and ref() is t:
                copy.uses += 1
                return copy
            stream = self._streams.setdefault(t.device, torch.cuda.Stream(t.device))
            copy = last[0] = _HostCopy(t, stream, last[0])
            seen[id(t)] = (weakref.ref(t), copy)
            return copy

        def unpack(saved: Any) -> torch.Tensor:
            return saved.load() if isinstance(saved, _HostCopy) else saved

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)
