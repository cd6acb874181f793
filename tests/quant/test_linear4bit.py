"""Linear4bit (a frozen 4-bit Linear) and quantize_model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from tuneforge.quant.linear4bit import Linear4bit, quantization_targets, quantize_model

LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_layer(double_quant: bool = True, bias: bool = True, **kw) -> tuple[nn.Linear, Linear4bit]:
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=bias)
    return linear, Linear4bit.from_linear(linear, double_quant=double_quant, **kw)


@pytest.mark.parametrize("double_quant", [False, True])
def test_forward_is_a_linear_with_the_dequantized_weight(double_quant):
    linear, layer = make_layer(double_quant)
    x = torch.randn(3, 5, 96)
    w = layer.dequantize()
    assert torch.equal(layer(x), F.linear(x, w, linear.bias))
    # ... and that weight is the Linear's, up to 4-bit error.
    assert (w - linear.weight).abs().max() <= 0.16 * linear.weight.abs().max()  # NF4: half gap ≤ 0.152
    assert layer.in_features == 96 and layer.out_features == 40


def test_weight_is_frozen_buffers_and_only_the_input_gets_a_gradient():
    _, layer = make_layer()
    assert [n for n, _ in layer.named_parameters()] == ["bias"] and not layer.bias.requires_grad
    assert {"weight", "absmax", "absmax2", "absmax_offset"} <= dict(layer.named_buffers()).keys()
    assert layer.weight.dtype == torch.uint8  # LoRA reads this to know the base is quantized
    x = torch.randn(4, 96, requires_grad=True)
    grad_out = torch.randn(4, 40)
    layer(x).backward(grad_out)
    torch.testing.assert_close(x.grad, grad_out @ layer.dequantize())
    assert layer.bias.grad is None
    layer.bias.requires_grad_(True)  # a user may train the bias (PEFT's bias="all")
    layer(torch.randn(2, 4, 96)).backward(grad_out.expand(2, 4, 40))
    torch.testing.assert_close(layer.bias.grad, 2 * grad_out.sum(0))


def test_backward_keeps_no_dense_weight():
    # Saving the dequantized weight per layer would hold a 16/32-bit copy of the model in training.
    _, layer = make_layer()
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel())
        return t

    x = torch.randn(4, 96, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert 96 * 40 not in saved
    y.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("double_quant", [False, True])
def test_state_dict_round_trips_through_safetensors(tmp_path, double_quant):
    _, layer = make_layer(double_quant)
    save_file(layer.state_dict(), tmp_path / "layer.safetensors")
    fresh = Linear4bit(96, 40, bias=True, double_quant=double_quant)
    fresh.load_state_dict(load_file(tmp_path / "layer.safetensors"))
    x = torch.randn(2, 96)
    assert torch.equal(fresh(x), layer(x))
    expected = {"weight", "absmax", "bias"} | ({"absmax2", "absmax_offset"} if double_quant else set())
    assert set(layer.state_dict()) == expected


def test_casting_the_module_never_rounds_the_quantized_state():
    _, layer = make_layer(double_quant=True)
    scales = layer.quantized.scales().clone()
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == torch.uint8 and layer.absmax2.dtype == torch.float32
    assert torch.equal(layer.quantized.scales(), scales)
    assert layer.bias.dtype == torch.bfloat16  # ordinary float parameters do follow the cast
    x = torch.randn(2, 96, dtype=torch.bfloat16)
    assert torch.equal(layer(x), F.linear(x, layer.dequantize(torch.bfloat16), layer.bias))


def test_compute_dtype_sets_the_matmul_dtype_not_the_output_dtype():
    linear, layer = make_layer(compute_dtype=torch.bfloat16)
    x = torch.randn(2, 96)
    y = layer(x)
    expected = F.linear(x.bfloat16(), layer.dequantize(torch.bfloat16), linear.bias.bfloat16())
    assert y.dtype == torch.float32 and torch.equal(y, expected.float())


def test_quantize_model_replaces_linears_but_not_head_embeddings_norms(tiny_model):
    embed = tiny_model.model.embed_tokens.weight
    norm = tiny_model.model.norm.weight
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 12))
    with torch.no_grad():
        before = tiny_model(ids).logits
    result = quantize_model(tiny_model)
    layers = tiny_model.config.num_hidden_layers
    assert len(result.modules) == 7 * layers
    assert all(isinstance(tiny_model.get_submodule(n), Linear4bit) for n in result.modules)
    assert sorted({n.rsplit(".", 1)[-1] for n in result.modules}) == sorted(LLAMA_LINEARS)
    assert type(tiny_model.lm_head) is nn.Linear and tiny_model.lm_head.weight is embed  # still tied
    assert tiny_model.model.embed_tokens.weight is embed and tiny_model.model.norm.weight is norm
    assert result.bytes_after < result.bytes_before
    with torch.no_grad():
        after = tiny_model(ids).logits
    assert torch.isfinite(after).all() and not torch.equal(after, before)
    assert F.cosine_similarity(after.flatten(), before.flatten(), dim=0) > 0.99


def test_skip_names_and_shared_weights():
    torch.manual_seed(0)
    model = nn.ModuleDict({"up_proj": nn.Linear(64, 64), "down_proj": nn.Linear(64, 64),
                           "a": nn.Linear(64, 64), "b": nn.Linear(64, 64)})
    model["b"].weight = model["a"].weight  # shared: quantizing one would silently untie them
    assert quantization_targets(model, skip=("up_proj",)) == ["down_proj"]
    quantize_model(model, skip=("up_proj",))
    assert isinstance(model["down_proj"], Linear4bit)
    assert all(type(model[k]) is nn.Linear for k in ("up_proj", "a", "b"))


def test_lora_wraps_a_linear4bit_and_trains_only_its_adapters():
    from tuneforge.methods.lora import LoRALinear

    _, layer = make_layer()
    wrapped = LoRALinear(layer, adapter_name="default", r=4, alpha=8)
    assert wrapped.lora_A["default"].weight.dtype == torch.float32  # fp32 adapters on a 4-bit base
    x = torch.randn(3, 96)
    assert torch.equal(wrapped(x), layer(x))  # B starts at zero
    wrapped.lora_B["default"].weight.data.normal_()
    wrapped(x).sum().backward()
    assert wrapped.lora_A["default"].weight.grad is not None
    assert [n for n, p in wrapped.named_parameters() if p.requires_grad] == [
        "lora_A.default.weight", "lora_B.default.weight"]


def test_quantizing_a_lora_model_leaves_the_adapters_alone():
    from tuneforge.methods.lora import LoRALinear

    model = nn.Sequential(LoRALinear(nn.Linear(64, 64), adapter_name="default", r=4, alpha=8))
    assert quantize_model(model).modules == ["0.base_layer"]
    assert type(model[0].lora_A["default"]) is nn.Linear


def test_a_conv1d_is_quantized_from_its_transposed_weight():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(40, 96)  # nf=out, nx=in: weight [96, 40]
    nn.init.normal_(conv.bias)
    layer = Linear4bit.from_linear(conv)
    assert (layer.in_features, layer.out_features) == (96, 40) and layer.fan_in_fan_out
    assert not Linear4bit.from_linear(nn.Linear(96, 40)).fan_in_fan_out
    x = torch.randn(3, 96)
    torch.testing.assert_close(layer(x), F.linear(x, layer.dequantize(torch.float32), conv.bias))
    assert (layer.dequantize(torch.float32) - conv.weight.t()).abs().max() < 0.02


def test_quantize_model_covers_conv1d_and_moe_expert_stacks():
    from tiny_families import tiny
    from tuneforge.methods.lora import count_parameters
    from tuneforge.quant.experts4bit import Experts4bit

    gpt2 = tiny("gpt2")
    names = quantize_model(gpt2).modules
    assert len(names) == 8 and {n.rsplit(".", 1)[-1] for n in names} == {"c_attn", "c_proj", "c_fc"}
    for family in ("mixtral", "gpt_oss"):  # [E, out, in] and GPT-OSS's [E, in, out] with expert biases
        model = tiny(family)
        ids = torch.randint(0, 64, (2, 9))
        with torch.no_grad():
            before = model(ids).logits
        total = count_parameters(model)[1]
        result = quantize_model(model)
        assert [n for n in result.modules if n.endswith(".experts")] == ["model.layers.0.mlp.experts",
                                                                         "model.layers.1.mlp.experts"]
        layer = model.model.layers[0].mlp.experts
        assert isinstance(layer, Experts4bit) and set(layer.stacks) == {"gate_up_proj", "down_proj"}
        assert [n for n, p in model.named_parameters() if p.dim() == 3] == []
        assert count_parameters(model)[1] == total and result.bytes_after < result.bytes_before / 3
        with torch.no_grad():
            after = model(ids).logits
        assert F.cosine_similarity(after.flatten(), before.flatten(), dim=0) > 0.99
        model.to(torch.bfloat16)  # casting never rounds the 4-bit state
        assert layer.gate_up_proj_packed.dtype == torch.uint8 and layer.gate_up_proj_absmax2.dtype == torch.float32


def test_falcon_linear_is_quantized_like_a_linear():
    from tiny_families import tiny

    model = tiny("falcon")
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
    names = quantize_model(model).modules
    assert {n.rsplit(".", 1)[-1] for n in names} == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}
    with torch.no_grad():
        assert F.cosine_similarity(model(ids).logits.flatten(), before.flatten(), dim=0) > 0.99
    mha = nn.MultiheadAttention(64, 4)  # its out_proj (a Linear subclass) is read as a weight, not called
    assert quantization_targets(nn.ModuleDict({"attn": mha})) == []


# --- under torch.compile, and with FP8 compute (method.lora.base_precision: fp8) --------------------------------------

def lora_on_4bit(fp8: bool, bias: bool = True, seed: int = 0, device: str = "cpu",
                 compute_dtype: torch.dtype | None = None):
    """A LoRA layer (B nonzero) on a 4-bit 128 -> 64 base, and an input that needs a gradient."""
    from tuneforge.methods.lora import LoRALinear

    torch.manual_seed(seed)  # everything drawn on the CPU, then moved: the same layer and input on any device
    base = Linear4bit.from_linear(nn.Linear(128, 64, bias=bias), compute_dtype=compute_dtype)
    base.fp8 = fp8
    layer = LoRALinear(base, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.1)
        if bias:
            base.bias.normal_()
    return layer.to(device), torch.randn(2, 7, 128).to(device).requires_grad_(True)


def forward_and_grads(module: nn.Module, layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
    x.grad = None
    layer.zero_grad()
    y = module(x)
    y.backward(grad)
    return [y.detach(), x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad]


@pytest.mark.parametrize("fp8", [False, True])
def test_a_compiled_lora_layer_on_a_4bit_base_is_one_graph_and_computes_the_same(fp8):
    layer, x = lora_on_4bit(fp8)
    grad = torch.randn(2, 7, 64)
    eager = forward_and_grads(layer, layer, x, grad)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)  # fullgraph: any graph break fails
    for got, want in zip(forward_and_grads(compiled, layer, x, grad), eager, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fp8", [False, True])
def test_a_qlora_decoder_layer_compiles_as_one_graph(fp8):
    # train.compile compiles each decoder layer: a graph break at every 4-bit linear would undo most of its gain
    from conftest import build_tiny_model
    from tuneforge.config import MethodConfig
    from tuneforge.methods.lora import lora_layers
    from tuneforge.methods.setup import prepare_model

    model = build_tiny_model(128, layers=1)
    prepare_model(model, MethodConfig(name="qlora", lora={"dropout": 0.0}))
    for layer in lora_layers(model).values():
        layer.base_layer.fp8 = fp8
        nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    runs = []
    for compiled in (False, True):
        if compiled:
            model.model.layers[0].compile(backend="aot_eager", fullgraph=True)
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        runs.append([loss.detach()] + [p.grad for p in model.parameters() if p.requires_grad])
    for got, want in zip(*runs, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_fp8_compute_is_the_fp8_matmul_of_the_row_quantized_weight():
    from tuneforge.quant.fp8 import quantize_rows_reference

    layer, x = lora_on_4bit(fp8=True)
    base = layer.base_layer
    grad = torch.randn(2, 7, 64)
    y = base(x)
    y.backward(grad)
    # the reference: the dequantized fp32 weight quantized per row, the input per row, an fp32 matmul
    w_codes, w_scale = quantize_rows_reference(base.dequantize(torch.float32))
    x_codes, x_scale = quantize_rows_reference(x.detach().reshape(-1, 128))
    expected = (x_codes.float() * x_scale) @ (w_codes.float() * w_scale).t() + base.bias
    torch.testing.assert_close(y.detach().reshape(-1, 64), expected, rtol=1e-5, atol=1e-6)
    g_codes, g_scale = quantize_rows_reference(grad.reshape(-1, 64), w_scale.view(-1))  # W's scale on dy's columns
    torch.testing.assert_close(x.grad.reshape(-1, 128), (g_codes.float() * g_scale) @ w_codes.float(),
                               rtol=1e-5, atol=1e-6)
    # ... and close to the 16-bit compute of the same 4-bit weight
    base.fp8 = False
    dense = base(x.detach())
    assert float((y.detach() - dense).norm() / dense.norm()) < 0.05


def test_fp8_compute_keeps_no_weight_between_forward_and_backward():
    layer, x = lora_on_4bit(fp8=True, bias=False)
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer.base_layer(x)
    base = layer.base_layer
    buffers = {t.data_ptr() for t in (base.weight, base.absmax, base.absmax2, base.absmax_offset)}
    assert saved and all(t.data_ptr() in buffers for t in saved)  # the 4-bit buffers only: no weight, codes, input


def test_fp8_compute_quantizes_an_input_shared_by_several_layers_once(monkeypatch):
    from tuneforge.quant import fp8

    calls = []
    real = fp8.quantize_rows
    monkeypatch.setattr(fp8, "quantize_rows", lambda x, c=None: calls.append(1) or real(x, c))
    layers = [lora_on_4bit(fp8=True, seed=s)[0].base_layer for s in (1, 2, 3)]  # q, k, v
    x = torch.randn(5, 128)
    with torch.no_grad():
        for m in layers:
            m(x)
    assert len(calls) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_4bit_linear_compiled_by_inductor_matches_eager():
    layer, x = lora_on_4bit(fp8=False, device="cuda", compute_dtype=torch.bfloat16)
    grad = torch.randn(2, 7, 64, device="cuda")
    eager = forward_and_grads(layer, layer, x, grad)
    compiled = torch.compile(layer, fullgraph=True)
    for got, want in zip(forward_and_grads(compiled, layer, x, grad), eager, strict=True):
        assert float((got.float() - want.float()).norm() / want.float().norm()) < 1e-2


def fp8_gpu() -> bool:
    from tuneforge.quant.fp8 import fp8_supported

    return torch.cuda.is_available() and fp8_supported(torch.device("cuda"))


@pytest.mark.skipif(not fp8_gpu(), reason="needs a CUDA GPU with FP8 (compute capability 8.9+)")
def test_fp8_compute_on_the_gpu_follows_the_cpu_emulation_eager_and_compiled():
    grad = torch.randn(2, 7, 64)
    cpu_layer, cpu_x = lora_on_4bit(fp8=True)
    reference = forward_and_grads(cpu_layer, cpu_layer, cpu_x, grad)
    layer, _ = lora_on_4bit(fp8=True, device="cuda", compute_dtype=torch.bfloat16)
    x = cpu_x.detach().cuda().requires_grad_(True)
    for module in (layer, torch.compile(layer, fullgraph=True)):
        for got, want in zip(forward_and_grads(module, layer, x, grad.cuda()), reference, strict=True):
            got, want = got.float().cpu(), want.float()
            assert float((got - want).norm() / want.norm()) < 2e-2
