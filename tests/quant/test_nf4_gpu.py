"""The Triton dequantization kernel gives exactly the reference's values (CUDA, or Triton's CPU interpreter)."""

import os
import zlib

import pytest
import torch

from tuneforge.quant.linear4bit import Linear4bit
from tuneforge.quant.nf4 import dequantize_4bit, quantize_4bit
from tuneforge.quant.nf4_gpu import dequantize, dequantize_4bit_triton, triton_available

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
