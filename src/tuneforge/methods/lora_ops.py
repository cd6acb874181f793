"""A LoRA layer's training forward and backward over its frozen base, as opaque ops: dense, FP8, 4-bit, 4-bit in FP8.

Written with autograd, ``y = base(x) + (x Aᵀ)(s·B)ᵀ`` moves more memory than it needs: the LoRA term is added by
``addmm(y, h, Bᵀ)``, which first copies ``y`` into a new output (under ``torch.compile`` too: on an H200, 8B LoRA
with compiled layers, 10.6 ms of device-to-device copies in a 509 ms step), and in backward the LoRA's share of the
input gradient is written apart and then summed into the base's. Here the forward adds the LoRA term into the base
GEMM's own output (``addmm_``), the backward adds ``dh·A`` into ``dx = dy·W`` in place, and the frozen base gets no
weight gradient. The ops are ``torch.library`` custom ops (fake shapes, registered autograd), so a compiled layer
calls them as they are and cannot turn the in-place updates back into copies. Measured on an H200 (8B, compiled
layers, bf16 base): 16,246 against 15,961 tokens/s through autograd.

One op pair per kind of base, each the same adapter arithmetic around the base's own GEMMs:

- ``lora_linear``: a dense weight in the compute dtype;
- ``lora_linear_fp8``: ``fp8.Linear8``'s e4m3 codes and per-output-channel scales (``torch._scaled_mm``);
- ``lora_linear_4bit``: a 4-bit weight, dequantized in forward and again in backward (nothing kept per layer);
- ``lora_linear_4bit_fp8``: a 4-bit weight turned into e4m3 codes in forward and again in backward.

Same arithmetic as the autograd path (one rounding per GEMM output in the compute dtype); tested against it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tuneforge.quant.fp8 import Linear8, quantize_input, quantize_rows, scaled_matmul
from tuneforge.quant.linear4bit import Linear4bit
from tuneforge.quant.nf4 import Quantized4bit
from tuneforge.quant.nf4_gpu import dequantize_eager, fp8_from_4bit_eager

# --- the adapter's arithmetic, shared by every kind of base -----------------------------------------------------------


def _add_adapter(y: Tensor, x: Tensor, x_drop: Tensor | None, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """``(y + h bᵀ, h)`` with ``h = x_drop aᵀ`` (or ``x aᵀ``), added into ``y`` (a fresh base output) in place."""
    h = torch.mm(x if x_drop is None else x_drop, a.t())
    return y.addmm_(h, b.t()), h


def _adapter_backward(grad: Tensor, grad_x: Tensor, x: Tensor, x_drop: Tensor | None, h: Tensor, a: Tensor,
                      b: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, da, db, dx_drop)`` given the base's input gradient ``grad_x`` (fresh; the adapter's share is added
    into it in place unless there is dropout, whose input then gets its own gradient)."""
    grad_h = torch.mm(grad, b)
    grad_a = torch.mm(grad_h.t(), x if x_drop is None else x_drop)
    grad_b = torch.mm(grad.t(), h)
    if x_drop is None:
        return grad_x.addmm_(grad_h, a), grad_a, grad_b, grad_x.new_empty(0)
    return grad_x, grad_a, grad_b, torch.mm(grad_h, a)


def _forward_shapes(x: Tensor, out_features: int, a: Tensor) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape[0], out_features, dtype=a.dtype), x.new_empty(x.shape[0], a.shape[0], dtype=a.dtype)


def _backward_shapes(x: Tensor, x_drop: Tensor | None, a: Tensor, b: Tensor) -> tuple[Tensor, ...]:
    return (x.new_empty(x.shape), a.new_empty(a.shape), b.new_empty(b.shape),
            x.new_empty(0 if x_drop is None else x.shape))


def _dense(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())


def _fp8(x_codes: Tensor, x_scale: Tensor, codes: Tensor, scale: Tensor, bias: Tensor | None,
         dtype: torch.dtype) -> Tensor:
    y = scaled_matmul(x_codes, x_scale, codes, scale, dtype)
    return y if bias is None else y.add_(bias)


def _fp8_input_grad(grad_codes: Tensor, grad_scale: Tensor, codes: Tensor, dtype: torch.dtype) -> Tensor:
    # dx = dy·diag(s)·W8: the weight's scale rode on dy's columns, so W8ᵀ's rows need none (one FP8 copy serves both)
    ones = torch.ones(codes.shape[1], dtype=torch.float32, device=codes.device)
    return scaled_matmul(grad_codes, grad_scale, codes.t().contiguous(), ones, dtype)


def _q(packed: Tensor, absmax: Tensor, absmax2: Tensor | None, offset: Tensor | None, shape: list[int],
       blocksize: int, quant_type: str) -> Quantized4bit:
    return Quantized4bit(packed, absmax, torch.Size(shape), torch.float32, blocksize, quant_type, absmax2, offset)


# --- dense base ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("tuneforge::lora_linear", mutates_args=())
def lora_linear(x: Tensor, x_drop: Tensor | None, weight: Tensor, bias: Tensor | None, a: Tensor,
                b: Tensor) -> tuple[Tensor, Tensor]:
    """``(x Wᵀ + bias + h bᵀ, h)`` with ``h = x_drop aᵀ`` (``x_drop``: the adapter's dropped-out input, None for
    ``x`` itself), for 2-D ``x`` (tokens × in), ``weight`` (out × in), ``a`` (r × in) and ``b`` (out × r, the LoRA
    scale folded in), all in one dtype. ``h`` is returned for the backward."""
    return _add_adapter(_dense(x, weight, bias), x, x_drop, a, b)


@lora_linear.register_fake
def _(x, x_drop, weight, bias, a, b):
    return _forward_shapes(x, weight.shape[0], a)


@torch.library.custom_op("tuneforge::lora_linear_backward", mutates_args=())
def lora_linear_backward(grad: Tensor, x: Tensor, x_drop: Tensor | None, h: Tensor, weight: Tensor, a: Tensor,
                         b: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, da, db, dx_drop)`` of :func:`lora_linear` for the output gradient ``grad`` (tokens × out); without
    dropout the adapter's share is in ``dx`` and ``dx_drop`` is empty."""
    return _adapter_backward(grad, torch.mm(grad, weight), x, x_drop, h, a, b)


@lora_linear_backward.register_fake
def _(grad, x, x_drop, h, weight, a, b):
    return _backward_shapes(x, x_drop, a, b)


def _save_dense(ctx, inputs, output) -> None:
    x, x_drop, weight, _, a, b = inputs
    ctx.dropout = x_drop is not None
    ctx.save_for_backward(x, x_drop, output[1], weight, a, b)


def _backward_dense(ctx, grad_y: Tensor, _grad_h: Tensor | None):
    x, x_drop, h, weight, a, b = ctx.saved_tensors
    grad_x, grad_a, grad_b, grad_x_drop = lora_linear_backward(grad_y.contiguous(), x, x_drop, h, weight, a, b)
    return grad_x, grad_x_drop if ctx.dropout else None, None, None, grad_a, grad_b


lora_linear.register_autograd(_backward_dense, setup_context=_save_dense)


# --- FP8 base (fp8.Linear8: e4m3 codes, one scale per output channel) ---------------------------------------------


@torch.library.custom_op("tuneforge::lora_linear_fp8", mutates_args=())
def lora_linear_fp8(x: Tensor, x_codes: Tensor, x_scale: Tensor, x_drop: Tensor | None, weight: Tensor,
                    weight_scale: Tensor, bias: Tensor | None, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`lora_linear` with the base GEMM in FP8: ``x`` also given as its row-quantized codes and scales
    (``fp8.quantize_input``), ``weight`` as e4m3 codes with ``weight_scale`` (out,)."""
    return _add_adapter(_fp8(x_codes, x_scale, weight, weight_scale, bias, a.dtype), x, x_drop, a, b)


@lora_linear_fp8.register_fake
def _(x, x_codes, x_scale, x_drop, weight, weight_scale, bias, a, b):
    return _forward_shapes(x, weight.shape[0], a)


@torch.library.custom_op("tuneforge::lora_linear_fp8_backward", mutates_args=())
def lora_linear_fp8_backward(grad: Tensor, grad_codes: Tensor, grad_scale: Tensor, x: Tensor, x_drop: Tensor | None,
                             h: Tensor, weight: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`lora_linear_backward` for :func:`lora_linear_fp8`: ``grad`` also given quantized by rows with the
    weight's scales folded into its columns."""
    return _adapter_backward(grad, _fp8_input_grad(grad_codes, grad_scale, weight, grad.dtype), x, x_drop, h, a, b)


@lora_linear_fp8_backward.register_fake
def _(grad, grad_codes, grad_scale, x, x_drop, h, weight, a, b):
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


# --- 4-bit base (quant.Linear4bit's buffers), dequantized in the compute dtype or made into e4m3 codes ----------------


@torch.library.custom_op("tuneforge::lora_linear_4bit", mutates_args=())
def lora_linear_4bit(x: Tensor, x_codes: Tensor | None, x_scale: Tensor | None, x_drop: Tensor | None,
                     packed: Tensor, absmax: Tensor, absmax2: Tensor | None, offset: Tensor | None, shape: list[int],
                     blocksize: int, quant_type: str, bias: Tensor | None, a: Tensor,
                     b: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`lora_linear` over a 4-bit ``shape`` (out, in) weight; with ``x_codes``/``x_scale`` (``x``'s rows in
    e4m3, as :func:`lora_linear_fp8`) the weight becomes e4m3 codes and the base GEMM runs in FP8, else it is
    dequantized in ``a``'s dtype. The dense or FP8 weight lives only inside this call."""
    q = _q(packed, absmax, absmax2, offset, shape, blocksize, quant_type)
    if x_codes is None:
        y = _dense(x, dequantize_eager(q, a.dtype), bias)
    else:
        codes, scale = fp8_from_4bit_eager(q)
        y = _fp8(x_codes, x_scale, codes, scale, bias, a.dtype)
    return _add_adapter(y, x, x_drop, a, b)


@lora_linear_4bit.register_fake
def _(x, x_codes, x_scale, x_drop, packed, absmax, absmax2, offset, shape, blocksize, quant_type, bias, a, b):
    return _forward_shapes(x, shape[0], a)


@torch.library.custom_op("tuneforge::lora_linear_4bit_backward", mutates_args=())
def lora_linear_4bit_backward(grad: Tensor, x: Tensor, x_drop: Tensor | None, h: Tensor, packed: Tensor,
                              absmax: Tensor, absmax2: Tensor | None, offset: Tensor | None, shape: list[int],
                              blocksize: int, quant_type: str, fp8: bool, a: Tensor,
                              b: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`lora_linear_backward` for :func:`lora_linear_4bit` (``fp8``: the base GEMM in FP8), the weight made
    again from its 4 bits."""
    q = _q(packed, absmax, absmax2, offset, shape, blocksize, quant_type)
    if not fp8:
        grad_x = torch.mm(grad, dequantize_eager(q, grad.dtype))
    else:
        codes, scale = fp8_from_4bit_eager(q)
        grad_codes, grad_scale = quantize_rows(grad, scale)
        grad_x = _fp8_input_grad(grad_codes, grad_scale, codes, grad.dtype)
    return _adapter_backward(grad, grad_x, x, x_drop, h, a, b)


@lora_linear_4bit_backward.register_fake
def _(grad, x, x_drop, h, packed, absmax, absmax2, offset, shape, blocksize, quant_type, fp8, a, b):
    return _backward_shapes(x, x_drop, a, b)


def _save_4bit(ctx, inputs, output) -> None:
    x, x_codes, _, x_drop, packed, absmax, absmax2, offset, shape, blocksize, quant_type, _, a, b = inputs
    ctx.dropout, ctx.fp8 = x_drop is not None, x_codes is not None
    ctx.layout = (shape, blocksize, quant_type)
    # the 4-bit buffers (references, no copies): the backward makes the weight again
    ctx.save_for_backward(x, x_drop, output[1], packed, absmax, absmax2, offset, a, b)


def _backward_4bit(ctx, grad_y: Tensor, _grad_h: Tensor | None):
    x, x_drop, h, packed, absmax, absmax2, offset, a, b = ctx.saved_tensors
    grad_x, grad_a, grad_b, grad_x_drop = lora_linear_4bit_backward(
        grad_y.contiguous(), x, x_drop, h, packed, absmax, absmax2, offset, *ctx.layout, ctx.fp8, a, b)
    return (grad_x, None, None, grad_x_drop if ctx.dropout else None, *(None,) * 8, grad_a, grad_b)


lora_linear_4bit.register_autograd(_backward_4bit, setup_context=_save_4bit)


# --- the entry point --------------------------------------------------------------------------------------------------


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a Linear would compute ``x`` in here: autocast's when it is on for ``x``'s device."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def fusable(base: nn.Module, x: Tensor) -> bool:
    """Whether :func:`lora_forward` takes this frozen base: a plain ``nn.Linear`` in the compute dtype, a
    ``Linear8``, or a ``Linear4bit`` (its bias frozen)."""
    if isinstance(base, Linear8):
        return True
    if isinstance(base, Linear4bit):
        return base.bias is None or not base.bias.requires_grad
    return (type(base) is nn.Linear and not base.weight.requires_grad
            and (base.bias is None or not base.bias.requires_grad) and base.weight.dtype == compute_dtype(x))


def lora_forward(x: Tensor, base: nn.Module, dropout: nn.Module, a: Tensor, b: Tensor, scale: float) -> Tensor:
    """``base(x) + scale·(dropout(x) Aᵀ) Bᵀ`` for ``x`` of any leading shape through the op for ``base``'s kind
    (:func:`fusable`), in the dtype the base computes in; gradients reach ``x``, ``a`` and ``b``."""
    if isinstance(base, Linear8):
        dtype = base.out_dtype
    elif isinstance(base, Linear4bit):
        dtype = base.compute_dtype or x.dtype
    else:
        dtype = base.weight.dtype
    x2d = x.reshape(-1, x.shape[-1]).to(dtype)
    x_drop = None if isinstance(dropout, nn.Identity) or not dropout.training else dropout(x2d)
    bias = None if base.bias is None else base.bias.to(dtype)
    a, b = a.to(dtype), (b * scale).to(dtype)
    if isinstance(base, Linear8):
        codes, x_scale = quantize_input(x, base.in_features)  # shared with the other layers reading x
        y, _ = lora_linear_fp8(x2d, codes, x_scale, x_drop, base.weight, base.weight_scale, bias, a, b)
    elif isinstance(base, Linear4bit):
        codes, x_scale = quantize_input(x, base.in_features) if base.fp8 else (None, None)
        y, _ = lora_linear_4bit(x2d, codes, x_scale, x_drop, base.weight, base.absmax, base.absmax2,
                                base.absmax_offset, [base.out_features, base.in_features], base.blocksize,
                                base.quant_type, bias, a, b)
        y = y.to(x.dtype)  # as Linear4bit: the output in the input's dtype
    else:
        y, _ = lora_linear(x2d, x_drop, base.weight, bias, a, b)
    return y.view(*x.shape[:-1], y.shape[-1])
