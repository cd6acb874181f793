"""Fast 4-bit dequantization for GPUs: one Triton kernel, bit-for-bit ``nf4.dequantize_4bit``.

The reference decodes through fp32 temporaries (about 18 bytes of memory traffic per value, plus
two fp32 copies of the weight alive at once). Training dequantizes every 4-bit weight three times
per step (forward, checkpoint recompute, backward), so this kernel reads the packed codes and the
8-bit block scales once and writes the weight once (2.5 bytes per value in bf16).

Same arithmetic as the reference, in the same order: the block scale is
``code[absmax] * absmax2 + offset`` and each value ``values[nibble] * scale``, in fp32, rounded
once to the output dtype. The kernel is launched with ``enable_fp_fusion=False`` so the compiler
cannot contract the scale into a fused multiply-add, which would round differently.

``dequantize`` picks this kernel for CUDA tensors when Triton is importable and falls back to the
reference otherwise (CPU, no Triton), so callers need no device checks.
"""

from __future__ import annotations

import functools

import torch

from tuneforge.quant.nf4 import NESTED_BLOCKSIZE, Quantized4bit, code_values, dequantize_4bit, dynamic_map

try:  # Triton is absent on CPU-only installs: the reference path is used there.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BYTES_PER_PROGRAM = 1024  # 2048 output values per program: enough work to hide the table lookups


def triton_available() -> bool:
    """Whether the Triton kernel can be launched at all (it still needs CUDA tensors, or TRITON_INTERPRET=1)."""
    return triton is not None


if triton is not None:

    @triton.jit
    def _dequant_kernel(packed_ptr, absmax_ptr, absmax2_ptr, offset_ptr, code_ptr, values_ptr, out_ptr,
                        n_out, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, DOUBLE: tl.constexpr,
                        BYTES: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        byte = pid * BYTES + tl.arange(0, BYTES)
        valid = byte * 2 < n_out
        packed = tl.load(packed_ptr + byte, mask=valid, other=0).to(tl.int32)
        block = byte // (BLOCKSIZE // 2)
        if DOUBLE:
            absmax_code = tl.load(absmax_ptr + block, mask=valid, other=0).to(tl.int32)
            scale = tl.load(code_ptr + absmax_code) * tl.load(absmax2_ptr + block // NESTED, mask=valid, other=0.0)
            scale = scale + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + block, mask=valid, other=0.0)
        high = tl.load(values_ptr + (packed >> 4)) * scale  # the first value of a byte is its high nibble
        low = tl.load(values_ptr + (packed & 15)) * scale
        out = tl.interleave(high, low).to(out_ptr.dtype.element_ty)
        index = pid * (2 * BYTES) + tl.arange(0, 2 * BYTES)
        tl.store(out_ptr + index, out, mask=index < n_out)


@functools.cache
def _tables(quant_type: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The 16 code values and bitsandbytes' 256-entry dynamic map on ``device`` (built once per device)."""
    return code_values(quant_type, device), dynamic_map().to(device)


def dequantize_4bit_triton(q: Quantized4bit, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``dequantize_4bit`` as one Triton kernel launch (CUDA tensors, or any under TRITON_INTERPRET=1)."""
    if triton is None:
        raise RuntimeError("dequantize_4bit_triton needs the triton package")
    device = q.packed.device
    out = torch.empty(q.shape, dtype=dtype or q.dtype, device=device)
    n = out.numel()
    if n == 0:
        return out
    values, dmap = _tables(q.quant_type, device)
    absmax = q.absmax
    absmax2 = q.absmax2 if q.double_quant else absmax  # unused pointers when not double-quantized
    offset = q.offset if q.double_quant else absmax
    grid = (triton.cdiv((n + 1) // 2, BYTES_PER_PROGRAM),)
    _dequant_kernel[grid](q.packed, absmax, absmax2, offset, dmap, values, out, n,
                          BLOCKSIZE=q.blocksize, NESTED=NESTED_BLOCKSIZE, DOUBLE=q.double_quant,
                          BYTES=BYTES_PER_PROGRAM, enable_fp_fusion=False)
    return out


def use_fast_path(q: Quantized4bit) -> bool:
    """The Triton kernel applies: CUDA tensors, Triton installed, an even block size."""
    return triton is not None and q.packed.is_cuda and q.blocksize % 2 == 0


def dequantize(q: Quantized4bit, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``dequantize_4bit`` through the fastest path that gives the same values on ``q``'s device."""
    if use_fast_path(q):
        return dequantize_4bit_triton(q, dtype)
    return dequantize_4bit(q, dtype)
