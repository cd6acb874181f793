"""A LoRA layer's training forward and backward over a frozen dense base, as two opaque ops.

Written with autograd, ``y = x Wᵀ + (x Aᵀ)(s·B)ᵀ`` moves more memory than it needs: the LoRA term is added by
``addmm(y, h, Bᵀ)``, which first copies ``y`` into a new output (under ``torch.compile`` too: on an H200, 8B LoRA
with compiled layers, 10.6 ms of device-to-device copies in a 509 ms step), and in backward the LoRA's share of the
input gradient is written apart and then summed into the base's. Here the forward adds the LoRA term into the base
GEMM's own output (``addmm_``), the backward adds ``dh·A`` into ``dx = dy·W`` in place, and the frozen base gets no
weight gradient. The ops are ``torch.library`` custom ops (fake shapes, registered autograd), so a compiled layer
calls them as they are and cannot turn the in-place updates back into copies.

Same arithmetic as the autograd path (one rounding per GEMM output in the compute dtype); tested against it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tuneforge.quant.fp8 import Linear8, quantize_input, quantize_rows, scaled_matmul


@torch.library.custom_op("tuneforge::lora_linear", mutates_args=())
def lora_linear(x: Tensor, x_drop: Tensor | None, weight: Tensor, bias: Tensor | None, a: Tensor,
                b: Tensor) -> tuple[Tensor, Tensor]:
    """``(x Wᵀ + bias + h bᵀ, h)`` with ``h = x_drop aᵀ`` (``x_drop``: the adapter's dropped-out input, None for
    ``x`` itself), for 2-D ``x`` (tokens × in), ``weight`` (out × in), ``a`` (r × in) and ``b`` (out × r, the LoRA
    scale folded in), all in one dtype. ``h`` is returned for the backward."""
    h = torch.mm(x if x_drop is None else x_drop, a.t())
    y = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
    y.addmm_(h, b.t())
    return y, h


@lora_linear.register_fake
def _lora_linear_shapes(x, x_drop, weight, bias, a, b):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], a.shape[0])


def _adapter_grads(grad: Tensor, x_in: Tensor, h: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    grad_h = torch.mm(grad, b)
    return grad_h, torch.mm(grad_h.t(), x_in), torch.mm(grad.t(), h)


def _add_adapter_grad(grad_x: Tensor, grad_h: Tensor, a: Tensor, dropout: bool) -> tuple[Tensor, Tensor]:
    """``(dx, dx_drop)``: the adapter's input gradient added into the base's in place, or apart under dropout."""
    if not dropout:
        return grad_x.addmm_(grad_h, a), grad_x.new_empty(0)
    return grad_x, torch.mm(grad_h, a)


@torch.library.custom_op("tuneforge::lora_linear_backward", mutates_args=())
def lora_linear_backward(grad: Tensor, x: Tensor, x_drop: Tensor | None, h: Tensor, weight: Tensor, a: Tensor,
                         b: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, da, db, dx_drop)`` of :func:`lora_linear` for the output gradient ``grad`` (tokens × out); without
    dropout the adapter's share is in ``dx`` and ``dx_drop`` is empty."""
    grad_h, grad_a, grad_b = _adapter_grads(grad, x if x_drop is None else x_drop, h, a, b)
    grad_x, grad_x_drop = _add_adapter_grad(torch.mm(grad, weight), grad_h, a, x_drop is not None)
    return grad_x, grad_a, grad_b, grad_x_drop


def _backward_shapes(x, x_drop, a, b):
    return (x.new_empty(x.shape), a.new_empty(a.shape), b.new_empty(b.shape),
            x.new_empty(0 if x_drop is None else x.shape))


@lora_linear_backward.register_fake
def _lora_linear_backward_shapes(grad, x, x_drop, h, weight, a, b):
    return _backward_shapes(x, x_drop, a, b)


def _save(ctx, inputs, output) -> None:
    x, x_drop, weight, _, a, b = inputs
    ctx.dropout = x_drop is not None
    ctx.save_for_backward(x, x_drop, output[1], weight, a, b)


def _backward(ctx, grad_y: Tensor, _grad_h: Tensor | None):
    x, x_drop, h, weight, a, b = ctx.saved_tensors
    grad_x, grad_a, grad_b, grad_x_drop = lora_linear_backward(grad_y.contiguous(), x, x_drop, h, weight, a, b)
    return grad_x, grad_x_drop if ctx.dropout else None, None, None, grad_a, grad_b


lora_linear.register_autograd(_backward, setup_context=_save)


# --- the same over an FP8 base (fp8.Linear8: e4m3 codes, one scale per output channel) -------------------------------

@torch.library.custom_op("tuneforge::lora_linear_fp8", mutates_args=())
def lora_linear_fp8(x: Tensor, x_codes: Tensor, x_scale: Tensor, x_drop: Tensor | None, weight: Tensor,
                    weight_scale: Tensor, bias: Tensor | None, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`lora_linear` with the base GEMM in FP8: ``x`` also given as its row-quantized codes and scales
    (``fp8.quantize_input``), ``weight`` as e4m3 codes with ``weight_scale`` (out,)."""
    h = torch.mm(x if x_drop is None else x_drop, a.t())
    y = scaled_matmul(x_codes, x_scale, weight, weight_scale, a.dtype)
    if bias is not None:
        y += bias
    y.addmm_(h, b.t())
    return y, h


@lora_linear_fp8.register_fake
def _lora_linear_fp8_shapes(x, x_codes, x_scale, x_drop, weight, weight_scale, bias, a, b):
    return x.new_empty(x.shape[0], weight.shape[0], dtype=a.dtype), x.new_empty(x.shape[0], a.shape[0], dtype=a.dtype)


@torch.library.custom_op("tuneforge::lora_linear_fp8_backward", mutates_args=())
def lora_linear_fp8_backward(grad: Tensor, grad_codes: Tensor, grad_scale: Tensor, x: Tensor, x_drop: Tensor | None,
                             h: Tensor, weight: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`lora_linear_backward` for :func:`lora_linear_fp8`: ``grad`` also given quantized by rows with the
    weight's scales folded into its columns (so ``Wᵀ``'s codes need no scale: one FP8 copy serves both GEMMs)."""
    grad_h, grad_a, grad_b = _adapter_grads(grad, x if x_drop is None else x_drop, h, a, b)
    ones = torch.ones(weight.shape[1], dtype=torch.float32, device=weight.device)
    grad_x = scaled_matmul(grad_codes, grad_scale, weight.t().contiguous(), ones, grad.dtype)
    grad_x, grad_x_drop = _add_adapter_grad(grad_x, grad_h, a, x_drop is not None)
    return grad_x, grad_a, grad_b, grad_x_drop


@lora_linear_fp8_backward.register_fake
def _lora_linear_fp8_backward_shapes(grad, grad_codes, grad_scale, x, x_drop, h, weight, a, b):
    return _backward_shapes(x, x_drop, a, b)


def _save_fp8(ctx, inputs, output) -> None:
    x, _, _, x_drop, weight, weight_scale, _, a, b = inputs
    ctx.dropout = x_drop is not None
    ctx.save_for_backward(x, x_drop, output[1], weight, weight_scale, a, b)


def _backward_fp8(ctx, grad_y: Tensor, _grad_h: Tensor | None):
    x, x_drop, h, weight, weight_scale, a, b = ctx.saved_tensors
    grad_y = grad_y.contiguous()
    # traced under torch.compile: the quantization fuses into the kernel that made the gradient
    grad_codes, grad_scale = quantize_rows(grad_y, weight_scale)
    grad_x, grad_a, grad_b, grad_x_drop = lora_linear_fp8_backward(grad_y, grad_codes, grad_scale, x, x_drop, h,
                                                                   weight, a, b)
    return grad_x, None, None, grad_x_drop if ctx.dropout else None, None, None, None, grad_a, grad_b


lora_linear_fp8.register_autograd(_backward_fp8, setup_context=_save_fp8)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a Linear would compute ``x`` in here: autocast's when it is on for ``x``'s device."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def lora_forward(x: Tensor, base: nn.Linear | Linear8, dropout: nn.Module, a: Tensor, b: Tensor,
                 scale: float) -> Tensor:
    """``base(x) + scale·(dropout(x) Aᵀ) Bᵀ`` for ``x`` of any leading shape through :func:`lora_linear` (a dense
    base in the compute dtype: the caller checks) or :func:`lora_linear_fp8`; gradients reach ``x``, ``a``, ``b``."""
    dtype = base.out_dtype if isinstance(base, Linear8) else base.weight.dtype
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.dtype != dtype and not isinstance(base, Linear8):
        x2d = x2d.to(dtype)
    x_drop = None if isinstance(dropout, nn.Identity) or not dropout.training else dropout(x2d).to(dtype)
    bias = None if base.bias is None else base.bias.to(dtype)
    a, b = a.to(dtype), (b * scale).to(dtype)
    if isinstance(base, Linear8):
        codes, x_scale = quantize_input(x, base.in_features)  # shared with the other layers reading x
        y, _ = lora_linear_fp8(x2d.to(dtype), codes, x_scale, x_drop, base.weight, base.weight_scale, bias, a, b)
    else:
        y, _ = lora_linear(x2d, x_drop, base.weight, bias, a, b)
    return y.view(*x.shape[:-1], y.shape[-1])
