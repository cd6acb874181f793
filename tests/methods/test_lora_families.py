"""LoRA on every kind of layer the causal-LM families use, proven against peft.

- Conv1D (GPT-2: weight stored ``[in, out]``): saved with ``fan_in_fan_out``; peft's adapters load.
- Fused projections (Phi-3 ``qkv_proj``/``gate_up_proj``, GPT-NeoX/Falcon/Bloom ``query_key_value``, MPT ``Wqkv``).
- MoE experts (3D parameters in transformers 5) and routers: peft's ``target_parameters`` layout.

Each family is a tiny seeded random model built from transformers' config class; "equal logits" is exact
(peft and tuneforge compute the same float operations).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from tiny_families import tiny
from tuneforge.config import MethodConfig
from tuneforge.errors import ConfigError, ModelError
from tuneforge.methods.lora import apply_lora, format_trainable, lora_layers, merge_lora, unwrap_lora
from tuneforge.methods.lora_params import LoRAParam, expert_parameters, router_parameters, unwrap_params
from tuneforge.methods.peft_format import load_adapter, save_adapter
from tuneforge.methods.setup import prepare_model
from tuneforge.quant.experts4bit import Experts4bit
from tuneforge.quant.linear4bit import Linear4bit, expert_targets, set_submodule

peft = pytest.importorskip("peft")

FUSED = {"phi3": ["qkv_proj", "gate_up_proj"], "gpt_neox": ["query_key_value"], "falcon": ["query_key_value"],
         "bloom": ["query_key_value"], "mpt": ["Wqkv"]}
MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss"]


def ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(3))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(ids()).logits


def randomize_b(model: nn.Module, seed: int = 1) -> None:
    """Non-zero B matrices, so the adapter changes the output (A is random already)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            w = layer.lora_B["default"].weight
            w.copy_(torch.randn(w.shape, generator=gen) * 0.3)


def peft_logits(base: nn.Module, adapter_dir) -> torch.Tensor:
    return logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir)).eval())


def peft_adapter(base: nn.Module, out, **config) -> tuple[torch.Tensor, object]:
    """A peft-made adapter with random A and B, saved to ``out``; returns (peft's logits, out)."""
    torch.manual_seed(5)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                                                     **config)).eval()
    model.save_pretrained(str(out))
    return logits(model), out


# --- Conv1D (GPT-2) ---------------------------------------------------------------------------------------


def test_gpt2_all_linear_adapts_every_conv1d_but_not_the_head():
    model = tiny("gpt2")
    names = apply_lora(model, r=2, alpha=4)
    assert sorted({n.rsplit(".", 1)[-1] for n in names}) == ["c_attn", "c_fc", "c_proj"]
    assert len(names) == 8 and "lm_head" not in names
    layer = model.get_submodule("transformer.h.0.attn.c_attn")
    assert (layer.in_features, layer.out_features) == (32, 96) and layer.fan_in_fan_out


def test_gpt2_adapter_is_saved_with_fan_in_fan_out_and_peft_gives_the_same_logits(tmp_path):
    base = tiny("gpt2")
    model = copy.deepcopy(base)
    apply_lora(model, r=2, alpha=4)
    randomize_b(model)
    save_adapter(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    ours = logits(model)
    assert not torch.equal(ours, logits(base))
    assert torch.equal(peft_logits(base, tmp_path / "a"), ours)


def test_peft_gpt2_adapter_loads_with_the_same_logits(tmp_path):
    base = tiny("gpt2")
    expected, out = peft_adapter(base, tmp_path / "p", target_modules=["c_attn", "c_proj", "c_fc"],
                                 fan_in_fan_out=True)
    model = copy.deepcopy(base)
    load_adapter(model, out)
    assert torch.equal(logits(model), expected)


def test_gpt2_merge_adds_the_delta_in_the_conv1d_layout():
    model = tiny("gpt2")
    apply_lora(model, r=2, alpha=4)
    randomize_b(model)
    before = logits(model)
    merge_lora(model)
    unwrap_lora(model)
    assert type(model.get_submodule("transformer.h.0.mlp.c_fc")).__name__ == "Conv1D"
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=0)


def test_gpt2_qlora_quantizes_conv1d_and_the_adapter_still_says_fan_in_fan_out(tmp_path):
    base = tiny("gpt2")
    model = copy.deepcopy(base)
    prepare_model(model, MethodConfig(name="qlora"))
    layer = model.get_submodule("transformer.h.0.attn.c_attn")
    assert isinstance(layer.base_layer, Linear4bit) and layer.base_layer.fan_in_fan_out
    dense = layer.base_layer.dequantize(torch.float32)
    assert dense.shape == (96, 32)  # [out, in], the transpose of the Conv1D's weight
    assert (dense - base.get_submodule("transformer.h.0.attn.c_attn").weight.t()).abs().max() < 0.02
    save_adapter(model, tmp_path / "q")
    assert json.loads((tmp_path / "q" / "adapter_config.json").read_text())["fan_in_fan_out"] is True


# --- fused projections ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FUSED))
def test_fused_projections_are_targeted_and_peft_gives_the_same_logits(family, tmp_path):
    base = tiny(family)
    model = copy.deepcopy(base)
    names = apply_lora(model, r=2, alpha=4)
    for fused in FUSED[family]:
        assert any(n.endswith(f".{fused}") for n in names), (fused, names)
    randomize_b(model)
    save_adapter(model, tmp_path / "a")
    assert torch.equal(peft_logits(base, tmp_path / "a"), logits(model))


@pytest.mark.parametrize("family", sorted(FUSED))
def test_peft_all_linear_adapter_on_fused_projections_loads(family, tmp_path):
    base = tiny(family)
    expected, out = peft_adapter(base, tmp_path / "p", target_modules="all-linear")
    model = copy.deepcopy(base)
    load_adapter(model, out)
    assert torch.equal(logits(model), expected)


# --- MoE experts and routers ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_all_linear_adapts_attention_and_experts_like_peft_target_parameters(family, tmp_path, caplog):
    base = tiny(family)
    model = copy.deepcopy(base)
    with caplog.at_level("INFO"):
        summary = prepare_model(model, MethodConfig(name="lora", lora={"r": 2, "alpha": 4}))
    assert "routers left out" in caplog.text and "experts.gate_up_proj" in caplog.text
    experts = {p for p, m in model.named_modules() if isinstance(m, LoRAParam)}
    assert experts and all(".experts" in p for p in experts)  # routers are not adapted by default
    # peft with the same targets trains exactly as many parameters (peft's own "all-linear" adds the routers and
    # doubles gate_up_proj's rank on Mixtral-like models, for v4 compatibility: those adapters load, see below)
    linear = sorted({p.rsplit(".", 1)[-1] for p, m in model.named_modules() if type(m).__name__ == "LoRALinear"})
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=linear, target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
    trainable = sum(p.numel() for p in reference.parameters() if p.requires_grad)
    assert f"trainable params: {trainable:,} " in summary
    randomize_b(model)
    model.eval()
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]
    assert config["lora_dropout"] == 0.0  # peft refuses dropout with target_parameters; it is training-only
    ours = logits(model)
    assert not torch.equal(ours, logits(base))
    assert torch.equal(peft_logits(base, tmp_path / "a"), ours)
    again = copy.deepcopy(base)
    load_adapter(again, tmp_path / "a")
    assert torch.equal(logits(again), ours)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_peft_adapter_with_experts_and_router_loads_with_the_same_logits(family, tmp_path):
    base = tiny(family)
    router = router_parameters(base)[0][0].rsplit(".", 1)[-1]  # gate or router
    expected, out = peft_adapter(base, tmp_path / "p", target_modules=["q_proj", "o_proj"],
                                 target_parameters=["experts.gate_up_proj", "experts.down_proj", f"{router}.weight"])
    model = copy.deepcopy(base)
    paths = load_adapter(model, out)
    assert any(p.endswith(f".{router}") for p in paths) and any(p.endswith(".experts.base_layer") for p in paths)
    assert torch.equal(logits(model), expected)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_peft_all_linear_moe_adapter_loads_with_its_rank_patterns(family, tmp_path):
    base = tiny(family)
    expected, out = peft_adapter(base, tmp_path / "p", target_modules="all-linear",
                                 target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    model = copy.deepcopy(base)
    load_adapter(model, out)
    assert torch.equal(logits(model), expected)


def test_router_is_selectable_and_experts_merge_into_the_3d_weights():
    model = tiny("mixtral")
    prepare_model(model, MethodConfig(name="lora", lora={
        "r": 2, "alpha": 4, "target_modules": ["q_proj"],
        "target_parameters": ["experts.gate_up_proj", "experts.down_proj", "mlp.gate.weight"]}))
    wrapped = {(p, m.parameter_name) for p, m in model.named_modules() if isinstance(m, LoRAParam)}
    assert ("model.layers.0.mlp.gate", "weight") in wrapped
    assert ("model.layers.1.mlp.experts.base_layer", "gate_up_proj") in wrapped  # registered first: innermost
    randomize_b(model)
    model.eval()
    before = logits(model)
    merge_lora(model)
    unwrap_lora(model)
    assert not any(isinstance(m, LoRAParam) for m in model.modules())
    assert type(model.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=0)


def test_expert_lora_trains_through_the_3d_weights():
    model = tiny("qwen3_moe")
    prepare_model(model, MethodConfig(name="lora", lora={"r": 2, "alpha": 4, "target_modules": ["q_proj"],
                                                         "target_parameters": ["experts.down_proj"]}))
    randomize_b(model)
    model.train()
    model(ids(), labels=ids()).loss.backward()
    layers = [m for m in model.modules() if isinstance(m, LoRAParam)]
    assert layers and all(m.lora_A["default"].weight.grad.abs().sum() > 0 for m in layers)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_expert_parameters_are_the_3d_stacks_and_routers_are_listed_apart():
    model = tiny("gpt_oss")  # is_transposed: [E, in, out]
    assert expert_parameters(model) == [(f"model.layers.{i}.mlp.experts", n)
                                        for i in range(2) for n in ("gate_up_proj", "down_proj")]
    assert router_parameters(model) == [(f"model.layers.{i}.mlp.router", "weight") for i in range(2)]


def test_unknown_target_parameter_is_refused_with_the_names_there_are():
    with pytest.raises(ConfigError, match=r"matches no parameter.*experts\.gate_up_proj"):
        prepare_model(tiny("olmoe"), MethodConfig(name="lora", lora={"target_parameters": ["experts.w1"]}))


def test_dora_on_experts_is_refused_by_name():
    with pytest.raises(ConfigError, match="use_dora.*target_parameters: \\[\\]"):
        prepare_model(tiny("mixtral"), MethodConfig(name="lora", lora={"use_dora": True}))


def test_adapter_for_other_experts_is_refused_before_the_model_changes(tmp_path):
    base = tiny("mixtral")
    _, out = peft_adapter(base, tmp_path / "p", target_modules=["q_proj"], target_parameters=["experts.down_proj"])
    config = json.loads((out / "adapter_config.json").read_text())
    config["r"] = 1  # the weights are r=2 per expert
    (out / "adapter_config.json").write_text(json.dumps(config))
    model = copy.deepcopy(base)
    with pytest.raises(ModelError, match=r"experts.*needs \[4, 32\] at r=1|rank"):
        load_adapter(model, out)
    assert not lora_layers(model)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_expert_lora_on_4bit_stacks_equals_it_on_the_dequantized_weights(family):
    quantized, dense = tiny(family), tiny(family)
    for path in expert_targets(quantized):
        layer = Experts4bit.from_module(quantized.get_submodule(path))
        set_submodule(quantized, path, layer)
        with torch.no_grad():
            for name in layer.stacks:
                getattr(dense.get_submodule(path), name).copy_(layer.dense(name))
    for model in (quantized, dense):
        torch.manual_seed(7)
        prepare_model(model, MethodConfig(name="lora", lora={
            "r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj"],
            "target_parameters": ["experts.gate_up_proj", "experts.down_proj"]}))
        randomize_b(model)
    layers = [m for m in quantized.modules() if isinstance(m, LoRAParam)]
    assert layers and all(m.lora_A["default"].weight.dtype == torch.float32 for m in layers)
    torch.testing.assert_close(logits(quantized), logits(dense), atol=1e-6, rtol=0)
    quantized.train()
    quantized(ids(), labels=ids()).loss.backward()
    assert all(m.lora_A["default"].weight.grad.abs().sum() > 0 for m in layers)
    with pytest.raises(ModelError, match="4-bit expert weights"):
        merge_lora(quantized)


def test_qlora_on_moe_quantizes_the_experts_and_adapts_them():
    model = tiny("mixtral")
    summary = prepare_model(model, MethodConfig(name="qlora", lora={"r": 2, "alpha": 4}))
    assert isinstance(model.model.layers[0].self_attn.q_proj.base_layer, Linear4bit)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, LoRAParam) and isinstance(unwrap_params(experts), Experts4bit)
    assert not list(unwrap_params(experts).base_layer.parameters())  # the 16/32-bit stacks are gone
    reference = copy.deepcopy(tiny("mixtral"))
    prepare_model(reference, MethodConfig(name="lora", lora={"r": 2, "alpha": 4}))
    assert summary.split("||")[1] == format_trainable(reference).split("||")[1]  # all params: the same count
    assert torch.isfinite(logits(model)).all()


def test_row_adapters_run_an_expert_adapter_only_when_every_row_runs_it():
    from tuneforge.methods.lora import row_adapters

    model = tiny("olmoe")
    prepare_model(model, MethodConfig(name="lora", lora={"r": 2, "alpha": 4, "dropout": 0.0}))
    randomize_b(model)
    model.eval()
    active = logits(model)
    with row_adapters(model, ["default", "default"]):
        assert torch.equal(logits(model), active)
    with row_adapters(model, ["default", None]), pytest.raises(ModelError, match="routed across batch rows"):
        logits(model)


def test_transformers4_per_expert_adapter_is_refused_with_the_fix(tmp_path):
    from safetensors.torch import save_file

    out = tmp_path / "v4"
    out.mkdir()
    key = "base_model.model.model.layers.0.block_sparse_moe.experts.0.w1"
    save_file({f"{key}.lora_A.weight": torch.zeros(2, 32), f"{key}.lora_B.weight": torch.zeros(64, 2)},
              str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                         "target_modules": ["w1"]}))
    with pytest.raises(ModelError, match="made on transformers 4.*save_pretrained it again"):
        load_adapter(tiny("mixtral"), out)
