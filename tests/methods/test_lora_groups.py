"""Grouped LoRA projections (methods/lora_groups.py) against each projection run on its own."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.methods import lora_groups, lora_ops
from tuneforge.methods.lora import LoRALinear, apply_lora, lora_layers, lora_state_dict
from tuneforge.methods.lora_groups import group_projections
from tuneforge.methods.peft_format import save_adapter
from tuneforge.quant.fp8 import Linear8
from tuneforge.quant.linear4bit import quantize_model

CUDA = torch.cuda.is_available()


def _model(family: str = "llama", dropout: float = 0.0, base: str = "dense", grouped: bool = False,
           device: str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """A tiny random decoder (2 layers), LoRA r=4 on every projection, B random so the LoRA terms show."""
    import transformers

    torch.manual_seed(0)
    config_cls, model_cls = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                             "mistral": ("MistralConfig", "MistralForCausalLM")}[family]
    config = getattr(transformers, config_cls)(vocab_size=64, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               attn_implementation="eager")
    model = getattr(transformers, model_cls)(config).to(device, dtype)
    if base == "4bit":
        quantize_model(model)
    apply_lora(model, r=4, alpha=8, dropout=dropout)
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_B["default"].weight)
        if base == "fp8":
            layer.base_layer = Linear8.from_linear(layer.base_layer, out_dtype=dtype)
    if grouped:
        assert group_projections(model) == 4  # q/k/v and gate/up in each of 2 layers
    return model


def _loss_and_grads(model: nn.Module, autocast: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    device = next(model.parameters()).device
    torch.manual_seed(1)
    embeds = torch.randn(2, 7, 32, device=device, dtype=next(model.parameters()).dtype, requires_grad=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(inputs_embeds=embeds, use_cache=False).logits
    loss = (logits * torch.linspace(-1, 1, logits.shape[-1], device=device, dtype=logits.dtype)).sum()
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    return logits, [*torch.autograd.grad(loss, [embeds, *params])]


@pytest.fixture
def calls(monkeypatch) -> dict[str, list[int]]:
    """The members of each call of the dense op (forward, backward) and each group formed."""
    seen: dict[str, list[int]] = {"op": [], "backward": [], "groups": []}
    op, backward, group = lora_ops.lora_linear, lora_ops.lora_linear_backward, lora_groups.group_forward
    monkeypatch.setattr(lora_ops, "lora_linear", lambda *a: seen["op"].append(len(a[2])) or op(*a))
    monkeypatch.setattr(lora_ops, "lora_linear_backward", lambda *a: seen["backward"].append(len(a[5])) or backward(*a))

    def spy(members, x):
        out = group(members, x)
        seen["groups"].append(0 if out is None else len(members))
        return out

    monkeypatch.setattr(lora_groups, "group_forward", spy)
    return seen


def _assert_same(got, want, tol: float) -> None:
    """Output and gradients equal up to ``tol`` relative to their norm (the summation order differs: fp32 rounding
    moves 2-layer gradients by ~2e-5 of their norm here; fp64 agrees to 1e-15)."""
    (y, grads), (y_ref, grads_ref) = got, want
    for g, g_ref in zip([y, *grads], [y_ref, *grads_ref], strict=True):
        assert g.shape == g_ref.shape and g.dtype == g_ref.dtype
        g, g_ref = g.detach().double(), g_ref.detach().double()
        error = float((g - g_ref).norm() / g_ref.norm())
        assert error <= tol, f"relative error {error:.2e} > {tol:.0e}"


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])  # qwen2: q/k/v with biases
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grouped_dense_equals_ungrouped(family, dtype, calls):
    want = _loss_and_grads(_model(family, dtype=dtype))
    assert sorted(calls["op"]) == sorted(calls["backward"]) == [1] * 14 and not calls["groups"]
    calls["op"].clear()
    calls["backward"].clear()
    _assert_same(_loss_and_grads(_model(family, grouped=True, dtype=dtype)), want,
                 tol=1e-4 if dtype == torch.float32 else 1e-12)
    assert sorted(calls["op"]) == [1, 1, 1, 1, 2, 2, 3, 3]  # o/down alone; gate/up and q/k/v as one op each
    assert sorted(calls["backward"]) == [1, 1, 1, 1, 2, 2, 3, 3]
    assert sorted(calls["groups"]) == [2, 2, 3, 3]


def test_grouped_bf16_base_under_autocast_equals_ungrouped(calls):
    want = _loss_and_grads(_model(dtype=torch.bfloat16), autocast=True)
    _assert_same(_loss_and_grads(_model(dtype=torch.bfloat16, grouped=True), autocast=True), want, tol=2e-2)
    assert sorted(calls["groups"]) == [2, 2, 3, 3]


def test_grouped_4bit_base_equals_ungrouped(calls):
    want = _loss_and_grads(_model(base="4bit"))
    _assert_same(_loss_and_grads(_model(base="4bit", grouped=True)), want, tol=1e-4)
    assert sorted(calls["groups"]) == [2, 2, 3, 3] and not calls["op"]


def test_grouped_fp8_base_equals_ungrouped_emulated(calls):
    want = _loss_and_grads(_model(base="fp8"))
    _assert_same(_loss_and_grads(_model(base="fp8", grouped=True)), want, tol=1e-4)
    assert sorted(calls["groups"]) == [2, 2, 3, 3] and not calls["op"]


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (Inductor's kernels, the FP8 base's real kernels)")
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("base", ["dense", "fp8"])
def test_grouped_equals_ungrouped_on_the_gpu(base, compiled, calls):
    from tuneforge.quant.fp8 import fp8_supported

    if base == "fp8" and not fp8_supported(torch.device("cuda")):
        pytest.skip("needs FP8 (compute capability 8.9+)")
    models = [_model(base=base, device="cuda", dtype=torch.bfloat16, grouped=g) for g in (False, True)]
    if compiled:
        torch._dynamo.reset()
        for model in models:
            for layer in model.model.layers:
                layer.compile(fullgraph=True)
    want, got = (_loss_and_grads(m) for m in models)
    _assert_same(got, want, tol=2e-2)
    if not compiled:  # compiled, the calls are traced once for every layer and test
        assert calls["groups"] and (bool(calls["op"]) == (base == "dense"))


@pytest.mark.parametrize("grouped", [False, True])
def test_compiled_layers_share_one_graph(grouped):
    """Every decoder layer runs the same compiled graph: the hooks must not make Dynamo guard on each layer (one
    recompilation per layer, and past its cache limit the rest would run eagerly)."""
    from torch._dynamo.testing import CompileCounter

    model = _model(grouped=grouped)
    torch._dynamo.reset()
    counter = CompileCounter()
    for layer in model.model.layers:
        layer.compile(backend=counter, fullgraph=True)
    _loss_and_grads(model)
    assert len(model.model.layers) == 2 and counter.frame_count == 1


class _Attention(nn.Module):
    """q/k/v siblings under one parent; ``other``: k and v read another tensor (as cross-attention does)."""

    def __init__(self, bias: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        for name, out in (("q_proj", 16), ("k_proj", 8), ("v_proj", 8)):
            layer = LoRALinear(nn.Linear(24, out, bias=bias), "default", r=4, alpha=8, dropout=dropout)
            nn.init.normal_(layer.lora_B["default"].weight)
            setattr(self, name, layer)

    def forward(self, hidden_states: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        kv = hidden_states if other is None else other
        return torch.cat([self.q_proj(hidden_states), self.k_proj(kv), self.v_proj(kv)], dim=-1)


def _reference(attn: _Attention, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    outs = []
    for layer in (attn.q_proj, attn.k_proj, attn.v_proj):
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        base = layer.base_layer
        outs.append(F.linear(x, base.weight, base.bias) + layer.scaling["default"] * F.linear(F.linear(x * mask, a), b))
    return torch.cat(outs, dim=-1)


def _grads(attn: _Attention, x: torch.Tensor, out: torch.Tensor) -> list[torch.Tensor]:
    params = [p for n, p in attn.named_parameters() if "lora_" in n]
    return [*torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1])).sum(), [x, *params])]


@pytest.mark.parametrize("bias", [False, True])
def test_active_dropout_keeps_one_mask_per_projection_as_peft(bias, calls):
    attn, ref = _Attention(bias=bias, dropout=0.5).train(), _Attention(bias=bias, dropout=0.5).train()
    assert group_projections(attn) == 1
    x = torch.randn(2, 5, 24, requires_grad=True)
    torch.manual_seed(1)
    out = attn(x)
    assert sorted(calls["op"]) == [1, 1, 1] and calls["groups"] == [0]  # each projection its own mask
    torch.manual_seed(1)
    want = ref(x)
    _assert_same((out, _grads(attn, x, out)), (want, _grads(ref, x, want)), tol=1e-6)
    calls["op"].clear()
    attn.eval()  # no dropout drawn: the group forms
    with torch.enable_grad():
        attn(x)
    assert calls["op"] == [3]


def test_the_group_reads_its_input_once_for_the_a_gemms(monkeypatch):
    """3 base GEMMs, then ONE x·A_catᵀ in forward and ONE dh_catᵀ·x in backward (ungrouped: three of each)."""
    reads = {}
    for grouped in (False, True):
        attn = _Attention()
        if grouped:
            group_projections(attn)
        x = torch.randn(6, 24, requires_grad=True)
        mm = torch.mm
        count = [0]

        def counting(a, b, x=x, count=count, mm=mm):
            count[0] += any(t.data_ptr() == x.data_ptr() for t in (a, b))
            return mm(a, b)

        monkeypatch.setattr(torch, "mm", counting)
        attn(x).sum().backward()
        monkeypatch.setattr(torch, "mm", mm)
        reads[grouped] = count[0]
    assert reads == {False: 9, True: 5}


@pytest.mark.parametrize("case", ["two adapters", "dora", "lora_bias", "merged", "disabled", "no_grad"])
def test_members_that_cannot_group_run_alone_unchanged(case, calls):
    attn, ref = _Attention(), _Attention()
    for model in (attn, ref):
        layers = [model.q_proj, model.k_proj, model.v_proj]
        if case == "two adapters":
            torch.manual_seed(2)
            for layer in layers:
                layer.add_adapter("other", r=2, alpha=4)
                layer.active_adapters = ["default", "other"]
        elif case in ("dora", "lora_bias"):
            layers[1].add_adapter("other", r=2, alpha=4, use_dora=case == "dora", lora_bias=case == "lora_bias")
            layers[1].active_adapters = ["other"]
        elif case == "merged":
            layers[2].merge("default")
        elif case == "disabled":
            for layer in layers:
                layer.disabled = True
    group_projections(attn)
    x = torch.randn(4, 24, requires_grad=case != "no_grad")
    with torch.set_grad_enabled(case != "no_grad"):
        torch.testing.assert_close(attn(x), ref(x), rtol=1e-5, atol=1e-5)
    assert calls["groups"] == [0]
    assert all(m.group_output is None for m in (attn.q_proj, attn.k_proj, attn.v_proj))


def test_members_called_on_another_tensor_run_alone_and_nothing_is_kept(calls):
    attn, ref = _Attention(), _Attention()
    group_projections(attn)
    x = torch.randn(4, 24, requires_grad=True)
    other = torch.randn(4, 24, requires_grad=True)
    want = ref(x, other)
    calls["op"].clear()
    out = attn(x, other)
    assert calls["groups"] == [3] and sorted(calls["op"]) == [1, 1, 3]  # q took the group's output; k, v their own
    assert all(m.group_output is None for m in (attn.q_proj, attn.k_proj, attn.v_proj))
    assert getattr(attn, lora_groups.GROUPS) == ()  # not formed again: its k/v outputs were computed for nothing
    params = [p for n, p in attn.named_parameters() if "lora_" in n]
    ref_params = [p for n, p in ref.named_parameters() if "lora_" in n]
    for got, wanted in zip(torch.autograd.grad(out.sum(), [x, other, *params]),
                           torch.autograd.grad(want.sum(), [x, other, *ref_params]), strict=True):
        torch.testing.assert_close(got, wanted, rtol=1e-5, atol=1e-5)


def test_outputs_left_by_a_failed_parent_forward_go_at_its_next_call():
    attn, ref = _Attention(), _Attention()
    group_projections(attn)
    with pytest.raises(RuntimeError):
        attn(torch.randn(4, 24, requires_grad=True), torch.randn(4, 23))  # k/v: wrong width
    assert attn.k_proj.group_output is not None  # left by the failed call (no hook runs after a raise)
    x = torch.randn(4, 24, requires_grad=True)
    torch.testing.assert_close(attn(x), ref(x), rtol=1e-5, atol=1e-5)
    assert all(m.group_output is None for m in (attn.q_proj, attn.k_proj, attn.v_proj))


def test_an_input_changed_in_place_is_not_served_the_old_output(calls):
    class _Scaling(_Attention):
        def forward(self, hidden_states: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
            hidden_states.mul_(2)
            return super().forward(hidden_states)

    attn, ref = _Scaling(), _Scaling()
    group_projections(attn)
    x = torch.randn(4, 24)
    torch.testing.assert_close(attn(x.clone()), ref(x.clone()), rtol=1e-5, atol=1e-5)


def test_unwrapped_or_removed_lora_runs_as_the_base():
    from tuneforge.methods.lora import remove_lora, unwrap_lora

    for undo in (unwrap_lora, lambda m: remove_lora(m, "default")):
        attn = _Attention()
        group_projections(attn)
        undo(attn)
        x = torch.randn(4, 24, requires_grad=True)
        want = torch.cat([F.linear(x, m.weight, m.bias) for m in (attn.q_proj, attn.k_proj, attn.v_proj)], dim=-1)
        torch.testing.assert_close(attn(x), want)


@pytest.mark.parametrize("backend", ["aot_eager", "eager"])
def test_compiled_decoder_layer_has_no_graph_break_and_equals_eager(backend):
    from torch._dynamo.backends.registry import lookup_backend

    ops: list[int] = []

    def counting_backend(gm, inputs):
        ops.extend(len(n.args[2]) for n in gm.graph.nodes if n.target is torch.ops.tuneforge.lora_linear.default)
        return lookup_backend(backend)(gm, inputs)

    def run(model: nn.Module, layer: nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(1)
        h = torch.randn(2, 7, 32, requires_grad=True)
        pos = model.model.rotary_emb(h, torch.arange(7)[None].expand(2, 7))
        out = layer(h, position_embeddings=pos)
        out = out[0] if isinstance(out, tuple) else out
        params = [p for n, p in model.model.layers[0].named_parameters() if "lora_" in n]
        return out, [*torch.autograd.grad((out * torch.linspace(-1, 1, 32)).sum(), [h, *params])]

    torch._dynamo.reset()
    ref_model, model = _model(), _model(grouped=True)
    want = run(ref_model, ref_model.model.layers[0])
    got = run(model, torch.compile(model.model.layers[0], backend=counting_backend, fullgraph=True))
    _assert_same(got, want, tol=1e-4)
    assert sorted(ops) == [1, 1, 2, 3]


def test_saved_adapter_is_the_same_with_and_without_grouping(tmp_path):
    states = {}
    for grouped in (False, True):
        model = _model(grouped=grouped)
        params = [p for n, p in model.named_parameters() if "lora_" in n]
        opt = torch.optim.AdamW(params, lr=1e-2)
        for _ in range(3):
            _, grads = _loss_and_grads(model)
            for p, g in zip(params, grads[1:], strict=True):
                p.grad = g
            opt.step()
        states[grouped] = lora_state_dict(model)
        save_adapter(model, tmp_path / str(grouped))
    assert list(states[True]) == list(states[False])
    torch.testing.assert_close(states[True], states[False], rtol=1e-5, atol=1e-5)
    on, off = tmp_path / "True", tmp_path / "False"
    assert sorted(p.name for p in on.iterdir()) == sorted(p.name for p in off.iterdir())
    assert (on / "adapter_config.json").read_text() == (off / "adapter_config.json").read_text()
