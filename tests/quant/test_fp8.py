"""The FP8 frozen base: quantization, the layer's forward and input gradient against dequantized matmuls, refusals.

The CPU path emulates ``torch._scaled_mm`` (dequantize, fp32 matmul); the GPU tests compare the real FP8 kernels
(Triton quantizer, ``_scaled_mm``) with it.
"""

import pytest
import torch
from torch import nn

from conftest import build_tiny_model
from tuneforge.config import MethodConfig, load_config
from tuneforge.errors import ConfigError
from tuneforge.methods.lora import LoRALinear, lora_layers
from tuneforge.methods.setup import prepare_model
from tuneforge.quant.fp8 import (
    E4M3_MAX,
    Linear8,
    check_fp8_device,
    fp8_supported,
    quantize_rows,
    quantize_rows_reference,
    scaled_matmul,
)

FP8_GPU = torch.cuda.is_available() and fp8_supported(torch.device("cuda"))
needs_fp8_gpu = pytest.mark.skipif(not FP8_GPU, reason="needs a CUDA GPU with FP8 (compute capability 8.9+)")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def test_rows_quantize_to_e4m3_within_its_resolution():
    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 2, 64).unsqueeze(1)
    codes, scale = quantize_rows_reference(x)
    assert codes.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    back = codes.float() * scale
    # 3 mantissa bits: a normal value is within 2^-4 of itself; values near zero within the smallest subnormal step
    assert ((back - x).abs() <= x.abs() / 16 + scale * 2.0 ** -9).all()
    assert torch.equal(codes.float().abs().amax(1), torch.full((64,), E4M3_MAX))  # each row's max maps to 448


def test_column_scale_is_applied_before_the_row_scale():
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(8, 32, generator=g), torch.rand(32, generator=g) + 0.1
    codes, scale = quantize_rows_reference(x, c)
    assert torch.equal(codes, quantize_rows_reference(x * c)[0])
    assert torch.allclose(scale, quantize_rows_reference(x * c)[1])


def test_zero_rows_quantize_to_zero():
    codes, scale = quantize_rows_reference(torch.zeros(2, 16))
    assert torch.equal(codes.float(), torch.zeros(2, 16)) and (scale > 0).all()


def layer_and_input(seed: int, n_in: int = 64, n_out: int = 48, rows: int = 10):
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(n_in, n_out, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n_out, n_in, generator=g) * 0.05)
    return linear, torch.randn(2, rows, n_in, generator=g)


def test_forward_is_the_dequantized_matmul():
    linear, x = layer_and_input(2)
    q = Linear8.from_linear(linear, out_dtype=torch.float32)
    xc, xs = quantize_rows_reference(x.reshape(-1, 64))
    expected = (xc.float() * xs) @ q.dequantized().t()
    y = q(x)
    assert y.shape == (2, 10, 48)
    torch.testing.assert_close(y.reshape(-1, 48), expected, rtol=1e-5, atol=1e-6)
    assert rel(y, linear(x)) < 0.05  # and close to the unquantized layer


def test_input_gradient_is_the_dequantized_matmul():
    linear, x = layer_and_input(3)
    q = Linear8.from_linear(linear, out_dtype=torch.float32)
    x = x.requires_grad_(True)
    grad = torch.randn(2, 10, 48, generator=torch.Generator().manual_seed(4))
    q(x).backward(grad)
    # dy·diag(s) quantized per row, times the codes: the weight's scales ride on the gradient's columns
    gc, gs = quantize_rows_reference(grad.reshape(-1, 48), q.weight_scale)
    expected = (gc.float() * gs) @ q.weight.float()
    torch.testing.assert_close(x.grad.reshape(-1, 64), expected, rtol=1e-5, atol=1e-6)
    assert rel(x.grad, grad @ linear.weight) < 0.05
    assert q.weight.grad is None


def test_lora_on_an_fp8_base_trains_its_adapters_only():
    linear, x = layer_and_input(5)
    layer = LoRALinear(linear, r=4, alpha=8)
    ref = LoRALinear(nn.Linear(64, 48, bias=False), r=4, alpha=8)
    ref.load_state_dict(layer.state_dict())
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.1)
        ref.lora_B["default"].weight.copy_(layer.lora_B["default"].weight)
    layer.base_layer = Linear8.from_linear(layer.base_layer, out_dtype=torch.float32)
    x = x.requires_grad_(True)
    y = layer(x)
    assert rel(y, ref(x)) < 0.05
    y.square().sum().backward()
    assert layer.lora_A["default"].weight.grad is not None and layer.lora_B["default"].weight.grad is not None
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_shared_input_is_quantized_once_and_requantized_after_an_inplace_change(monkeypatch):
    from tuneforge.quant import fp8

    calls = []
    real = fp8.quantize_rows
    monkeypatch.setattr(fp8, "quantize_rows", lambda x, c=None: calls.append(1) or real(x, c))
    layers = [Linear8.from_linear(layer_and_input(s)[0], out_dtype=torch.float32) for s in (6, 7, 8)]
    x = torch.randn(5, 64)
    first = [m(x) for m in layers]
    assert len(calls) == 1
    x.mul_(2)
    again = [m(x) for m in layers]
    assert len(calls) == 2
    torch.testing.assert_close(again[0], 2 * first[0], rtol=1e-5, atol=1e-6)


def test_shared_input_codes_go_with_the_input():
    import gc

    from tuneforge.quant import fp8

    layer = Linear8.from_linear(layer_and_input(6)[0], out_dtype=torch.float32)
    x = torch.randn(5, 64)
    layer(x)
    assert fp8._LastInput.entry is not None
    y = torch.randn(5, 64)
    layer(y)  # a new input replaces the entry; the old input dying later must not clear it
    del x
    gc.collect()
    assert fp8._LastInput.entry is not None and fp8._LastInput.entry[0]() is y
    del y
    gc.collect()
    assert fp8._LastInput.entry is None


def test_fp8_layers_run_under_inference_mode():
    """Inference tensors carry no version counter: an input is quantized per layer there, same results."""
    layers = [Linear8.from_linear(layer_and_input(s)[0], out_dtype=torch.float32) for s in (6, 7)]
    x = torch.randn(5, 64)
    want = [m(x) for m in layers]
    with torch.inference_mode():
        got = [m(x) for m in layers]
        x_inf = x.clone()  # an inference tensor, changed in place between calls
        before = layers[0](x_inf)
        x_inf.mul_(2)
        after = layers[0](x_inf)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    torch.testing.assert_close(after, 2 * before, rtol=1e-5, atol=1e-6)


def test_fp8_base_is_refused_on_the_cpu_for_full_training_and_with_dora():
    with pytest.raises(ConfigError, match="base_precision"):
        check_fp8_device(torch.device("cpu"))
    with pytest.raises(ConfigError, match="method.lora.base_precision=fp8"):
        prepare_model(build_tiny_model(64), MethodConfig(name="lora", lora={"base_precision": "fp8"}))
    with pytest.raises(ConfigError, match="method.name=lora or qlora"):  # refused with the config, before any load
        load_config(None, ["method.name=full", "method.lora.base_precision=fp8"])
    assert load_config(None, ["method.name=qlora", "method.lora.base_precision=fp8"]).method.name == "qlora"
    for method in ("lora", "qlora"):
        with pytest.raises(ConfigError, match="use_dora=true with method.lora.base_precision=fp8"):
            load_config(None, [f"method.name={method}", "method.lora.use_dora=true", "method.lora.base_precision=fp8"])


def test_a_qlora_run_with_an_fp8_base_is_refused_on_the_cpu_before_it_trains(tiny_model_dir, alpaca_file, tmp_path):
    from tuneforge.train.loop import train

    run = tmp_path / "run"
    config = load_config(None, [f"model={tiny_model_dir}", f"data.train=[{alpaca_file}]", f"output_dir={run}",
                                "data.max_seq_len=64", "data.val_fraction=0", "train.batch_size=2", "train.threads=1",
                                "train.max_steps=1", "method.name=qlora", "method.lora.base_precision=fp8",
                                "train.device=cpu"])
    with pytest.raises(ConfigError, match="method.lora.base_precision=fp8 needs a CUDA GPU .* Set "
                                          "method.lora.base_precision=bf16"):
        train(config, quiet=True)
    assert not (run / "adapter").exists()


# --- on a GPU with FP8 ------------------------------------------------------------------------------------------------

@needs_fp8_gpu
def test_triton_quantizer_matches_the_reference():
    g = torch.Generator(device="cuda").manual_seed(0)
    for cols in (64, 576, 4096, 14336):
        x = (torch.randn(33, cols, device="cuda", generator=g) * 3).to(torch.bfloat16)
        c = torch.rand(cols, device="cuda", generator=g) + 0.5
        for col_scale in (None, c):
            codes, scale = quantize_rows(x, col_scale)
            ref_codes, ref_scale = quantize_rows_reference(x, col_scale)
            torch.testing.assert_close(scale, ref_scale, rtol=1e-6, atol=0)
            # the same codes but for values within rounding of a tie between two codes
            assert (codes.float() != ref_codes.float()).float().mean() < 1e-3
            assert rel(codes.float() * scale, ref_codes.float() * ref_scale) < 1e-3


@needs_fp8_gpu
def test_scaled_mm_matches_the_emulation_and_pads_short_batches():
    g = torch.Generator(device="cuda").manual_seed(1)
    for rows in (8192, 5):
        a = torch.randn(rows, 1024, device="cuda", generator=g)
        w = torch.randn(512, 1024, device="cuda", generator=g) * 0.02
        ac, as_ = quantize_rows(a)
        wc, ws = quantize_rows_reference(w)
        out = scaled_matmul(ac, as_, wc, ws.view(-1), torch.bfloat16)
        ref = scaled_matmul(ac.cpu(), as_.cpu(), wc.cpu(), ws.view(-1).cpu(), torch.float32)
        assert out.shape == (rows, 512) and rel(out.float().cpu(), ref) < 1e-2


@needs_fp8_gpu
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_lora_model_on_an_fp8_base_follows_the_bf16_one(method):
    from tuneforge.quant.linear4bit import Linear4bit

    device = torch.device("cuda")
    losses = {}
    for precision in ("bf16", "fp8"):
        model = build_tiny_model(256, hidden=128).to(device, torch.bfloat16)
        torch.manual_seed(0)
        prepare_model(model, MethodConfig(name=method, lora={"base_precision": precision, "dropout": 0.0}), device)
        if precision == "fp8":
            bases = [m.base_layer for m in lora_layers(model).values()]
            assert all(isinstance(b, Linear8) if method == "lora" else isinstance(b, Linear4bit) and b.fp8
                       for b in bases)
        ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(2))
        out = model(input_ids=ids.to(device), labels=ids.to(device))
        out.loss.backward()
        grads = [p.grad.float().norm() for p in model.parameters() if p.requires_grad]
        losses[precision] = (float(out.loss), torch.stack(grads).cpu())
    assert abs(losses["fp8"][0] - losses["bf16"][0]) < 0.01 * losses["bf16"][0]
    assert rel(losses["fp8"][1], losses["bf16"][1]) < 0.05


def test_fp8_base_counts_its_weights_and_refuses_a_merge():
    from tuneforge.errors import ModelError
    from tuneforge.methods.lora import count_parameters

    linear, _ = layer_and_input(9)
    layer = LoRALinear(linear, r=4, alpha=8)
    before = count_parameters(layer)
    layer.base_layer = Linear8.from_linear(layer.base_layer, out_dtype=torch.float32)
    assert count_parameters(layer) == before
    torch.testing.assert_close(layer.dense_weight(), layer.base_layer.dequantized())
    with pytest.raises(ModelError, match="FP8"):
        layer.merge("default")
