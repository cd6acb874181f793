"""An FP8 (e4m3) frozen base for LoRA: ``method.lora.base_precision: fp8``.

Each frozen base weight is quantized once to float8_e4m3fn with one scale per output channel; activations are
scaled per row on the fly, and ``torch._scaled_mm`` (rowwise scales, fp32 accumulation, bf16 out) runs both GEMMs
the frozen base has: the forward ``y = x Wᵀ`` and the input gradient ``dx = dy W``. The weight needs no gradient,
so nothing of ``x`` is kept for the base (LoRA's A and B, in bf16/fp32, keep what they need as usual).

Why this is fast only when the quantization is cheap: an FP8 GEMM runs at about twice bf16's rate on Hopper, but
quantizing a tensor in separate eager kernels (abs, amax, divide, cast) reads it five times and cost as much as the
GEMM saved. Here one Triton kernel reads each row once and writes its FP8 codes and scale; q/k/v (and gate/up)
share their input, so it is quantized once for the three (the last input is remembered, by identity and version).
The input gradient folds the weight's per-output-channel scale into the gradient's row quantization (the same
kernel), so one FP8 copy of the weight serves both GEMMs (transposed on the fly in backward: 2 bytes moved per
weight, against the GEMM's 2·tokens FLOPs).

Measured on an H200 (8B shapes, LoRA r=16, 4×2048 tokens): 14.1k tokens/s with the bf16 base and Liger's kernels,
15.8k with this base; with compiled decoder layers (``train.compile``, which fuses the quantization into the
kernels around the GEMMs) 15.6k against 19.8k (benchmarks/results/speed_fp8_unsloth_h200.md).

With ``method.name: qlora`` the base stays 4-bit and each GEMM gets its e4m3 codes from the 4-bit weight on the fly
(``Linear4bit.fp8``, ``nf4_gpu.fp8_from_4bit``), with this module's row quantization and ``scaled_matmul``.

On a machine without FP8 matrix units (CUDA compute capability < 8.9) or on the CPU, ``check_fp8_device`` refuses.
The CPU path here (dequantize, then matmul in fp32) computes the same function slowly: tests use it as the reference.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from tuneforge.errors import ConfigError

E4M3_MAX = 448.0
FP8 = torch.float8_e4m3fn
ALIGN = 16  # _scaled_mm wants every dimension a multiple of 16


def fp8_supported(device: torch.device) -> bool:
    """Whether ``device`` has FP8 matrix units (CUDA compute capability 8.9: Ada; 9.0: Hopper; or newer)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def check_fp8_device(device: torch.device) -> None:
    """Raise ConfigError, naming the key and the fix, when ``device`` cannot run the FP8 base."""
    if device.type != "cuda":
        raise ConfigError("method.lora.base_precision=fp8 needs a CUDA GPU with FP8 matrix units (compute "
                          f"capability 8.9+: L4, L40, H100, H200); this run is on {device.type}, where FP8 can only "
                          "be emulated far slower than bf16. Set method.lora.base_precision=bf16")
    if not fp8_supported(device):
        name = torch.cuda.get_device_name(device)
        cc = ".".join(map(str, torch.cuda.get_device_capability(device)))
        raise ConfigError(f"method.lora.base_precision=fp8: {name} (compute capability {cc}) has no FP8 matrix "
                          "units (8.9+ needed: L4, L40, H100, H200). Set method.lora.base_precision=bf16")


# --- quantization ---------------------------------------------------------------------------------------------------

def quantize_rows_reference(x: torch.Tensor, col_scale: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scale)`` with ``x·col_scale ≈ codes · scale``: e4m3 codes (rows × cols), fp32 scales (rows × 1).

    Each row's largest magnitude maps to 448, e4m3's largest finite value. ``col_scale`` (cols,) multiplies the
    columns first (the backward folds the weight's scales into the gradient this way).
    """
    x = x.float()
    if col_scale is not None:
        x = x * col_scale.float()
    amax = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)
    codes = (x * (E4M3_MAX / amax)).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)
    return codes, amax / E4M3_MAX


def _triton_quantizer():
    import triton  # optional dependency (GPU only)
    import triton.language as tl  # optional dependency (GPU only)

    @triton.jit
    def quantize_kernel(x_ptr, c_ptr, q_ptr, s_ptr, n_cols, x_stride,
                        HAS_C: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < n_cols
        x = tl.load(x_ptr + row * x_stride + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_C:
            x = x * tl.load(c_ptr + offs, mask=mask, other=0.0)
        amax = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12)
        q = tl.minimum(tl.maximum(x * (448.0 / amax), -448.0), 448.0)
        tl.store(q_ptr + row * n_cols + offs, q.to(tl.float8e4nv), mask=mask)
        tl.store(s_ptr + row, amax / 448.0)

    def quantize(x: torch.Tensor, col_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        rows, cols = x.shape
        codes = torch.empty((rows, cols), dtype=FP8, device=x.device)
        scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(cols)
        warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
        c = col_scale if col_scale is not None else scale  # an unused pointer when HAS_C is off
        quantize_kernel[(rows,)](x, c, codes, scale, cols, x.stride(0), HAS_C=col_scale is not None, BLOCK=block,
                                 num_warps=warps)
        return codes, scale

    return quantize


_QUANTIZE: list = []


def quantize_rows(x: torch.Tensor, col_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_rows_reference` for a 2-D tensor; one fused Triton kernel on a GPU (one read of ``x``).

    Under ``torch.compile`` the reference ops are traced instead: Inductor fuses them into one kernel with what
    produced ``x`` and computes a shared input's codes once. That includes the backward of a custom op, which
    AOTAutograd traces with fake tensors outside Dynamo (``is_compiling`` is then False).
    """
    if x.device.type != "cuda" or torch.compiler.is_compiling() or is_fake(x):
        return quantize_rows_reference(x, col_scale)
    if not _QUANTIZE:
        _QUANTIZE.append(_triton_quantizer())
    if x.stride(-1) != 1:
        x = x.contiguous()
    return _QUANTIZE[0](x, None if col_scale is None else col_scale.float().contiguous())


def scaled_matmul(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """``(a·a_scale) @ (b·b_scale)ᵀ`` for e4m3 ``a`` (M × K, scales M × 1) and ``b`` (N × K, scales N): FP8 tensor
    cores via ``torch._scaled_mm`` on a GPU, an fp32 emulation on the CPU (the tests' reference)."""
    if a.device.type != "cuda":
        return ((a.float() * a_scale) @ (b.float() * b_scale.view(-1, 1)).t()).to(out_dtype)
    m = a.shape[0]
    pad = -m % ALIGN
    if pad:  # a few rows (generation, a short batch): zero rows make the shape legal and are dropped after
        a = torch.cat([a, a.new_zeros(pad, a.shape[1])])
        a_scale = torch.cat([a_scale, a_scale.new_ones(pad, 1)])
    out = torch._scaled_mm(a, b.t(), scale_a=a_scale, scale_b=b_scale.view(1, -1).float(), out_dtype=out_dtype)
    return out[:m] if pad else out


_EMULATED: dict[tuple[int, bool], tuple[weakref.ref, torch.Tensor]] = {}


def _emulated(codes: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """A frozen weight's ``codes · scale`` (or its codes alone) in fp32 for the CPU emulation, made once and kept
    while the codes live."""
    key = (id(codes), scale is None)
    ref, value = _EMULATED.get(key, (None, None))
    if ref is None or ref() is not codes:
        value = codes.float() if scale is None else codes.float() * scale.view(-1, 1)
        _EMULATED[key] = (weakref.ref(codes, lambda _: _EMULATED.pop(key, None)), value)
    return value


def input_gradient(grad: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """``dx = dy·W`` for 2-D ``grad`` and a weight given as e4m3 ``codes`` (out × in) with per-output-channel
    ``scale``: the scale moves onto dy's columns (``dy·diag(s)·W8``), so W8ᵀ's rows need none (ones) and one FP8
    copy of the weight serves the forward and this GEMM. The CPU emulates it with the codes made fp32 once."""
    g_codes, g_scale = quantize_rows(grad, scale)
    if codes.is_cuda:
        ones = torch.ones(codes.shape[1], dtype=torch.float32, device=codes.device)
        return scaled_matmul(g_codes, g_scale, codes.t().contiguous(), ones, out_dtype)
    return ((g_codes.float() * g_scale) @ _emulated(codes, None)).to(out_dtype)


# --- the layer ------------------------------------------------------------------------------------------------------

class _FP8Linear(torch.autograd.Function):
    """``y = x Wᵀ`` with ``x`` given already quantized; backward gives ``dx`` only (the weight is frozen)."""

    @staticmethod
    def forward(ctx, x, x_codes, x_scale, weight, weight_scale, out_dtype):
        ctx.save_for_backward(weight, weight_scale)
        ctx.in_dtype = x.dtype
        if weight.is_cuda:
            y = scaled_matmul(x_codes, x_scale, weight, weight_scale, out_dtype)
        else:  # the emulation, with the weight dequantized once
            y = ((x_codes.float() * x_scale) @ _emulated(weight, weight_scale).t()).to(out_dtype)
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        weight, weight_scale = ctx.saved_tensors
        dx = input_gradient(grad.reshape(-1, grad.shape[-1]), weight, weight_scale, grad.dtype)
        return dx.view(*grad.shape[:-1], weight.shape[1]).to(ctx.in_dtype), None, None, None, None, None


class _LastInput:
    """The last input quantized, by identity and version: q/k/v (and gate/up) read the same tensor. The codes go
    with the input: kept past it, the last layer's (8B: 112 MiB) stayed allocated between steps."""

    entry: tuple[weakref.ref, int, tuple[torch.Tensor, torch.Tensor]] | None = None  # (input, version, codes)

    @classmethod
    def codes(cls, x2d: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.is_inference():  # under torch.inference_mode: no version counter to see an in-place change by
            return quantize_rows(x2d)
        entry = cls.entry
        if entry is not None and entry[0]() is x and entry[1] == x._version:
            return entry[2]
        value = quantize_rows(x2d)
        cls.entry = (weakref.ref(x, cls._forget), x._version, value)  # one assignment: _forget may run any time
        return value

    @classmethod
    def _forget(cls, ref: weakref.ref) -> None:
        if cls.entry is not None and cls.entry[0] is ref:
            cls.entry = None


def quantize_input(x: torch.Tensor, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer input's rows as e4m3 codes and scales, quantized once for the layers that share it (q/k/v, gate/up;
    under ``torch.compile`` the traced ops are shared by the compiler instead)."""
    x2d = x.reshape(-1, in_features)
    with torch.no_grad():  # codes and scales carry no gradient: the layer's autograd takes it through x
        return quantize_rows(x2d) if torch.compiler.is_compiling() else _LastInput.codes(x2d, x)


class Linear8(nn.Module):
    """A frozen Linear whose weight is stored as e4m3 codes with one fp32 scale per output channel.

    ``weight`` (out × in, float8_e4m3fn) and ``weight_scale`` (out,) are buffers: nothing here trains. Outputs are
    in ``out_dtype`` (bf16). Build one with :meth:`from_linear`.
    """

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 out_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("bias", bias)
        self.out_dtype = out_dtype

    @classmethod
    def from_linear(cls, linear: nn.Linear, out_dtype: torch.dtype = torch.bfloat16) -> Linear8:
        """Quantize ``linear``'s weight (per output channel); its bias, if any, stays in ``out_dtype``."""
        with torch.no_grad():
            codes, scale = quantize_rows_reference(linear.weight.detach())
            bias = None if linear.bias is None else linear.bias.detach().to(out_dtype)
        return cls(codes, scale.view(-1), bias, out_dtype)

    def dequantized(self) -> torch.Tensor:
        """The weight the codes stand for, in fp32 (out × in)."""
        return self.weight.float() * self.weight_scale.view(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes, scale = quantize_input(x, self.in_features)
        y = _FP8Linear.apply(x, codes, scale, self.weight, self.weight_scale, self.out_dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 (per-channel scales)"


def convertible(linear: nn.Module) -> bool:
    """An ``nn.Linear`` whose dimensions FP8 GEMMs take (multiples of 16)."""
    return (type(linear) is nn.Linear and linear.in_features % ALIGN == 0
            and linear.out_features % ALIGN == 0)
