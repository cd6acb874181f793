"""The fused LoRA training op (methods/lora_ops.py) against autograd on the plain formula."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.methods import lora_ops
from tuneforge.methods.lora import LoRALinear
from tuneforge.quant.fp8 import Linear8
from tuneforge.quant.linear4bit import Linear4bit


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


@pytest.fixture
def calls(monkeypatch) -> list:
    """One entry per call of the fused op."""
    seen: list = []
    monkeypatch.setattr(lora_ops, "lora_linear", lambda *a: seen.append(1) or torch.ops.tuneforge.lora_linear(*a))
    return seen


@pytest.mark.parametrize("bias", [False, True])
def test_fused_training_forward_and_gradients_equal_the_formula(bias, calls):
    layer = _layer(bias=bias)
    x = torch.randn(2, 5, 24, requires_grad=True)
    out = layer(x)
    assert calls, "the training forward did not take the fused op"
    ref = _reference(layer, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(_grads(layer, x, out), _grads(layer, x, ref), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fused_path_keeps_dropout_on_the_adapter_input_only(calls):
    layer = _layer(dropout=0.5)
    x = torch.randn(6, 24, requires_grad=True)
    torch.manual_seed(1)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    assert calls
    assert all(t.data_ptr() != x.data_ptr() for t in saved), "x is kept though only its dropped-out copy is read"
    torch.manual_seed(1)
    mask = F.dropout(torch.ones(6, 24), 0.5, training=True)  # the same draws as the layer's dropout
    ref = _reference(layer, x, mask)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(_grads(layer, x, out), _grads(layer, x, ref), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_base_under_autocast_matches_the_unfused_path(calls):
    layer = _layer(dtype=torch.bfloat16)
    x = torch.randn(8, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = layer(x.clone().requires_grad_())
        assert len(calls) == 1
        with torch.no_grad():  # no grad: the autograd path (_add_lora)
            plain = layer(x)
        assert len(calls) == 1
    assert fused.dtype == plain.dtype == torch.bfloat16
    torch.testing.assert_close(fused, plain, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("members", [1, 3])
def test_ops_pass_torch_opcheck(members):
    x, a = torch.randn(6, 8), torch.randn(3 * members, 8)
    weights = [torch.randn(10 + i, 8) for i in range(members)]
    bs = [torch.randn(10 + i, 3).requires_grad_() for i in range(members)]
    with_bias = [torch.randn(10 + i) for i in range(members)]
    for x_drop, biases in ((None, [None] * members), (torch.randn(6, 8), with_bias)):
        args = (x.requires_grad_(), x_drop, weights, biases, a.requires_grad_(), bs)
        torch.library.opcheck(lora_ops.lora_linear, args)


def test_compiled_layer_has_no_graph_break():
    layer = _layer()
    x = torch.randn(3, 24, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, _reference(layer, x), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert layer.lora_A["default"].weight.grad is not None and x.grad is not None


@pytest.mark.parametrize("kind", ["fp8", "4bit", "4bit-fp8"])
def test_fp8_and_4bit_bases_keep_the_autograd_path(kind, monkeypatch):
    """Measured slower through an in-place op on the H200 (docs/gpu-speed.md): these bases train through autograd."""
    layer = _layer(bias=True)
    if kind == "fp8":
        layer.base_layer = Linear8.from_linear(layer.base_layer, out_dtype=torch.float32)
    else:
        layer.base_layer = Linear4bit.from_linear(layer.base_layer)
        layer.base_layer.fp8 = kind == "4bit-fp8"
    monkeypatch.setattr(lora_ops, "lora_forward", lambda *a: pytest.fail("took the dense op"))
    layer(torch.randn(3, 24, requires_grad=True)).sum().backward()
    assert layer.lora_B["default"].weight.grad is not None


def test_an_input_without_gradient_gets_none_and_the_adapters_still_train(calls):
    layer = _layer()
    out = layer(torch.randn(4, 24))  # e.g. layer 0's q/k/v input under frozen embeddings
    out.sum().backward()
    assert calls and layer.lora_A["default"].weight.grad is not None
    assert layer.lora_B["default"].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("case", ["two adapters", "dora", "lora_bias", "merged", "disabled", "no_grad"])
def test_cases_the_op_does_not_cover_take_the_autograd_path(case, calls):
    layer = _layer()
    if case == "two adapters":
        layer.add_adapter("other", r=2, alpha=4)
        layer.active_adapters = ["default", "other"]
    elif case in ("dora", "lora_bias"):
        layer.add_adapter("other", r=2, alpha=4, use_dora=case == "dora", lora_bias=case == "lora_bias")
        layer.active_adapters = ["other"]
    elif case == "merged":
        layer.merged_adapters.append("default")
    elif case == "disabled":
        layer.disabled = True
    x = torch.randn(3, 24, requires_grad=True)
    if case == "no_grad":
        with torch.no_grad():
            layer(x)
    else:
        layer(x)
    assert not calls
