"""The fused LoRA training op (methods/lora_ops.py) against autograd on the plain formula."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.methods import lora_ops
from tuneforge.methods.lora import LoRALinear
from tuneforge.quant.fp8 import Linear8, quantize_rows_reference
from tuneforge.quant.linear4bit import Linear4bit
from tuneforge.quant.nf4 import quantize_4bit


def _layer(bias: bool = False, dropout: float = 0.0, dtype: torch.dtype = torch.float32) -> LoRALinear:
    torch.manual_seed(0)
    base = nn.Linear(24, 40, bias=bias).to(dtype)
    base.weight.requires_grad_(False)
    if bias:
        base.bias.requires_grad_(False)
    layer = LoRALinear(base, "default", r=4, alpha=8, dropout=dropout)
    nn.init.normal_(layer.lora_B["default"].weight)  # B starts at zero: give the LoRA term a value to check
    return layer


def _reference(layer: LoRALinear, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    base = layer.base_layer
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    xd = x if mask is None else x * mask
    return F.linear(x, base.weight, base.bias) + layer.scaling["default"] * F.linear(F.linear(xd, a), b)


def _grads(layer: LoRALinear, x: torch.Tensor, out: torch.Tensor) -> list[torch.Tensor]:
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    return torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1])).sum(), [x, *params])


@pytest.mark.parametrize("bias", [False, True])
def test_fused_training_forward_and_gradients_equal_the_formula(bias, monkeypatch):
    calls = []
    monkeypatch.setattr(lora_ops, "lora_linear", lambda *a: calls.append(1) or torch.ops.tuneforge.lora_linear(*a))
    layer = _layer(bias=bias)
    x = torch.randn(2, 5, 24, requires_grad=True)
    out = layer(x)
    assert calls, "the training forward did not take the fused op"
    ref = _reference(layer, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(_grads(layer, x, out), _grads(layer, x, ref), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fused_path_keeps_dropout_on_the_adapter_input_only():
    layer = _layer(dropout=0.5)
    x = torch.randn(6, 24, requires_grad=True)
    torch.manual_seed(1)
    out = layer(x)
    torch.manual_seed(1)
    mask = F.dropout(torch.ones(6, 24), 0.5, training=True)  # the same draws as the layer's dropout
    ref = _reference(layer, x, mask)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(_grads(layer, x, out), _grads(layer, x, ref), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_base_under_autocast_matches_the_unfused_path():
    layer = _layer(dtype=torch.bfloat16)
    x = torch.randn(8, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = layer(x.clone().requires_grad_())
        with torch.no_grad():  # no grad: the autograd path (_add_lora)
            plain = layer(x)
    assert fused.dtype == plain.dtype == torch.bfloat16
    torch.testing.assert_close(fused, plain, rtol=2e-2, atol=2e-2)


def test_ops_pass_torch_opcheck():
    x, w, a, b = torch.randn(6, 8), torch.randn(10, 8), torch.randn(3, 8), torch.randn(10, 3)
    for x_drop, bias in ((None, None), (torch.randn(6, 8), torch.randn(10))):
        args = (x.requires_grad_(), x_drop, w, bias, a.requires_grad_(), b.requires_grad_())
        torch.library.opcheck(lora_ops.lora_linear, args)
        codes, scale = quantize_rows_reference(x.detach())
        w_codes, w_scale = quantize_rows_reference(w)
        args = (x, codes, scale, x_drop, w_codes, w_scale.view(-1), bias, a, b)
        # (test_schema compares values with ops float8 lacks on the CPU)
        torch.library.opcheck(lora_ops.lora_linear_fp8, args, test_utils=(
            "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))
        q = quantize_4bit(w, 64, "nf4", True)
        weight = (q.packed, q.absmax, q.absmax2, q.offset, list(q.shape), q.blocksize, q.quant_type)
        for x_codes, x_scale in ((None, None), (codes, scale)):
            args = (x, x_codes, x_scale, x_drop, *weight, bias, a, b)
            torch.library.opcheck(lora_ops.lora_linear_4bit, args, test_utils=(
                "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_compiled_layer_has_no_graph_break():
    layer = _layer()
    x = torch.randn(3, 24, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, _reference(layer, x), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert layer.lora_A["default"].weight.grad is not None and x.grad is not None


def _as_base(kind: str, linear: nn.Linear) -> nn.Module:
    if kind == "dense":
        return linear
    if kind == "fp8":
        return Linear8.from_linear(linear, out_dtype=torch.float32)
    base = Linear4bit.from_linear(linear)
    base.fp8 = kind == "4bit-fp8"
    return base


@pytest.mark.parametrize("kind", ["dense", "fp8", "4bit", "4bit-fp8"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_every_base_kind_fused_equals_the_autograd_path(kind, dropout, monkeypatch):
    """Each op (the CPU emulates _scaled_mm) gives the outputs and gradients of the base + the autograd LoRA term."""
    layer = _layer(bias=True, dropout=dropout)
    layer.base_layer = _as_base(kind, layer.base_layer)
    x = torch.randn(2, 7, 24)
    calls = []
    monkeypatch.setattr(lora_ops, "lora_forward", lambda *a: calls.append(1) or real_forward(*a))

    def run():
        xi = x.clone().requires_grad_()
        torch.manual_seed(3)
        out = layer(xi)
        return out, _grads(layer, xi, out)

    fused, fused_grads = run()
    assert calls, "the training forward did not take the fused op"
    monkeypatch.setattr(LoRALinear, "_fused_adapter", lambda self, x: None)
    plain, plain_grads = run()
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    for got, want in zip(fused_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


real_forward = lora_ops.lora_forward
