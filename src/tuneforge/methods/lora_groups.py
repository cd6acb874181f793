"""Sibling LoRA projections that read the same input (q/k/v; gate/up) trained as one group: one GEMM for their
stacked A matrices.

LoRA's thin GEMMs are memory bound: each projection re-reads the full-width input ``x`` for ``x·Aᵀ`` in forward and
for ``dA = dhᵀ·x`` in backward, and reads and writes ``dx`` again for ``dx += dh·A``. q/k/v (gate/up) read the same
``x``, so stacking their A matrices (``torch.cat`` of r × in matrices, tiny) reads ``x`` once instead of three
(two) times in each of those; the lead measured the step on an H200 (docs/gpu-speed.md). Parameters are not
touched: each projection keeps its own ``lora_A``/``lora_B`` (adapters save in PEFT's layout as before) and the
stacked A's gradient is split back by autograd.

:func:`group_projections` puts a hook pair on each parent module (attention, MLP) that has such siblings: before the
parent's forward, the group's outputs are computed for the parent's input and handed to each member for that call
only; after it, whatever was not taken is dropped. A member called on another tensor
(cross-attention's k/v, a parent that normalizes its input first) runs its own forward: correct, but the group's
output for it was computed for nothing. A dense frozen base goes through :func:`lora_ops.lora_forward` (one op for
the group); FP8 and 4-bit bases through autograd (the compiler fuses the rest). Members group only when each has one
plain active adapter (the same), gradients on, and the same input size, dropout and base kind; otherwise each runs
its own forward, unchanged.

Under LoRA dropout the group draws ONE mask for its shared input, where PEFT draws one per projection: the same
distribution per projection, but the members' masks are no longer independent (``method.lora.group_projections:
false`` restores one mask each).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.methods import lora_ops
from tuneforge.methods.lora import LoRALinear
from tuneforge.quant.fp8 import Linear8
from tuneforge.quant.linear4bit import Linear4bit

# Child names called on their parent's input, by family: Llama/Mistral/Qwen (q/k/v, gate/up), Mixtral's experts
# (w1/w3), BERT-style attention (query/key/value).
SIBLINGS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"), ("query", "key", "value"),
)
GROUPS = "lora_groups"
"""The attribute of a parent module naming its groups of sibling projections."""


def group_projections(model: nn.Module) -> int:
    """Train sibling LoRA projections of ``model`` (:data:`SIBLINGS`, two or more adapted under one parent) as
    groups; returns how many groups there are. Calling it again adds nothing."""
    n = 0
    for parent in model.modules():
        if not hasattr(parent, GROUPS):
            groups = tuple(g for g in (tuple(name for name in names if _adapted(parent, name)) for names in SIBLINGS)
                           if len(g) > 1)
            if not groups:
                continue
            setattr(parent, GROUPS, groups)
            # the same two functions on every parent, the groups an attribute: a compiled decoder layer guards on
            # the hooks' identity, so one hook object per parent would recompile each layer (and past Dynamo's
            # cache limit, run the rest eagerly)
            parent.register_forward_pre_hook(_hand_out, with_kwargs=True)
            parent.register_forward_hook(_drop_unused, with_kwargs=True)
        n += len(getattr(parent, GROUPS))
    return n


def _adapted(parent: nn.Module, name: str) -> bool:
    child = parent._modules.get(name)
    return isinstance(child, LoRALinear) and child.parameter_name is None


def group_forward(members: list[LoRALinear], x: torch.Tensor) -> list[torch.Tensor] | None:
    """Each member's training output for input ``x`` from one stacked-A GEMM, or None when the members cannot run
    as a group now (the module docstring says when)."""
    name = members[0].plain_adapter()
    if name is None or any(m.plain_adapter() != name for m in members[1:]) \
            or len({(m.in_features, m.dropout[name]) for m in members}) > 1 or x.shape[-1] != members[0].in_features:
        return None
    a = [m.lora_A[name].weight for m in members]
    b = [m.lora_B[name].weight for m in members]
    scales = [m.scaling[name] * m.adapter_weights.get(name, 1.0) for m in members]
    dropout = members[0].lora_dropout[name]
    if all(m._fused_adapter(x) is not None for m in members):
        return lora_ops.lora_forward(x, [m.base_layer for m in members], dropout, a, b, scales)
    if not any(all(isinstance(m.base_layer, kind) for m in members) for kind in (Linear8, Linear4bit)):
        return None
    xa = F.linear(dropout(x), torch.cat(a).to(x.dtype))
    return [m._add_lora(m.base_layer(x), name, x, s, xa_i)
            for m, s, xa_i in zip(members, scales, xa.split([a_i.shape[0] for a_i in a], dim=-1), strict=True)]


def _hand_out(parent: nn.Module, args: tuple, kwargs: dict) -> None:
    """Before the parent's forward: each group's outputs for the parent's input, handed to its members."""
    x = args[0] if args else kwargs.get("hidden_states")  # HF attention takes hidden_states by keyword
    for names in getattr(parent, GROUPS):
        members = [parent._modules[name] for name in names]
        outputs = group_forward(members, x) if isinstance(x, torch.Tensor) else None
        for member, y in zip(members, outputs or [None] * len(members), strict=True):
            member.group_output = None if y is None else (x, y)


def _drop_unused(parent: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
    """After the parent's forward: drop what its members did not take. (Not hooked to run when the forward raises:
    Dynamo would guard on each parent's hook id; what a failed call left is replaced at the next one.)"""
    for names in getattr(parent, GROUPS):
        for name in names:
            parent._modules[name].group_output = None
