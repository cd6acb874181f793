"""4-bit MoE expert stacks: the 3D weight parameters of transformers 5's experts modules, stored 4-bit.

Mixtral, Qwen2/3-MoE, OLMoE and GPT-OSS keep their experts as one module with 3D parameters
(``gate_up_proj`` ``[E, 2·I, H]``, ``down_proj`` ``[E, H, I]``) that its forward indexes per expert, so a
Linear4bit cannot stand in for them. ``Experts4bit`` wraps such a module: the stacks become 4-bit buffers (same
format as Linear4bit: blocks of 64 over the row-major flattened stack) and the parameters are removed from the
module; the forward runs the module with the stacks dequantized for that call only. A stack someone has already
supplied for the call (LoRA's ``W + ΔW``, through ``torch.func.functional_call``) is used as given.

Training keeps the dequantized stacks of a layer alive until its backward (the expert matmuls save their
weights), so the memory saved while training needs activation recomputation (``train.recompute``); storage and
inference save it always.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from tuneforge.quant.buffers import QuantizedBuffers
from tuneforge.quant.nf4 import Quantized4bit, quantize_4bit
from tuneforge.quant.nf4_gpu import dequantize as dequantize_fast

_FIELDS = ("packed", "absmax", "absmax2", "offset")


def expert_stacks(module: nn.Module) -> list[str]:
    """Names of the module's own 3D floating-point parameters (the stacked expert weights)."""
    return [n for n, p in module.named_parameters(recurse=False) if p.dim() == 3 and p.is_floating_point()]


class Experts4bit(QuantizedBuffers):
    """An experts module whose 3D weight stacks are stored 4-bit (see the module docstring)."""

    def __init__(self, base_layer: nn.Module, compute_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.compute_dtype = compute_dtype
        self.stacks: dict[str, tuple[torch.Size, torch.dtype, int, str]] = {}  # name → shape, dtype, block, type

    @classmethod
    def from_module(cls, module: nn.Module, quant_type: str = "nf4", double_quant: bool = True,
                    blocksize: int = 64, compute_dtype: torch.dtype | None = None) -> Experts4bit:
        """Quantize every 3D stack of ``module`` (on its device) and wrap it."""
        layer = cls(module, compute_dtype)
        for name in expert_stacks(module):
            layer.set_stack(name, quantize_4bit(getattr(module, name).detach(), blocksize, quant_type, double_quant))
        return layer

    def set_stack(self, name: str, q: Quantized4bit) -> None:
        """Store stack ``name`` as ``q`` and drop the module's parameter (or its meta placeholder)."""
        self.base_layer._parameters.pop(name, None)
        self.stacks[name] = (q.shape, q.dtype, q.blocksize, q.quant_type)
        for field in _FIELDS:
            self.register_buffer(f"{name}_{field}", getattr(q, field))

    def quantized(self, name: str) -> Quantized4bit:
        """Stack ``name`` as a ``Quantized4bit`` sharing this module's buffers."""
        shape, dtype, blocksize, quant_type = self.stacks[name]
        packed, absmax, absmax2, offset = (getattr(self, f"{name}_{field}") for field in _FIELDS)
        return Quantized4bit(packed, absmax, shape, dtype, blocksize, quant_type, absmax2, offset)

    def dense(self, name: str) -> torch.Tensor:
        """Stack ``name`` dequantized, in the compute dtype (else the dtype it was quantized from)."""
        q = self.quantized(name)
        return dequantize_fast(q, self.compute_dtype or q.dtype)

    def forward(self, *args, **kwargs):
        base = self.base_layer
        stacks = {n: self.dense(n) for n in self.stacks if n not in base.__dict__}  # not supplied by LoRA
        return functional_call(base, stacks, args, kwargs, strict=False)

    @property
    def quantized_numel(self) -> int:
        """Values stored 4-bit (for parameter counts)."""
        return sum(shape.numel() for shape, *_ in self.stacks.values())

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: {list(s)} {t}" for n, (s, _, _, t) in self.stacks.items())
