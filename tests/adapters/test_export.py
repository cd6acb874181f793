"""Merge/unmerge round trip, and merged exports that transformers loads with the same logits."""

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from tuneforge.adapters.export import export_merged, merge_and_unload, merge_roundtrip_error
from tuneforge.errors import ModelError
from tuneforge.methods.lora import apply_lora, lora_layers, merge_lora
from tuneforge.methods.peft_format import load_adapter, save_adapter


def randomize_b(model: nn.Module, seed: int = 1) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B["default"].weight.normal_(0, 0.2)


def logits(model: nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 400, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merge_roundtrip_error_fp32(tiny_model):
    apply_lora(tiny_model, r=4, alpha=8)
    randomize_b(tiny_model)
    before = logits(tiny_model)
    error = merge_roundtrip_error(tiny_model)
    assert error < 1e-5
    torch.testing.assert_close(logits(tiny_model), before, atol=1e-5, rtol=0)
    assert all(not layer.merged_adapters for layer in lora_layers(tiny_model).values())


def test_merge_and_unload_gives_the_adapted_logits(tiny_model):
    apply_lora(tiny_model, r=4, alpha=8, target_modules=["q_proj", "lm_head"])
    randomize_b(tiny_model)
    embed = tiny_model.get_input_embeddings().weight.detach().clone()
    adapted = logits(tiny_model)
    with pytest.raises(ModelError, match="tied to the input embeddings"):
        merge_lora(copy.deepcopy(tiny_model))  # the low-level merge refuses a tied head ...
    merge_and_unload(tiny_model)  # ... the export unties it first
    assert not lora_layers(tiny_model) and not tiny_model.config.tie_word_embeddings
    torch.testing.assert_close(tiny_model.get_input_embeddings().weight, embed, rtol=0, atol=0)
    torch.testing.assert_close(logits(tiny_model), adapted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "down_proj", "lm_head"]])
def test_export_merged_loads_in_transformers_with_the_same_logits(tiny_model, tiny_model_dir, tmp_path, targets):
    model = copy.deepcopy(tiny_model)
    apply_lora(model, r=4, alpha=8, target_modules=targets)
    randomize_b(model)
    adapter = save_adapter(model, tmp_path / "adapter")
    reference = copy.deepcopy(tiny_model)  # base + adapter, unmerged
    load_adapter(reference, adapter)
    out = export_merged(str(tiny_model_dir), adapter, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(logits(merged), logits(reference), atol=1e-5, rtol=0)
    assert (out / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(out)
    eos = GenerationConfig.from_pretrained(out).eos_token_id
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])
    if "lm_head" in targets:  # untied on export, embeddings unchanged
        assert merged.lm_head.weight.data_ptr() != merged.get_input_embeddings().weight.data_ptr()
        torch.testing.assert_close(merged.get_input_embeddings().weight, tiny_model.get_input_embeddings().weight)


def test_export_refuses_a_non_empty_out_and_a_foreign_adapter(tiny_model, tiny_model_dir, tmp_path):
    model = copy.deepcopy(tiny_model)
    apply_lora(model, r=2, alpha=4)
    adapter = save_adapter(model, tmp_path / "adapter")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(ModelError, match="not empty"):
        export_merged(str(tiny_model_dir), adapter, tmp_path / "full")
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    assert export_merged(str(tiny_model_dir), adapter, tmp_path / "full", overwrite=True) == tmp_path / "full"
    assert not (tmp_path / "full" / "x").exists()
    config = copy.deepcopy(tiny_model.config)
    config.hidden_size, config.intermediate_size = 32, 48
    other = type(tiny_model)(config)
    apply_lora(other, r=2, alpha=4)
    with pytest.raises(ModelError, match="different base model"):
        export_merged(str(tiny_model_dir), save_adapter(other, tmp_path / "other"), tmp_path / "m2")
    assert not (tmp_path / "m2").exists()
