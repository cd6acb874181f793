"""NF4/FP4/int4 blockwise quantization: exactness, error bounds, layout, and bitsandbytes' format."""

from __future__ import annotations

import pytest
import torch

from tuneforge.quant import nf4
from tuneforge.quant.nf4 import (
    Quantized4bit,
    code_values,
    dequantize_4bit,
    dynamic_map,
    quantize_4bit,
)

SHAPES = [(256, 512), (33, 65), (7,), (3, 320)]  # whole blocks, a partial last block, odd numel


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """The 4-bit codes of packed bytes, in order (high nibble first)."""
    p = packed.reshape(-1)
    return torch.stack([p >> 4, p & 15], dim=1).reshape(-1)


def block_absmax(w: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """Each element's block absmax (for error bounds)."""
    flat = w.float().reshape(-1)
    padded = torch.nn.functional.pad(flat, (0, -flat.numel() % blocksize)).view(-1, blocksize)
    return padded.abs().amax(1).repeat_interleave(blocksize)[:flat.numel()]


def max_half_gap(values: torch.Tensor) -> float:
    return values.sort().values.diff().max().item() / 2


def test_nf4_values_are_normal_quantiles():
    # QLoRA's construction: 8 positive and 7 negative N(0,1) quantiles plus 0, scaled to [-1, 1].
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    offset = 0.9677083
    pos = normal.icdf(torch.linspace(offset, 0.5, 9).double()[:-1])
    neg = -normal.icdf(torch.linspace(offset, 0.5, 8).double()[:-1])
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    torch.testing.assert_close(code_values("nf4").double(), values / values.max(), atol=1e-6, rtol=0)


def test_dynamic_map_layout():
    code = dynamic_map()
    assert code.shape == (256,) and code.dtype == torch.float32
    assert torch.all(code.diff() >= 0) and code[-1] == 1.0 and (code == 0).sum() == 1
    assert -1 < code[0] < -0.99  # bitsandbytes' signed map stops short of -1
    assert code[code > 0].min() < 1e-6  # dense near zero: small values keep relative precision


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_code_values_round_trip_exactly(quant_type):
    values = code_values(quant_type)
    usable = torch.tensor([k for k in range(16) if not (quant_type == "int4" and k == 0)])
    codes = usable.repeat(64 // len(usable) + 1)[:64]
    w = values[codes] * 3.0  # one block whose absmax is 3 (the code values include ±1)
    q = quantize_4bit(w, double_quant=False, quant_type=quant_type)
    assert q.absmax.tolist() == [3.0]
    assert torch.equal(dequantize_4bit(q), w)
    expected = codes.clone()
    if quant_type == "fp4":
        expected[expected == 8] = 0  # -0.0 is not negative: it gets the code of +0.0
    assert torch.equal(unpack(q.packed), expected.to(torch.uint8))


def test_packing_order_first_value_in_high_nibble():
    w = torch.zeros(64)
    w[0], w[1] = 1.0, -1.0  # NF4 codes 15 and 0; zeros are code 7
    q = quantize_4bit(w, double_quant=False)
    assert q.packed.shape == (32, 1) and q.packed.dtype == torch.uint8
    assert q.packed[0, 0].item() == 0xF0 and q.packed[1, 0].item() == 0x77


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("shape", SHAPES)
def test_error_within_half_the_code_gap(quant_type, shape):
    torch.manual_seed(0)
    w = torch.randn(shape)
    q = quantize_4bit(w, quant_type=quant_type, double_quant=False)
    assert q.packed.numel() == (w.numel() + 1) // 2 and q.absmax.numel() == -(-w.numel() // 64)
    out = dequantize_4bit(q)
    assert out.shape == w.shape and out.dtype == w.dtype
    absmax = block_absmax(w)
    bound = absmax * max_half_gap(code_values(quant_type)[code_values(quant_type) >= -1])
    # + 1e-6·absmax: FP4's thresholds are bitsandbytes' fp32 literals, a hair off the midpoints.
    assert torch.all((out - w).abs().reshape(-1) <= bound + 1e-6 * absmax)


def test_double_quant_scales_and_size():
    torch.manual_seed(0)
    w = torch.randn(512, 512)
    plain = quantize_4bit(w, double_quant=False)
    q = quantize_4bit(w, double_quant=True)
    assert torch.equal(q.packed, plain.packed) and q.absmax.dtype == torch.uint8
    assert q.offset.item() == pytest.approx(plain.absmax.mean().item(), rel=1e-6)
    assert q.absmax2.shape == (4096 // 256,)
    # Each absmax comes back within half a step of the 8-bit map (largest step at the top end).
    err = (q.scales() - plain.absmax).abs()
    assert torch.all(err <= q.absmax2.repeat_interleave(256) * max_half_gap(dynamic_map()) * (1 + 1e-6))
    assert q.nbytes < plain.nbytes
    # 4 bits per value plus 8 bits per 64 plus 32 per 64·256: about 4.127 bits.
    assert q.nbytes * 8 / w.numel() == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_is_kept_or_chosen(dtype):
    w = torch.randn(64, 64).to(dtype)
    q = quantize_4bit(w)
    assert q.dtype == dtype and dequantize_4bit(q).dtype == dtype
    assert dequantize_4bit(q, torch.float32).dtype == torch.float32


def test_chunking_does_not_change_the_result(monkeypatch):
    torch.manual_seed(0)
    w = torch.randn(37, 29)  # 1073 values: a partial last block inside the last chunk
    whole = quantize_4bit(w)
    monkeypatch.setattr(nf4, "CHUNK_VALUES", 256)
    chunked = quantize_4bit(w)
    for a, b in [(whole.packed, chunked.packed), (whole.absmax, chunked.absmax),
                 (whole.absmax2, chunked.absmax2), (whole.offset, chunked.offset)]:
        assert torch.equal(a, b)


def test_nf4_has_the_lowest_error_on_normal_weights():
    # The QLoRA paper's point: on normally distributed weights NF4 beats FP4 and int4.
    torch.manual_seed(0)
    w = torch.randn(256, 256)
    mse = {t: (dequantize_4bit(quantize_4bit(w, quant_type=t)) - w).pow(2).mean().item()
           for t in ("nf4", "fp4", "int4")}
    assert mse["nf4"] < mse["int4"] and mse["nf4"] < mse["fp4"]


def test_invalid_arguments():
    with pytest.raises(ValueError, match="quant_type"):
        quantize_4bit(torch.randn(64), quant_type="nf3")
    with pytest.raises(ValueError, match="blocksize"):
        quantize_4bit(torch.randn(64), blocksize=63)
    with pytest.raises(ValueError, match="float"):
        quantize_4bit(torch.ones(64, dtype=torch.int32))


def test_functions_trace_as_one_graph():
    # A compiled GPU path wraps these functions: they must trace without graph breaks.
    torch.manual_seed(0)
    w = torch.randn(33, 65)
    quantize = torch.compile(quantize_4bit, backend="eager", fullgraph=True)
    dequantize = torch.compile(dequantize_4bit, backend="eager", fullgraph=True)
    q = quantize(w)
    assert torch.equal(q.packed, quantize_4bit(w).packed)
    assert torch.equal(dequantize(q), dequantize_4bit(q))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_cuda_matches_cpu(quant_type):
    torch.manual_seed(0)
    w = torch.randn(300, 257)
    cpu = quantize_4bit(w, quant_type=quant_type)
    gpu = quantize_4bit(w.cuda(), quant_type=quant_type)
    assert torch.equal(gpu.packed.cpu(), cpu.packed) and torch.equal(gpu.absmax.cpu(), cpu.absmax)
    torch.testing.assert_close(dequantize_4bit(gpu).cpu(), dequantize_4bit(cpu), rtol=1e-6, atol=1e-6)


# --- bitsandbytes' format -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bnb():
    try:
        import bitsandbytes.functional as bnbf

        bnbf.quantize_4bit(torch.randn(64), blocksize=64, quant_type="nf4", compress_statistics=True)
    except Exception as e:  # not installed, or no CPU backend in this build
        pytest.skip(f"bitsandbytes' CPU 4-bit path is not usable here: {type(e).__name__}: {e}")
    return bnbf


def bnb_state(bnb, q: Quantized4bit):
    """Our Quantized4bit as a bitsandbytes QuantState."""
    code = bnb.get_4bit_type(q.quant_type, device="cpu")
    state2 = None
    if q.double_quant:
        state2 = bnb.QuantState(absmax=q.absmax2, code=dynamic_map(), blocksize=256, dtype=torch.float32)
    return bnb.QuantState(absmax=q.absmax, shape=q.shape, code=code, blocksize=q.blocksize,
                          quant_type=q.quant_type, dtype=q.dtype, offset=q.offset, state2=state2)


def ours_from_bnb(packed, state) -> Quantized4bit:
    nested = state.state2 is not None
    return Quantized4bit(packed, state.absmax, state.shape, state.dtype, state.blocksize, state.quant_type,
                         state.state2.absmax if nested else None, state.offset if nested else None)


def test_dynamic_map_equals_bitsandbytes(bnb):
    assert torch.equal(dynamic_map(), bnb.create_dynamic_map(signed=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_codes_and_scales_equal_bitsandbytes(bnb, shape, dtype):
    torch.manual_seed(0)
    w = torch.randn(shape).to(dtype)
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    q = quantize_4bit(w, blocksize=64, quant_type="nf4", double_quant=False)
    assert q.packed.shape == packed.shape and torch.equal(q.packed, packed)  # byte for byte
    assert torch.equal(q.absmax, state.absmax)
    ours, theirs = dequantize_4bit(q), bnb.dequantize_4bit(packed, state)
    if dtype == torch.float16:  # bitsandbytes' fp16 output may round its product differently: one fp16 step at most
        torch.testing.assert_close(ours, theirs, rtol=2.0 ** -10, atol=0)
    else:
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(256, 512), (100, 300)])
def test_nf4_double_quant_equals_bitsandbytes(bnb, shape, dtype):
    torch.manual_seed(1)
    w = torch.randn(shape).to(dtype)
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    q = quantize_4bit(w, blocksize=64, quant_type="nf4", double_quant=True)
    assert torch.equal(q.packed, packed)
    assert torch.equal(q.offset, state.offset)
    assert torch.equal(q.absmax2, state.state2.absmax)
    # Our absmax codes are the exact nearest; bitsandbytes' CPU kernel finds the nearest through a
    # 65536-step lookup table, so on a near-tie (closer to a midpoint than one table step) it may
    # pick the neighbour. Every other code must be equal.
    code = dynamic_map()
    x = ((quantize_4bit(w, double_quant=False).absmax - q.offset)
         * (1 / q.absmax2).repeat_interleave(256)[:q.absmax.numel()])
    differ = (q.absmax != state.absmax).nonzero().flatten()
    for i in differ.tolist():
        a, b = sorted((q.absmax[i].item(), state.absmax[i].item()))
        assert b == a + 1 and abs(x[i] - (code[a] + code[b]) / 2) <= 2 / 65535
    assert len(differ) <= 0.02 * q.absmax.numel()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_states_are_interchangeable_with_bitsandbytes(bnb, quant_type, double_quant):
    # Whatever either side quantized, both dequantizers give the same tensor.
    torch.manual_seed(2)
    w = torch.randn(96, 200)
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)
    assert torch.equal(dequantize_4bit(ours_from_bnb(packed, state)), bnb.dequantize_4bit(packed, state))
    q = quantize_4bit(w, quant_type=quant_type, double_quant=double_quant)
    assert torch.equal(bnb.dequantize_4bit(q.packed, bnb_state(bnb, q)), dequantize_4bit(q))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp4_codes_equal_bitsandbytes(bnb, dtype):
    # We follow bitsandbytes' CUDA kernel (sign bit from x < 0; its fp32 threshold constants).
    # Its CPU fallback decides exact ties at a threshold and the sign of a value that rounds
    # to zero the other way; those are the only differences allowed, and both codes decode alike.
    torch.manual_seed(3)
    w = torch.randn(256, 512).to(dtype)
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="fp4", compress_statistics=False)
    q = quantize_4bit(w, quant_type="fp4", double_quant=False)
    assert torch.equal(q.absmax, state.absmax)
    ours, theirs = unpack(q.packed), unpack(packed)
    scaled = (w.float().reshape(-1) * (1 / block_absmax(w))).abs()
    pivots = torch.tensor(nf4.FP4_PIVOTS)
    near_tie = (scaled[:, None] - pivots).abs().amin(1) <= 1e-6
    both_zero = ((ours & 7) == 0) & ((theirs & 7) == 0)
    differ = ours != theirs
    assert not torch.any(differ & ~near_tie & ~both_zero)
    assert (differ & ~both_zero).sum() <= 0.01 * w.numel()
