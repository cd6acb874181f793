"""4-bit blockwise weight quantization (NF4, FP4, int4) in bitsandbytes' format, in pure PyTorch.

Format (what bitsandbytes' ``quantize_4bit`` produces, so codes and scales are interchangeable):

- the tensor is flattened row-major and cut into blocks of ``blocksize`` (64) values; the last
  block may be partial;
- each block is scaled by its absmax into [-1, 1] and every value becomes the index (0-15) of the
  nearest of 16 code values (ties go to the lower value, as in bitsandbytes' kernels);
- two codes per byte, the first in the high nibble; ``packed`` has shape ``[(numel + 1) // 2, 1]``;
- double quantization: the fp32 absmax values minus their mean (``offset``) are quantized to
  8 bits in blocks of 256 with bitsandbytes' signed dynamic map; ``absmax2`` holds those blocks'
  absmax. Dequantizing adds ``offset`` back.

"int4" (symmetric absmax int4, codes ``round(7·x) + 8``) is ours, for quality comparisons only.

Everything is vectorized tensor code that runs on any device; ``_quantize_blocks`` and
``_dequantize_blocks`` are pure functions a compiled GPU path can wrap or replace.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

QUANT_TYPES = ("nf4", "fp4", "int4")
NESTED_BLOCKSIZE = 256
# Blocks quantized per step: bounds the temporaries to a few times 4M values however big the tensor.
CHUNK_VALUES = 1 << 22

# bitsandbytes' NF4 values (QLoRA's normal-float quantiles), exactly as its kernels use them.
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# FP4 (1 sign, 2 exponent, 1 mantissa bit): magnitudes by the low 3 bits, divided by the max, 12.
FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
# bitsandbytes' CUDA FP4 decision thresholds on |x| (fp32 literals, a hair off the exact midpoints,
# which decides exact ties as bf16 inputs produce) and the low 3 bits of each magnitude bucket.
FP4_PIVOTS = (0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333)
FP4_BUCKET_BITS = (0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011)


def code_values(quant_type: str, device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 fp32 values that codes 0..15 stand for (before scaling by the block's absmax)."""
    _check_quant_type(quant_type)
    if quant_type == "nf4":
        return torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)
    if quant_type == "fp4":
        mags = torch.tensor(FP4_MAGNITUDES, dtype=torch.float32, device=device) / 12.0
        return torch.cat([mags, -mags])  # bit 3 is the sign
    return (torch.arange(16, dtype=torch.float32, device=device) - 8) / 7  # code 0 is never produced


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' dynamic 8-bit map (``create_dynamic_map``): 256 sorted fp32 values in [-1, 1].

    Decade ``10^-k`` (k = max_exponent_bits-1 .. 0) holds the midpoints of a linear grid on
    [0.1, 1]·10^-k whose size doubles per decade, so small magnitudes keep relative precision.
    """
    non_sign_bits = total_bits - 1
    parts = []
    for i in range(max_exponent_bits):
        items = 2 ** (i + non_sign_bits - max_exponent_bits + (0 if signed else 1)) + 1
        parts.append(_decade(i, max_exponent_bits, items))
    extra = 2 ** (non_sign_bits - max_exponent_bits) - 1
    if extra > 0:
        parts.append(_decade(max_exponent_bits - 1, max_exponent_bits, extra + 1))
    values = torch.cat([torch.cat([p, -p]) if signed else p for p in parts])
    values = torch.cat([values, torch.tensor([0.0, 1.0])])
    values = F.pad(values, (0, 256 - values.numel()))
    return values.sort().values


def _decade(i: int, max_exponent_bits: int, items: int) -> torch.Tensor:
    edges = torch.linspace(0.1, 1, items, dtype=torch.float32)
    return (10 ** (i - max_exponent_bits + 1)) * ((edges[:-1] + edges[1:]) / 2.0)


def _check_quant_type(quant_type: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def _nearest(x: torch.Tensor, sorted_values: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of ``sorted_values`` (int32); a value on a midpoint goes to the lower one."""
    midpoints = (sorted_values[:-1] + sorted_values[1:]) / 2
    return torch.bucketize(x, midpoints, out_int32=True)


def _encode(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    """4-bit codes (uint8) of values already scaled into [-1, 1]."""
    if quant_type == "nf4":
        return _nearest(scaled, code_values("nf4", scaled.device)).to(torch.uint8)
    if quant_type == "int4":
        return (torch.round(scaled * 7) + 8).to(torch.uint8)
    # FP4 is sign-magnitude: the sign bit comes from x < 0 (so -0.0 and 0.0 both give code 0).
    pivots = torch.tensor(FP4_PIVOTS, dtype=torch.float32, device=scaled.device)
    bits = torch.tensor(FP4_BUCKET_BITS, dtype=torch.uint8, device=scaled.device)
    return bits[torch.bucketize(scaled.abs(), pivots, out_int32=True)] | ((scaled < 0).to(torch.uint8) << 3)


def _quantize_blocks(blocks: torch.Tensor, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``[n_blocks, blocksize]`` values: (packed uint8 ``[n_blocks·blocksize/2]``, fp32 absmax)."""
    blocks = blocks.float()
    absmax = blocks.abs().amax(dim=1)
    # Multiply by the reciprocal (not divide) and clamp: bit-for-bit what bitsandbytes does.
    scaled = blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)
    codes = _encode(scaled.clamp_(-1, 1).reshape(-1), quant_type)
    return (codes[0::2] << 4) | codes[1::2], absmax


def _pair_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """``[256, 2]``: the two values a packed byte stands for (high nibble first)."""
    values = code_values(quant_type, device)
    byte = torch.arange(256, device=device)
    return torch.stack([values[byte >> 4], values[byte & 15]], dim=1)


def _dequantize_blocks(packed: torch.Tensor, absmax: torch.Tensor, quant_type: str) -> torch.Tensor:
    """fp32 ``[n_blocks, blocksize]`` values of whole blocks of packed codes."""
    values = _pair_table(quant_type, packed.device).index_select(0, packed.reshape(-1).int())
    return values.view(absmax.numel(), -1) * absmax.unsqueeze(1)


def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor,
                            blocksize: int = NESTED_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization of a 1-D tensor to the nearest of ``code`` (256 sorted values).

    Returns (uint8 codes, fp32 absmax per block).
    """
    n = x.numel()
    blocks = F.pad(x.float().reshape(-1), (0, -n % blocksize)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp_(-1, 1)
    codes = _nearest(scaled.reshape(-1)[:n], code.to(x.device)).to(torch.uint8)
    return codes, absmax


def dequantize_blockwise_8bit(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                              blocksize: int = NESTED_BLOCKSIZE) -> torch.Tensor:
    """fp32 values of ``quantize_blockwise_8bit``'s codes."""
    n = codes.numel()
    values = F.pad(code.to(codes.device)[codes.int()], (0, -n % blocksize)).view(-1, blocksize)
    return (values * absmax.unsqueeze(1)).reshape(-1)[:n]


@dataclass
class Quantized4bit:
    """A 4-bit blockwise-quantized tensor in bitsandbytes' layout (see the module docstring)."""

    packed: torch.Tensor  # uint8 [(numel + 1) // 2, 1]
    absmax: torch.Tensor  # fp32 [n_blocks], or uint8 [n_blocks] codes when double-quantized
    shape: torch.Size
    dtype: torch.dtype  # dtype of the original tensor: what dequantize_4bit returns by default
    blocksize: int = 64
    quant_type: str = "nf4"
    absmax2: torch.Tensor | None = None  # fp32 [ceil(n_blocks / 256)]: scales of the absmax codes
    offset: torch.Tensor | None = None  # fp32 scalar: mean absmax, subtracted before quantizing

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def nbytes(self) -> int:
        """Bytes of all the tensors that make it up."""
        parts = (self.packed, self.absmax, self.absmax2, self.offset)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def scales(self) -> torch.Tensor:
        """The fp32 absmax per block (decoded from its 8-bit codes when double-quantized)."""
        if not self.double_quant:
            return self.absmax
        code = dynamic_map().to(self.absmax.device)
        return dequantize_blockwise_8bit(self.absmax, self.absmax2, code) + self.offset

    def to(self, device: torch.device | str) -> Quantized4bit:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return replace(self, packed=move(self.packed), absmax=move(self.absmax),
                       absmax2=move(self.absmax2), offset=move(self.offset))


def quantize_4bit(w: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4",
                  double_quant: bool = True) -> Quantized4bit:
    """Quantize a float tensor to 4 bits in blocks of ``blocksize`` (on ``w``'s device)."""
    _check_quant_type(quant_type)
    if blocksize <= 0 or blocksize % 2:
        raise ValueError(f"blocksize must be a positive even number, got {blocksize}")
    if not w.is_floating_point():
        raise ValueError(f"quantize_4bit needs a float tensor, got {w.dtype}")
    flat = w.detach().reshape(-1)
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    packed = torch.empty(n_blocks * blocksize // 2, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=w.device)
    step = max(1, CHUNK_VALUES // blocksize)
    for start in range(0, n_blocks, step):
        stop = min(start + step, n_blocks)
        chunk = flat[start * blocksize:stop * blocksize]
        # Zeros leave a partial last block's absmax alone and get the code of 0 (bitsandbytes pads so).
        chunk = F.pad(chunk, (0, (stop - start) * blocksize - chunk.numel()))
        codes, absmax[start:stop] = _quantize_blocks(chunk.view(-1, blocksize), quant_type)
        packed[start * blocksize // 2:stop * blocksize // 2] = codes
    n_bytes = (n + 1) // 2
    packed = (packed if n_bytes == packed.numel() else packed[:n_bytes].clone()).view(-1, 1)
    q = Quantized4bit(packed, absmax, w.shape, w.dtype, blocksize, quant_type)
    if double_quant:
        offset = absmax.mean()
        codes, absmax2 = quantize_blockwise_8bit(absmax - offset, dynamic_map().to(w.device))
        q = replace(q, absmax=codes, absmax2=absmax2, offset=offset)
    return q


def dequantize_4bit(q: Quantized4bit, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The tensor a ``Quantized4bit`` stands for, in ``dtype`` (default: the original dtype).

    Values are computed in fp32 (code value × absmax) and cast once, as bitsandbytes does.
    """
    absmax = q.scales()
    n_bytes = absmax.numel() * q.blocksize // 2
    packed = q.packed.reshape(-1)
    if packed.numel() != n_bytes:  # a partial last block: pad with codes of any value, sliced off
        packed = F.pad(packed, (0, n_bytes - packed.numel()))
    out = _dequantize_blocks(packed, absmax, q.quant_type).reshape(-1)
    if out.numel() != q.numel:
        out = out[:q.numel]
    return out.view(q.shape).to(dtype or q.dtype)
