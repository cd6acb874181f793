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
reference otherwise (CPU, no Triton), so callers need no device checks. It runs as the custom op
``tuneforge::dequantize_4bit`` (tensors, ints and strings in; a fake implementation gives the output's shape), so
``torch.compile`` keeps a compiled decoder layer in one graph around it.

``fp8_from_4bit`` (op ``tuneforge::fp8_from_4bit``) turns a 4-bit weight straight into e4m3 codes with one scale per
output channel, for QLoRA's FP8 compute (``method.lora.base_precision: fp8``): no bf16 copy in between. Every
block's largest value decodes to exactly ±(its block scale) (the quantizer maps each block's absmax to the code of
±1), so a row's largest magnitude is the largest of its blocks' scales: a small kernel reduces the 1-byte block
codes of each row (``rows × blocks``), then one kernel writes ``value · (448 / rowmax)`` as e4m3, the same codes as
quantizing the dequantized fp32 weight per row (``fp8.quantize_rows_reference``). The reduction is a kernel rather
than torch ops because it runs inside the op at every forward and backward: four launches in all, against a dozen.
(A block of zeros in a double-quantized weight decodes to a small nonzero scale; it could only raise its row's max
if the whole row were near zero.)
"""

from __future__ import annotations

import functools

import torch

from tuneforge.quant.fp8 import ALIGN, E4M3_MAX, FP8, quantize_rows_reference
from tuneforge.quant.nf4 import (
    NESTED_BLOCKSIZE,
    Quantized4bit,
    code_values,
    dequantize_4bit,
    dynamic_map,
)

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
    def _block_scale(absmax_ptr, absmax2_ptr, offset_ptr, code_ptr, block, mask, NESTED: tl.constexpr,
                     DOUBLE: tl.constexpr):
        # a block's scale: its fp32 absmax, or (double quant) its 8-bit code decoded with the nested scale and offset
        if DOUBLE:
            absmax_code = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
            scale = tl.load(code_ptr + absmax_code) * tl.load(absmax2_ptr + block // NESTED, mask=mask, other=0.0)
            scale = scale + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
        return scale

    @triton.jit
    def _decode(packed_ptr, absmax_ptr, absmax2_ptr, offset_ptr, code_ptr, values_ptr, pid, n_out,
                BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, DOUBLE: tl.constexpr, BYTES: tl.constexpr):
        # program pid's BYTES packed bytes as (high, low) values times their block scale, in fp32, and the bytes
        byte = pid * BYTES + tl.arange(0, BYTES)
        valid = byte * 2 < n_out
        packed = tl.load(packed_ptr + byte, mask=valid, other=0).to(tl.int32)
        scale = _block_scale(absmax_ptr, absmax2_ptr, offset_ptr, code_ptr, byte // (BLOCKSIZE // 2), valid, NESTED,
                             DOUBLE)
        high = tl.load(values_ptr + (packed >> 4)) * scale  # the first value of a byte is its high nibble
        low = tl.load(values_ptr + (packed & 15)) * scale
        return high, low, byte, valid

    @triton.jit
    def _dequant_kernel(packed_ptr, absmax_ptr, absmax2_ptr, offset_ptr, code_ptr, values_ptr, out_ptr,
                        n_out, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, DOUBLE: tl.constexpr,
                        BYTES: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        high, low, _, _ = _decode(packed_ptr, absmax_ptr, absmax2_ptr, offset_ptr, code_ptr, values_ptr, pid, n_out,
                                  BLOCKSIZE, NESTED, DOUBLE, BYTES)
        out = tl.interleave(high, low).to(out_ptr.dtype.element_ty)
        index = pid * (2 * BYTES) + tl.arange(0, 2 * BYTES)
        tl.store(out_ptr + index, out, mask=index < n_out)

    @triton.jit
    def _dequant_row_max_kernel(absmax_ptr, absmax2_ptr, offset_ptr, code_ptr, out_ptr, blocks_per_row,
                                NESTED: tl.constexpr, DOUBLE: tl.constexpr, BLOCK: tl.constexpr):
        # one program per row: the largest |block scale| of the row's blocks
        row = tl.program_id(0).to(tl.int64)
        i = tl.arange(0, BLOCK)
        mask = i < blocks_per_row
        scale = _block_scale(absmax_ptr, absmax2_ptr, offset_ptr, code_ptr, row * blocks_per_row + i, mask, NESTED,
                             DOUBLE)
        amax = tl.max(tl.where(mask, tl.abs(scale), 0.0), axis=0)
        tl.store(out_ptr + row, tl.maximum(amax, 1e-12))

    @triton.jit
    def _dequant_fp8_kernel(packed_ptr, absmax_ptr, absmax2_ptr, offset_ptr, code_ptr, values_ptr, mult_ptr, out_ptr,
                            n_out, cols, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, DOUBLE: tl.constexpr,
                            BYTES: tl.constexpr):
        # _dequant_kernel's values, times 448 / rowmax (mult_ptr, per row: a byte never straddles two rows)
        pid = tl.program_id(0).to(tl.int64)
        high, low, byte, valid = _decode(packed_ptr, absmax_ptr, absmax2_ptr, offset_ptr, code_ptr, values_ptr, pid,
                                         n_out, BLOCKSIZE, NESTED, DOUBLE, BYTES)
        mult = tl.load(mult_ptr + (byte * 2) // cols, mask=valid, other=0.0)
        # (value · scale) · mult: the reference's two roundings, in its order
        out = tl.minimum(tl.maximum(tl.interleave(high * mult, low * mult), -448.0), 448.0)
        index = pid * (2 * BYTES) + tl.arange(0, 2 * BYTES)
        tl.store(out_ptr + index, out.to(tl.float8e4nv), mask=index < n_out)


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


# --- the custom ops: what torch.compile sees (tensors, ints and strings; no dataclass) ----------------------------

def _unpack(q: Quantized4bit) -> tuple:
    return q.packed, q.absmax, q.absmax2, q.offset, list(q.shape), q.blocksize, q.quant_type


def from_op_args(packed, absmax, absmax2, offset, shape, blocksize, quant_type,
                 dtype: torch.dtype = torch.float32) -> Quantized4bit:
    """The ``Quantized4bit`` a custom op's arguments (``_unpack``'s order) stand for."""
    return Quantized4bit(packed, absmax, torch.Size(shape), dtype, blocksize, quant_type, absmax2, offset)


def dequantize_eager(q: Quantized4bit, dtype: torch.dtype) -> torch.Tensor:
    """What the op ``tuneforge::dequantize_4bit`` runs (the kernel on a GPU, else the reference), for code that is
    already inside an op: a call through the dispatcher costs tens of microseconds."""
    return dequantize_4bit_triton(q, dtype) if use_fast_path(q) else dequantize_4bit(q, dtype)


@torch.library.custom_op("tuneforge::dequantize_4bit", mutates_args=())
def _dequantize_op(packed: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor | None,
                   offset: torch.Tensor | None, shape: list[int], blocksize: int, quant_type: str,
                   dtype: torch.dtype) -> torch.Tensor:
    return dequantize_eager(from_op_args(packed, absmax, absmax2, offset, shape, blocksize, quant_type, dtype), dtype)


@_dequantize_op.register_fake
def _(packed, absmax, absmax2, offset, shape, blocksize, quant_type, dtype):
    return packed.new_empty(shape, dtype=dtype)


def dequantize(q: Quantized4bit, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``dequantize_4bit`` through the fastest path that gives the same values on ``q``'s device."""
    return _dequantize_op(*_unpack(q), dtype or q.dtype)


def fp8_from_4bit_reference(q: Quantized4bit) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2-D 4-bit weight as ``(e4m3 codes (out × in), fp32 scale per output channel (out,))``, through fp32."""
    codes, scale = quantize_rows_reference(dequantize_4bit(q, torch.float32))
    return codes, scale.view(-1)


def fp8_from_4bit_triton(q: Quantized4bit) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fp8_from_4bit_reference`'s codes and scales, bit for bit, from two Triton kernels (rows of whole
    blocks): each row's largest block scale (a read of the 1-byte block codes), then the codes."""
    rows, cols = q.shape
    device = q.packed.device
    values, dmap = _tables(q.quant_type, device)
    absmax2 = q.absmax2 if q.double_quant else q.absmax  # unused pointers when not double-quantized
    offset = q.offset if q.double_quant else q.absmax
    rowmax = torch.empty((rows, 1), dtype=torch.float32, device=device)
    codes = torch.empty((rows, cols), dtype=FP8, device=device)
    blocks_per_row = cols // q.blocksize
    _dequant_row_max_kernel[(rows,)](q.absmax, absmax2, offset, dmap, rowmax, blocks_per_row, NESTED=NESTED_BLOCKSIZE,
                             DOUBLE=q.double_quant, BLOCK=max(16, triton.next_power_of_2(blocks_per_row)),
                             enable_fp_fusion=False)
    mult = E4M3_MAX / rowmax  # quantize_rows_reference's expression, so its rounding
    grid = (triton.cdiv(rows * cols // 2, BYTES_PER_PROGRAM),)
    _dequant_fp8_kernel[grid](q.packed, q.absmax, absmax2, offset, dmap, values, mult, codes, rows * cols, cols,
                      BLOCKSIZE=q.blocksize, NESTED=NESTED_BLOCKSIZE, DOUBLE=q.double_quant, BYTES=BYTES_PER_PROGRAM,
                      enable_fp_fusion=False)
    return codes, (rowmax / E4M3_MAX).view(-1)


def fp8_from_4bit_eager(q: Quantized4bit) -> tuple[torch.Tensor, torch.Tensor]:
    """What the op ``tuneforge::fp8_from_4bit`` runs, for code already inside an op (as ``dequantize_eager``)."""
    return fp8_from_4bit_triton(q) if use_fast_path(q) else fp8_from_4bit_reference(q)


@torch.library.custom_op("tuneforge::fp8_from_4bit", mutates_args=())
def _fp8_op(packed: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor | None, offset: torch.Tensor | None,
            shape: list[int], blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    return fp8_from_4bit_eager(from_op_args(packed, absmax, absmax2, offset, shape, blocksize, quant_type))


@_fp8_op.register_fake
def _(packed, absmax, absmax2, offset, shape, blocksize, quant_type):
    return packed.new_empty(shape, dtype=FP8), packed.new_empty(shape[0], dtype=torch.float32)


def fp8_convertible(q: Quantized4bit) -> bool:
    """A 2-D weight whose rows are whole blocks (so row maxima come from block scales) and whose dimensions FP8
    GEMMs take (multiples of 16): what the FP8 compute of QLoRA needs."""
    return len(q.shape) == 2 and q.shape[1] % q.blocksize == 0 and q.shape[0] % ALIGN == 0 and q.shape[1] % ALIGN == 0


def fp8_from_4bit(q: Quantized4bit) -> tuple[torch.Tensor, torch.Tensor]:
    """A 4-bit ``[out, in]`` weight (``fp8_convertible``) as e4m3 codes and one fp32 scale per output channel
    (the Triton kernel on a GPU, the fp32 reference elsewhere: the same values)."""
    return _fp8_op(*_unpack(q))
