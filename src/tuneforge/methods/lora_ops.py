"""LoRA layers' training forward and backward over frozen dense bases, as two opaque ops, for one layer or a group
of layers that read the same input (q/k/v, gate/up: methods/lora_groups.py).

Written with autograd, ``y = x Wᵀ + (x Aᵀ)(s·B)ᵀ`` moves more memory than it needs: the LoRA term is added by
``addmm(y, h, Bᵀ)``, which first copies ``y`` into a new output (under ``torch.compile`` too: on an H200, 8B LoRA
with compiled layers, 10.6 ms of device-to-device copies in a 509 ms step), and in backward the LoRA's share of the
input gradient is written apart and then summed into the base's. Here the forward adds the LoRA term into the base
GEMM's own output (``addmm_``), the backward adds ``dh·A`` into ``dx = dy·W`` in place (without LoRA dropout; with
it the dropped-out input gets its own gradient, as under autograd), and the frozen base gets no weight gradient.
For a group, the members' A matrices are stacked into one ``x·A_catᵀ`` GEMM in forward and one ``dh_catᵀ·x``
in backward, and ``dh_cat·A_cat`` is added into ``dx`` once: the input is read once instead of once per member.
The ops are ``torch.library`` custom ops (fake shapes, registered autograd), so a compiled layer calls them as they
are and cannot turn the in-place updates back into copies.

Measured on an H200 (8B, LoRA r=16 on 7 projections, dropout 0, 4×2048, compiled layers, one call): 16,246
tokens/s against 15,961 through autograd (1.02×). The same ops over the FP8 base and over 4-bit bases were built and
measured slower than autograd's path there (FP8: 18,910 against 19,526; QLoRA with FP8 compute: 17,387 against
18,136), because Inductor fuses autograd's separate adds into the kernels around them for free while an in-place
``addmm_`` with K = r re-reads its output: those bases keep the autograd path.

Same arithmetic as the autograd path (one rounding per GEMM output in the compute dtype); tested against it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


@torch.library.custom_op("tuneforge::lora_linear", mutates_args=())
def lora_linear(x: Tensor, x_drop: Tensor | None, weights: list[Tensor], biases: list[Tensor | None], a: Tensor,
                bs: list[Tensor]) -> list[Tensor]:
    """``[y_1, …, y_n, h]`` with ``h = x_drop aᵀ`` and ``y_i = x W_iᵀ + bias_i + h_i b_iᵀ`` (``h_i``: member i's
    columns of ``h``), for 2-D ``x`` (tokens × in), ``weights`` (out_i × in), ``a`` (the members' A matrices
    stacked, Σr × in) and ``bs`` (out_i × r_i, each LoRA scale folded in), all in one dtype; ``x_drop``: the
    adapters' dropped-out input, None for ``x`` itself. One member is one layer. ``h`` is returned for the
    backward."""
    h = torch.mm(x if x_drop is None else x_drop, a.t())
    ys = []
    for weight, bias, b, h_i in zip(weights, biases, bs, _split(h, bs), strict=True):
        y = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
        ys.append(y.addmm_(h_i, b.t()))
    return [*ys, h]


def _split(h: Tensor, bs: list[Tensor]) -> tuple[Tensor, ...]:
    """Each member's columns of ``h`` (views: a GEMM reads them with ``h``'s row stride, no copy)."""
    return h.split([b.shape[1] for b in bs], dim=1)


@lora_linear.register_fake
def _(x, x_drop, weights, biases, a, bs):
    return [*(x.new_empty(x.shape[0], w.shape[0]) for w in weights), x.new_empty(x.shape[0], a.shape[0])]


@torch.library.custom_op("tuneforge::lora_linear_backward", mutates_args=())
def lora_linear_backward(grads: list[Tensor], x_in: Tensor, dropout: bool, need_x: bool, h: Tensor,
                         weights: list[Tensor], a: Tensor, bs: list[Tensor]) -> list[Tensor]:
    """``[dx, dx_drop, da, db_1, …, db_n]`` of :func:`lora_linear` for the output gradients ``grads`` (tokens ×
    out_i); ``x_in``: the adapters' input (``x_drop`` under ``dropout``, else ``x``). ``da`` is one GEMM over the
    stacked A, reading ``x_in`` once. Without dropout the adapters' share of the input gradient is added into ``dx``
    in place and ``dx_drop`` is empty; with it, ``dx`` is the bases' share and ``dx_drop`` the dropped-out input's.
    ``need_x`` False: neither is made (empty)."""
    grad_h = torch.cat([torch.mm(g, b) for g, b in zip(grads, bs, strict=True)], dim=1)
    grad_a = torch.mm(grad_h.t(), x_in)
    grad_bs = [torch.mm(g.t(), h_i) for g, h_i in zip(grads, _split(h, bs), strict=True)]
    if not need_x:
        return [grads[0].new_empty(0), grads[0].new_empty(0), grad_a, *grad_bs]
    dx = torch.mm(grads[0], weights[0])
    for g, weight in zip(grads[1:], weights[1:], strict=True):
        dx.addmm_(g, weight)
    if dropout:
        return [dx, torch.mm(grad_h, a), grad_a, *grad_bs]
    return [dx.addmm_(grad_h, a), grads[0].new_empty(0), grad_a, *grad_bs]


@lora_linear_backward.register_fake
def _(grads, x_in, dropout, need_x, h, weights, a, bs):
    dx = x_in.new_empty(x_in.shape if need_x else 0)
    return [dx, x_in.new_empty(x_in.shape if need_x and dropout else 0), a.new_empty(a.shape),
            *(b.new_empty(b.shape) for b in bs)]


def _save(ctx, inputs, output) -> None:
    x, x_drop, weights, biases, a, bs = inputs
    ctx.dropout = x_drop is not None
    ctx.members = len(weights)
    # the frozen biases' (absent) gradients, shaped as autograd expects: a list of tensors is a list, else one leaf
    ctx.no_bias_grads = None if any(b is None for b in biases) else [None] * len(biases)
    # under dropout the backward reads the dropped-out input only: x itself is not kept
    ctx.save_for_backward(x if x_drop is None else x_drop, output[-1], a, *weights, *bs)


def _backward(ctx, grads: list[Tensor | None]):
    x_in, h, a, *rest = ctx.saved_tensors
    weights, bs = rest[:ctx.members], rest[ctx.members:]
    need_x = ctx.needs_input_grad[0]
    # a member whose output was not used gets no gradient: zeros keep one kernel sequence
    grads = [h.new_zeros(h.shape[0], w.shape[0]) if g is None else g.contiguous()
             for g, w in zip(grads[:ctx.members], weights, strict=True)]
    dx, dx_drop, grad_a, *grad_bs = lora_linear_backward(grads, x_in, ctx.dropout, need_x, h, weights, a, bs)
    return (dx if need_x else None, dx_drop if need_x and ctx.dropout else None, [None] * ctx.members,
            ctx.no_bias_grads, grad_a, grad_bs)


lora_linear.register_autograd(_backward, setup_context=_save)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a Linear would compute ``x`` in here: autocast's when it is on for ``x``'s device."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def fusable(base: nn.Module, x: Tensor) -> bool:
    """Whether :func:`lora_forward` takes this base: a plain ``nn.Linear``, frozen, in the compute dtype."""
    return (type(base) is nn.Linear and not base.weight.requires_grad
            and (base.bias is None or not base.bias.requires_grad) and base.weight.dtype == compute_dtype(x))


def lora_forward(x: Tensor, bases: list[nn.Linear], dropout: nn.Module, a: list[Tensor], b: list[Tensor],
                 scales: list[float]) -> list[Tensor]:
    """``base_i(x) + scale_i·(dropout(x) A_iᵀ) B_iᵀ`` for each member i, for ``x`` of any leading shape, through one
    :func:`lora_linear` (one GEMM for the stacked A), in the base weights' dtype (:func:`fusable`); gradients reach
    ``x`` and every ``a``/``b``. The members share ``x``'s dropout mask (one draw)."""
    dtype = bases[0].weight.dtype
    x2d = x.reshape(-1, x.shape[-1]).to(dtype)
    x_drop = None if isinstance(dropout, nn.Identity) or not dropout.training else dropout(x2d)
    biases = [None if base.bias is None else base.bias.to(dtype) for base in bases]
    a_cat = (torch.cat(a) if len(a) > 1 else a[0]).to(dtype)
    bs = [(b_i * s).to(dtype) for b_i, s in zip(b, scales, strict=True)]
    ys = lora_linear(x2d, x_drop, [base.weight for base in bases], biases, a_cat, bs)[:-1]
    return [y.view(*x.shape[:-1], y.shape[-1]) for y in ys]
