import torch

from tuneforge.config import MethodConfig
from tuneforge.methods.lora import LoRALinear
from tuneforge.methods.setup import prepare_model
from tuneforge.quant.linear4bit import Linear4bit


def test_qlora_quantizes_every_linear_but_the_head_and_wraps_it_in_lora(tiny_model):
    summary = prepare_model(tiny_model, MethodConfig(name="qlora"))
    layer = tiny_model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and isinstance(layer.base_layer, Linear4bit)
    assert isinstance(tiny_model.lm_head, torch.nn.Linear)
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert "trainable params" in summary


def test_full_and_freeze_set_what_trains(tiny_model):
    prepare_model(tiny_model, MethodConfig(name="full"))
    assert all(p.requires_grad for p in tiny_model.parameters())
    prepare_model(tiny_model, MethodConfig(name="freeze", freeze={"top_k_layers": 1}))
    assert not tiny_model.model.layers[0].mlp.up_proj.weight.requires_grad
    assert tiny_model.model.layers[1].mlp.up_proj.weight.requires_grad


def test_lora_on_the_output_head_is_refused_with_the_fix(tiny_model):
    import pytest

    from tuneforge.errors import ConfigError

    with pytest.raises(ConfigError, match="output head"):
        prepare_model(tiny_model, MethodConfig(name="lora", lora={"target_modules": ["q_proj", "lm_head"]}))


def test_a_frozen_lora_base_loads_in_bf16_on_a_gpu_only_for_lora():
    from tuneforge.methods.setup import gpu_weight_dtype

    assert gpu_weight_dtype("lora") == "bf16"
    assert gpu_weight_dtype("lora", "fp32") == "fp32"
    assert gpu_weight_dtype("full") == gpu_weight_dtype("freeze") == "fp32"


def test_the_configured_attention_reaches_every_loader(tiny_model_dir):
    from tuneforge.config import load_config
    from tuneforge.methods.setup import load_model_for

    for method in ("full", "qlora"):
        config = load_config(None, [f"model={tiny_model_dir}", f"method.name={method}", "attn_implementation=eager"])
        model = load_model_for(config, torch.device("cpu"))
        assert model.config._attn_implementation == "eager"
    config = load_config(None, [f"model={tiny_model_dir}", "attn_implementation=eager"])
    assert load_model_for(config, torch.device("cpu"), placement="meta").config._attn_implementation == "eager"


def test_qlora_with_an_fp8_base_keeps_4bit_weights_and_computes_in_fp8(tiny_model, monkeypatch):
    import pytest

    from tuneforge.errors import ConfigError
    from tuneforge.methods import setup

    method = MethodConfig(name="qlora", lora={"base_precision": "fp8"})
    with pytest.raises(ConfigError, match="method.lora.base_precision=fp8 needs a CUDA GPU"):  # no FP8 on a CPU
        prepare_model(tiny_model, method)
    # past the device check (as on an H200), the 4-bit layers switch to FP8 compute and keep their buffers
    monkeypatch.setattr(setup, "check_fp8_device", lambda device: None)
    before = {n: b.data_ptr() for n, b in tiny_model.named_buffers()}
    n = setup.to_fp8_base(tiny_model, torch.device("cpu"))
    bases = [m.base_layer for m in tiny_model.modules() if isinstance(m, LoRALinear)]
    assert n == len(bases) > 0 and all(isinstance(b, Linear4bit) and b.fp8 for b in bases)
    assert {n: b.data_ptr() for n, b in tiny_model.named_buffers()} == before


def test_lora_groups_sibling_projections_unless_switched_off(tiny_tokenizer):
    from conftest import build_tiny_model
    from tuneforge.methods.lora_groups import GROUPS

    def grouped(model) -> list[bool]:
        return [hasattr(m, GROUPS) and len(m._forward_pre_hooks) == 1
                for layer in model.model.layers for m in (layer.self_attn, layer.mlp)]

    on, off = build_tiny_model(len(tiny_tokenizer)), build_tiny_model(len(tiny_tokenizer))
    prepare_model(on, MethodConfig(name="lora"))
    prepare_model(off, MethodConfig(name="lora", lora={"group_projections": False}))
    assert grouped(on) == [True] * 4 and grouped(off) == [False] * 4
