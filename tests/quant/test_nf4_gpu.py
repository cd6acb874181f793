"""The Triton kernels give exactly the reference's values: dequantization (CUDA, or Triton's CPU interpreter) and
NF4 -> e4m3 codes with per-channel scales for QLoRA's FP8 compute (CUDA: the interpreter's e4m3 cast is not the GPU's).
"""

import os
import zlib

import pytest
import torch

from tuneforge.quant.fp8 import E4M3_MAX, fp8_supported, quantize_rows_reference
from tuneforge.quant.linear4bit import Linear4bit
from tuneforge.quant.nf4 import dequantize_4bit, quantize_4bit
from tuneforge.quant.nf4_gpu import (
    dequantize,
    dequantize_4bit_triton,
    fp8_convertible,
    fp8_from_4bit,
    fp8_from_4bit_triton,
    triton_available,
)

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_kernel = pytest.mark.skipif(not triton_available() or not (CUDA or INTERPRET),
                                  reason="needs triton and a CUDA GPU (or TRITON_INTERPRET=1)")
DEVICE = "cuda" if CUDA else "cpu"
# Triton's CPU interpreter truncates fp32 -> bf16/fp16 where the GPU rounds to nearest even: on the
# CPU only the fp32 output is compared bit for bit.
DTYPES = (torch.float32, torch.bfloat16, torch.float16) if CUDA else (torch.float32,)


def test_dequantize_falls_back_to_the_reference_on_cpu():
    torch.manual_seed(0)
    q = quantize_4bit(torch.randn(40, 64), 64, "nf4", True)
    assert torch.equal(dequantize(q, torch.float32), dequantize_4bit(q, torch.float32))


@needs_kernel
@pytest.mark.parametrize("shape", [(256, 512), (3, 100), (7,), (129, 65), (1000, 4096)])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_kernel_equals_reference(shape, quant_type, double_quant):
    g = torch.Generator(device=DEVICE).manual_seed(zlib.crc32(repr((shape, quant_type, double_quant)).encode()))
    w = torch.randn(*shape, generator=g, device=DEVICE) * 3
    q = quantize_4bit(w, 64, quant_type, double_quant)
    for dtype in DTYPES:
        ref = dequantize_4bit(q, dtype)
        out = dequantize_4bit_triton(q, dtype)
        assert out.dtype == dtype and out.shape == w.shape
        assert torch.equal(out, ref), f"{dtype}: max diff {(out.float() - ref.float()).abs().max()}"


@pytest.mark.skipif(not (CUDA and triton_available()), reason="needs triton and a CUDA GPU")
def test_linear4bit_uses_the_kernel_and_matches_the_dense_layer():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 384, bias=False, device="cuda")
    layer = Linear4bit.from_linear(linear, compute_dtype=torch.bfloat16)
    x = torch.randn(8, 256, device="cuda", requires_grad=True)
    w = dequantize_4bit(layer.quantized, torch.bfloat16)
    y = layer(x)
    ref = torch.nn.functional.linear(x.to(torch.bfloat16), w).float()
    assert torch.equal(y, ref)
    y.sum().backward()
    assert torch.equal(x.grad, (torch.ones(8, 384, device="cuda", dtype=torch.bfloat16) @ w).float())


# --- NF4 -> e4m3 (QLoRA's FP8 compute) --------------------------------------------------------------------------------

def weight_4bit(rows: int, cols: int, quant_type: str, double_quant: bool, device: str = "cpu"):
    """A 4-bit weight whose rows span four decades of magnitude (per-row scales matter)."""
    g = torch.Generator(device=device).manual_seed(zlib.crc32(repr((rows, cols, quant_type, double_quant)).encode()))
    w = torch.randn(rows, cols, generator=g, device=device) * torch.logspace(-3, 1, rows, device=device).unsqueeze(1)
    return quantize_4bit(w, 64, quant_type, double_quant)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_a_rows_largest_value_is_its_largest_block_scale(quant_type, double_quant):
    # what lets the kernel skip a pass over the dequantized weight: each block's absmax decodes to exactly ±scale
    q = weight_4bit(48, 320, quant_type, double_quant)
    dense = dequantize_4bit(q, torch.float32)
    assert torch.equal(q.scales().view(48, 5).abs().amax(1), dense.abs().amax(1))
    codes, scale = fp8_from_4bit(q)
    ref_codes, ref_scale = quantize_rows_reference(dense)
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == (48, 320) and scale.shape == (48,)
    assert torch.equal(scale, ref_scale.view(-1)) and torch.equal(scale, dense.abs().amax(1) / E4M3_MAX)
    assert torch.equal(codes.view(torch.uint8), ref_codes.view(torch.uint8))


def test_only_weights_of_whole_block_rows_and_fp8_gemm_sizes_convert():
    assert fp8_convertible(weight_4bit(48, 128, "nf4", True))
    assert not fp8_convertible(weight_4bit(48, 96, "nf4", True))  # a block would straddle two rows
    assert not fp8_convertible(weight_4bit(40, 128, "nf4", True))  # 40 rows: not a multiple of 16


@pytest.mark.skipif(not (CUDA and triton_available() and fp8_supported(torch.device("cuda"))),
                    reason="needs triton and a CUDA GPU with FP8")
@pytest.mark.parametrize("shape", [(256, 512), (1024, 4096), (48, 14336), (4096, 1024)])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_fp8_kernel_equals_the_reference_bit_for_bit(shape, quant_type, double_quant):
    q = weight_4bit(*shape, quant_type, double_quant, device="cuda")
    codes, scale = fp8_from_4bit_triton(q)
    ref_codes, ref_scale = quantize_rows_reference(dequantize_4bit(q, torch.float32))
    assert torch.equal(scale, ref_scale.view(-1))
    assert torch.equal(codes.view(torch.uint8), ref_codes.view(torch.uint8)), \
        f"{(codes.float() != ref_codes.float()).sum()} codes differ"
    on_gpu = fp8_from_4bit(q)  # the custom op picks the kernel on a GPU
    assert torch.equal(on_gpu[0].view(torch.uint8), codes.view(torch.uint8)) and torch.equal(on_gpu[1], scale)
