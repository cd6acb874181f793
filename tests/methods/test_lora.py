"""LoRALinear math, injection into a tiny Llama, merge/unmerge and parameter counting."""

import copy
import math
import re

import pytest
import torch
from torch import nn

from lora_helpers import randomize_b
from tuneforge.errors import ConfigError, ModelError
from tuneforge.methods.lora import (
    LoRALinear,
    apply_lora,
    count_parameters,
    find_target_modules,
    format_trainable,
    lora_layers,
    lora_state_dict,
    merge_lora,
    set_active_adapters,
    unmerge_lora,
    unwrap_lora,
)

PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}




def logits(model: nn.Module, vocab: int) -> torch.Tensor:
    ids = torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_is_base_plus_scaled_ba(use_rslora):
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = LoRALinear(copy.deepcopy(base), r=4, alpha=8, use_rslora=use_rslora)
    nn.init.normal_(layer.lora_B["default"].weight)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scale = 8 / math.sqrt(4) if use_rslora else 8 / 4
    assert layer.scaling["default"] == scale
    x = torch.randn(3, 5, 16)
    expected = base(x) + scale * (x @ a.T @ b.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-5)


def test_init_b_zero_a_kaiming_output_unchanged():
    torch.manual_seed(0)
    base = nn.Linear(32, 8)
    layer = LoRALinear(copy.deepcopy(base), r=4, alpha=16)
    a = layer.lora_A["default"].weight
    assert a.shape == (4, 32) and layer.lora_B["default"].weight.shape == (8, 4)
    assert torch.all(layer.lora_B["default"].weight == 0)
    assert a.abs().max() <= 1 / math.sqrt(32) and a.std() > 0  # kaiming-uniform(a=√5) bound
    x = torch.randn(4, 32)
    assert torch.equal(layer(x), base(x))
    assert not layer.base_layer.weight.requires_grad


def test_forward_keeps_low_precision_dtype():
    layer = LoRALinear(nn.Linear(8, 8).to(torch.bfloat16), r=2, alpha=4)
    assert layer.lora_A["default"].weight.dtype == torch.float32  # adapters stay fp32
    assert layer(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_apply_lora_all_linear_excludes_head_and_trains_only_lora(tiny_model, tiny_tokenizer):
    before = logits(tiny_model, len(tiny_tokenizer))
    names = apply_lora(tiny_model, r=4, alpha=8)
    assert len(names) == 2 * len(PROJECTIONS)
    assert {n.rsplit(".", 1)[-1] for n in names} == PROJECTIONS
    assert "lm_head" not in names and not isinstance(tiny_model.lm_head, LoRALinear)
    assert isinstance(tiny_model.get_submodule("model.layers.0.self_attn.q_proj"), LoRALinear)
    trainable = [n for n, p in tiny_model.named_parameters() if p.requires_grad]
    assert trainable and all(re.search(r"\.lora_[AB]\.default\.weight$", n) for n in trainable)
    expected = sum(4 * (m.in_features + m.out_features) for m in lora_layers(tiny_model).values())
    assert count_parameters(tiny_model)[0] == expected
    torch.testing.assert_close(logits(tiny_model, len(tiny_tokenizer)), before, atol=0, rtol=0)


def test_target_suffixes_and_unknown_name(tiny_model):
    assert find_target_modules(tiny_model, ["q_proj", "v_proj"]) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
    ]
    assert find_target_modules(tiny_model, r".*\.1\.mlp\.down_proj") == ["model.layers.1.mlp.down_proj"]
    with pytest.raises(ConfigError, match=r"qproj.*'q_proj'"):
        find_target_modules(tiny_model, ["qproj"])


@pytest.mark.parametrize("kwargs", [{"r": 0}, {"alpha": 0}, {"dropout": 1.0}, {"dropout": -0.1}])
def test_apply_lora_rejects_bad_hyperparameters(tiny_model, kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        apply_lora(tiny_model, **kwargs)
    assert not lora_layers(tiny_model)


def test_merge_unmerge_round_trip(tiny_model, tiny_tokenizer):
    vocab = len(tiny_tokenizer)
    apply_lora(tiny_model, r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    randomize_b(tiny_model)
    q = tiny_model.get_submodule("model.layers.0.self_attn.q_proj")
    w0 = q.base_layer.weight.detach().clone()
    unmerged = logits(tiny_model, vocab)
    merge_lora(tiny_model)
    assert q.merged_adapters == ["default"]
    torch.testing.assert_close(q.base_layer.weight - w0, q.delta_weight("default"))
    torch.testing.assert_close(logits(tiny_model, vocab), unmerged, atol=1e-5, rtol=0)
    unmerge_lora(tiny_model)
    assert (q.base_layer.weight - w0).abs().max() < 1e-6
    torch.testing.assert_close(logits(tiny_model, vocab), unmerged, atol=1e-5, rtol=0)


def test_unwrap_after_merge_gives_plain_linears(tiny_model, tiny_tokenizer):
    vocab = len(tiny_tokenizer)
    apply_lora(tiny_model, r=2, alpha=4)
    randomize_b(tiny_model)
    adapted = logits(tiny_model, vocab)
    merge_lora(tiny_model)
    assert len(unwrap_lora(tiny_model)) == 14
    assert not lora_layers(tiny_model)
    assert type(tiny_model.get_submodule("model.layers.1.mlp.up_proj")) is nn.Linear
    torch.testing.assert_close(logits(tiny_model, vocab), adapted, atol=1e-5, rtol=0)


def test_merge_into_tied_head_is_refused(tiny_model):
    apply_lora(tiny_model, r=2, alpha=4, target_modules=["lm_head"])
    with pytest.raises(ModelError, match="tied"):
        merge_lora(tiny_model)


def test_two_adapters_stack_and_train_separately(tiny_model, tiny_tokenizer):
    vocab = len(tiny_tokenizer)
    base = logits(tiny_model, vocab)
    apply_lora(tiny_model, r=2, alpha=4, target_modules=["q_proj"], adapter_name="a")
    randomize_b(tiny_model, "a", seed=1)
    only_a = logits(tiny_model, vocab)
    apply_lora(tiny_model, r=2, alpha=4, target_modules=["q_proj"], adapter_name="b")
    randomize_b(tiny_model, "b", seed=2)
    trainable = [n for n, p in tiny_model.named_parameters() if p.requires_grad]
    assert trainable and all(".b." in n for n in trainable)
    only_b = logits(tiny_model, vocab)
    set_active_adapters(tiny_model, ["a"])
    torch.testing.assert_close(logits(tiny_model, vocab), only_a)
    set_active_adapters(tiny_model, ["a", "b"])
    both = logits(tiny_model, vocab)
    assert not torch.allclose(both, only_a) and not torch.allclose(both, only_b)
    # Each delta is linear in its own B: a+b on one layer is the sum of the single deltas there.
    q = tiny_model.get_submodule("model.layers.0.self_attn.q_proj")
    x = torch.randn(3, q.in_features)
    set_active_adapters(tiny_model, [])
    y0 = q(x)
    torch.testing.assert_close(y0, q.base_layer(x))
    set_active_adapters(tiny_model, ["a", "b"])
    ya_b = q(x)
    set_active_adapters(tiny_model, ["a"])
    ya = q(x)
    set_active_adapters(tiny_model, ["b"])
    torch.testing.assert_close(ya_b - y0, (ya - y0) + (q(x) - y0), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(base, only_a)
    with pytest.raises(ModelError, match="already has a LoRA adapter"):
        apply_lora(tiny_model, target_modules=["q_proj"], adapter_name="a")
    with pytest.raises(ModelError, match="'c'"):
        set_active_adapters(tiny_model, ["c"])


def test_lora_state_dict_and_format(tiny_model):
    apply_lora(tiny_model, r=4, alpha=8, target_modules=["q_proj"])
    sd = lora_state_dict(tiny_model)
    assert set(sd) == {f"model.layers.{i}.self_attn.q_proj.lora_{p}.weight" for i in (0, 1) for p in "AB"}
    assert sd["model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
    trainable, total = count_parameters(tiny_model)
    assert trainable == 2 * 4 * (64 + 64)
    text = format_trainable(tiny_model)
    assert text == (f"trainable params: {trainable:,} || all params: {total:,} || "
                    f"trainable%: {100 * trainable / total:.4f}")
    assert "," in text.split("all params: ")[1]
