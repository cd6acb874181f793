"""Sibling LoRA projections that read the same input (q/k/v; gate/up) trained as one group: one GEMM for their
stacked A matrices.

LoRA's thin GEMMs are memory bound: each projection re-reads the full-width input ``x`` for ``x·Aᵀ`` in forward and
for ``dA = dhᵀ·x`` in backward, and reads and writes ``dx`` again for ``dx += dh·A``. q/k/v (gate/up) read the same
``x``, so stacking their A matrices (``torch.cat`` of r × in matrices, tiny) reads ``x`` once instead of three
(two) times in each of those. On an H200 (8B, LoRA r=16 on 7 projections, compiled layers, same call): bf16
16,206 → 16,331 tokens/s, FP8 base 19,931 → 20,603 (benchmarks/results/speed_session4_h200.md). Parameters are not
touched: each projection keeps its own ``lora_A``/``lora_B`` (adapters save in PEFT's layout as before) and the
stacked A's gradient is split back by autograd.

:func:`group_projections` puts a hook pair on each parent module (attention, MLP) that has such siblings: before the
parent's forward, the group's outputs are computed for the parent's input and handed to each member for that call
only (taken if the member is called on that tensor, unchanged since); after it, whatever was not taken is dropped,
and a group whose members did not all take theirs (cross-attention's k/v, a parent that normalizes its input first)
is not formed again on that parent. A dense frozen base goes through :func:`lora_ops.lora_forward` (one op for the
group); FP8 and 4-bit bases through autograd (the compiler fuses the rest). Members group only when each has one
plain active adapter (the same), gradients on, no active LoRA dropout (PEFT draws an independent mask per
projection, which one shared input cannot give), and the same input size and base kind; otherwise each runs its own
forward, unchanged.

The hooks are the same two functions on every parent and the groups a module attribute: a compiled decoder layer
guards on its hooks, and one hook object per parent made Dynamo recompile every layer (8B: 24 of 32 layers ran
eagerly past its cache limit, 13,959 instead of 16,117 tokens/s).
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
            or len({m.in_features for m in members}) > 1 or x.shape[-1] != members[0].in_features:
        return None
    if any(m.lora_dropout[name].training and not isinstance(m.lora_dropout[name], nn.Identity) for m in members):
        return None  # PEFT draws an independent dropout mask per projection: a shared input cannot give that
    a = [m.lora_A[name].weight for m in members]
    b = [m.lora_B[name].weight for m in members]
    scales = [m.scaling[name] * m.adapter_weights.get(name, 1.0) for m in members]
    dropout = members[0].lora_dropout[name]
    if all(m._fused_adapter(x) is not None for m in members):
        return lora_ops.lora_forward(x, [m.base_layer for m in members], dropout, a, b, scales)
    if not any(all(isinstance(m.base_layer, kind) for m in members) for kind in (Linear8, Linear4bit)):
        return None
    xa = F.linear(x, torch.cat(a).to(x.dtype))
    return [m._add_lora(m.base_layer(x), name, x, s, xa_i)
            for m, s, xa_i in zip(members, scales, xa.split([a_i.shape[0] for a_i in a], dim=-1), strict=True)]


def _members(parent: nn.Module, names: tuple[str, ...]) -> list[LoRALinear] | None:
    """The group's members, or None when one is no longer a LoRA layer (unwrapped, adapter removed)."""
    members = [parent._modules.get(name) for name in names]
    return members if all(isinstance(m, LoRALinear) for m in members) else None


def _hand_out(parent: nn.Module, args: tuple, kwargs: dict) -> None:
    """Before the parent's forward: each group's outputs for the parent's input, handed to its members."""
    x = args[0] if args else kwargs.get("hidden_states")  # HF attention takes hidden_states by keyword
    for names in getattr(parent, GROUPS):
        members = _members(parent, names)
        if members is None:
            continue
        outputs = group_forward(members, x) if isinstance(x, torch.Tensor) else None
        for member, y in zip(members, outputs or [None] * len(members), strict=True):
            # the version tells an in-place change apart (eager only: traced, it is a data-dependent value)
            member.group_output = None if y is None else (x, None if torch.compiler.is_compiling() else x._version, y)


def _drop_unused(parent: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
    """After the parent's forward: drop what its members did not take, and stop grouping members that do not all
    take theirs (a member called on another tensor, or not called): their outputs cost a GEMM each for nothing,
    and their adapters would get zero gradients where they should get none. (Not hooked to run when the forward
    raises: Dynamo would guard on each parent's hook id; what a failed call left is replaced at the next one.)"""
    kept = []
    for names in getattr(parent, GROUPS):
        members = _members(parent, names)
        if members is None:
            continue
        if all(m.group_output is None for m in members):
            kept.append(names)
        for m in members:
            m.group_output = None
    if len(kept) != len(getattr(parent, GROUPS)):
        setattr(parent, GROUPS, tuple(kept))
