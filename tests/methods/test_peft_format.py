"""PEFT adapter directories: interop with peft both ways, and clear errors for bad directories."""

import copy
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaForCausalLM

from lora_helpers import randomize_b
from tuneforge.errors import ModelError
from tuneforge.methods.lora import add_lora, apply_lora, lora_layers
from tuneforge.methods.peft_format import load_adapter, read_adapter_config, save_adapter

peft = pytest.importorskip("peft")




def logits(model: nn.Module, vocab: int = 400) -> torch.Tensor:
    ids = torch.randint(0, vocab, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


def peft_adapter(base: nn.Module, out, **config) -> torch.Tensor:
    """Save a peft-made adapter with random B into ``out``; return peft's logits."""
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(task_type="CAUSAL_LM", **config))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    model.save_pretrained(str(out))
    return logits(model.eval())


def variant(model: nn.Module, **changes) -> nn.Module:
    """A different tiny base model (same family, other shapes)."""
    config = copy.deepcopy(model.config)
    for key, value in changes.items():
        setattr(config, key, value)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def saved(tiny_model, tmp_path):
    """(base copy, adapter dir, adapted logits) for a q/v adapter of the tiny model."""
    base = copy.deepcopy(tiny_model)
    apply_lora(tiny_model, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    randomize_b(tiny_model)
    return base, save_adapter(tiny_model, tmp_path / "adapter"), logits(tiny_model)


@pytest.mark.parametrize("target, use_rslora", [("all-linear", False), (["q_proj", "v_proj"], True)])
def test_peft_loads_our_adapter_with_same_logits(tiny_model, tmp_path, target, use_rslora):
    base = copy.deepcopy(tiny_model)
    plain = logits(base)
    apply_lora(tiny_model, r=4, alpha=8, dropout=0.1, target_modules=target, use_rslora=use_rslora)
    randomize_b(tiny_model)
    ours = logits(tiny_model.eval())
    out = save_adapter(tiny_model, tmp_path / "adapter", base_model_name_or_path="tiny")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "tuneforge.json"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["use_rslora"] is use_rslora and config["lora_dropout"] == 0.1
    expected = ["q_proj", "v_proj"] if use_rslora else sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert config["target_modules"] == expected
    tensors = load_file(out / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
    assert tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].shape == (32, 4)
    theirs = logits(peft.PeftModel.from_pretrained(base, str(out)).eval())
    assert not torch.allclose(ours, plain)  # the adapter matters
    assert (theirs - ours).abs().max() < 1e-5


def test_peft_loads_per_module_ranks_and_subset_of_layers(tiny_model, tmp_path):
    base = copy.deepcopy(tiny_model)
    paths = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    add_lora(tiny_model, paths, "default", r={p: 2 if "q_proj" in p else 4 for p in paths},
             alpha={p: 16 if p.endswith("1.mlp.up_proj") else 8 for p in paths})
    randomize_b(tiny_model)
    ours = logits(tiny_model)
    out = save_adapter(tiny_model, tmp_path / "a")
    config = read_adapter_config(out)
    assert config["r"] == 4 and len(config["rank_pattern"]) == 1 and len(config["alpha_pattern"]) == 1
    assert config["target_modules"] == sorted(paths)  # suffixes would also select layer 1's q_proj
    fresh = copy.deepcopy(base)
    theirs = logits(peft.PeftModel.from_pretrained(base, str(out)).eval())
    assert (theirs - ours).abs().max() < 1e-5
    load_adapter(fresh, out)  # ... and our own loader reads the same thing back
    assert fresh.get_submodule("model.layers.1.mlp.up_proj").scaling["default"] == 16 / 4
    assert fresh.get_submodule("model.layers.0.self_attn.q_proj").r["default"] == 2
    assert (logits(fresh) - ours).abs().max() < 1e-6


@pytest.mark.parametrize("config", [
    {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
    {"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "down_proj"], "use_rslora": True},
    {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj"], "rank_pattern": {"k_proj": 2},
     "alpha_pattern": {r"layers\.1\.self_attn\.q_proj": 32}},
])
def test_we_load_peft_adapter_with_peft_logits(tiny_model, tmp_path, config):
    base = copy.deepcopy(tiny_model)
    expected = peft_adapter(base, tmp_path / "peft", **config)
    names = load_adapter(tiny_model, tmp_path / "peft")
    assert names and all(not p.requires_grad for n, p in tiny_model.named_parameters() if "lora_" in n)
    assert (logits(tiny_model) - expected).abs().max() < 1e-5
    assert not torch.allclose(expected, logits(base))


def test_our_round_trip_and_trainable_flag(saved, tmp_path):
    base, out, adapted = saved
    names = load_adapter(base, out, adapter_name="mine", trainable=True)
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    layer = base.get_submodule("model.layers.1.self_attn.v_proj")
    assert layer.r["mine"] == 4 and layer.lora_alpha["mine"] == 8 and layer.active_adapters == ["mine"]
    assert layer.lora_B["mine"].weight.requires_grad
    torch.testing.assert_close(logits(base), adapted, atol=1e-6, rtol=0)
    with pytest.raises(ModelError, match="already has an adapter named 'mine'"):
        load_adapter(base, out, adapter_name="mine")


def test_save_replaces_atomically_and_keeps_foreign_dirs(saved, tiny_model, tmp_path):
    _, out, _ = saved
    first = (out / "adapter_model.safetensors").read_bytes()
    randomize_b(tiny_model, seed=7)
    save_adapter(tiny_model, out)
    assert (out / "adapter_model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp or backup dirs left
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ModelError, match="metrics.jsonl"):
        save_adapter(tiny_model, tmp_path / "run")
    assert (tmp_path / "run" / "metrics.jsonl").exists()
    with pytest.raises(ModelError, match="no LoRA layers with that name"):
        save_adapter(tiny_model, tmp_path / "x", adapter_name="other")


def test_missing_dir_and_files(tiny_model, tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_adapter(tiny_model, tmp_path / "nope")
    with pytest.raises(ModelError, match="adapter_config.json is missing"):
        load_adapter(tiny_model, tmp_path)


def test_corrupt_files(saved):
    base, out, _ = saved
    weights = out / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelError, match="adapter_model.safetensors is not a valid safetensors"):
        load_adapter(base, out)
    (out / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4,')
    with pytest.raises(ModelError, match="adapter_config.json is not valid JSON"):
        load_adapter(base, out)
    assert not lora_layers(base)


def test_pickle_is_refused(saved):
    base, out, _ = saved
    (out / "adapter_model.safetensors").unlink()
    (out / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(ModelError, match="never unpickles.*safetensors"):
        load_adapter(base, out)


@pytest.mark.parametrize("changes, message", [
    ({"intermediate_size": 96}, re.escape(
        "adapter was trained on a different base model: base_model.model.model.layers.0.mlp.down_proj"
        ".lora_A.weight has shape [4, 128], the model's module has weight [64, 96] (needs [4, 96])")),
    ({"num_hidden_layers": 1}, r"different base model: .*layers.1.* not a Linear layer"),
    ({"num_hidden_layers": 3}, r"no weights for \['model.layers.2"),
])
def test_different_base_model(tiny_model, tmp_path, changes, message):
    apply_lora(tiny_model, r=4, alpha=8)
    out = save_adapter(tiny_model, tmp_path / "a")
    other = variant(tiny_model, **changes)
    with pytest.raises(ModelError, match=message):
        load_adapter(other, out)
    assert not lora_layers(other)  # nothing injected when the check fails


def test_config_and_weights_disagree(saved):
    base, out, _ = saved
    path = out / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(ModelError, match="rank 8 but the weights have rank 4"):
        load_adapter(base, out)
    path.write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ModelError, match="use_dora"):
        load_adapter(base, out)
    path.write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(ModelError, match="LoRA adapters only"):
        load_adapter(base, out)
    path.write_text(json.dumps(config))
    weights = load_file(out / "adapter_model.safetensors")
    weights["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(4, 400)
    save_file(weights, out / "adapter_model.safetensors")
    with pytest.raises(ModelError, match="unexpected key .*lora_embedding_A"):
        load_adapter(base, out)


def test_loaded_adapter_follows_the_models_eval_mode(tiny_model, tmp_path):
    base = copy.deepcopy(tiny_model)
    apply_lora(tiny_model, r=4, alpha=8, dropout=0.5)
    randomize_b(tiny_model)
    out = save_adapter(tiny_model, tmp_path / "adapter")
    load_adapter(base.eval(), out)
    torch.testing.assert_close(logits(base), logits(base), atol=0, rtol=0)  # no dropout noise in eval mode
    torch.testing.assert_close(logits(base), logits(tiny_model.eval()), atol=1e-5, rtol=0)


Q_KEY = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("change, message", [
    ({"target_modules": 5}, "target_modules=5; give a list"),
    ({"target_modules": ["q_proj", 1]}, "target_modules=['q_proj', 1]; give a list"),
    ({"target_modules": "q_proj("}, "target_modules='q_proj('; a string is a regex and this one is invalid"),
    ({"rank_pattern": 5}, "rank_pattern=5; give an object"),
    ({"alpha_pattern": ["q_proj"]}, "alpha_pattern=['q_proj']; give an object"),
    ({"rank_pattern": {"q_proj": "4"}}, "the value of 'q_proj' is '4'; give positive integer ranks"),
    ({"rank_pattern": {"q_proj(": 4}}, "the key 'q_proj(' is not a valid regex"),
    ({"alpha_pattern": {"v_proj": -1}}, "the value of 'v_proj' is -1; give alphas > 0"),
    ({"r": "4"}, "r='4'; the rank must be a positive integer"),
    ({"r": 4.0}, "r=4.0; the rank must be a positive integer"),
    ({"r": True}, "r=True; the rank must be a positive integer"),
    ({"lora_alpha": "8"}, "lora_alpha='8'; alpha must be a number > 0"),
    ({"lora_alpha": None}, "lora_alpha=None; alpha must be a number > 0"),
    ({"lora_alpha": float("nan")}, "lora_alpha=nan; alpha must be a number > 0"),
    ({"lora_dropout": "0.1"}, "lora_dropout='0.1'; dropout must be a number in [0, 1)"),
    ({"use_rslora": "false"}, "use_rslora='false'; give true or false"),
    ({"base_model_name_or_path": 5}, "base_model_name_or_path=5; give the base model's path"),
])
def test_malformed_config_names_file_key_and_fix(saved, change, message):
    base, out, _ = saved
    path = out / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | change))
    for call in (lambda: read_adapter_config(out), lambda: load_adapter(base, out)):
        with pytest.raises(ModelError) as e:  # a TypeError/IndexError would escape this and fail the test
            call()
        assert str(e.value).startswith(f"{path}: ") and message in str(e.value)
        assert "re-save or re-download the adapter" in str(e.value)
    assert not lora_layers(base)


@pytest.mark.parametrize("tensors, message", [
    ({f"{Q_KEY}.lora_A.weight": torch.tensor(1.0), f"{Q_KEY}.lora_B.weight": torch.tensor(1.0)},
     f"{Q_KEY}.lora_A.weight has shape []; LoRA weights are matrices"),
    ({f"{Q_KEY}.lora_A.weight": torch.zeros(4)}, f"{Q_KEY}.lora_A.weight has shape [4]; LoRA weights"),
    ({f"{Q_KEY}.lora_B.weight": torch.zeros(64, 4, 1)}, f"{Q_KEY}.lora_B.weight has shape [64, 4, 1]"),
    ({f"{Q_KEY}.lora_A.weight": torch.zeros(2, 64)}, f"{Q_KEY}: adapter_config.json gives rank 4 but the weights "
                                                     "have rank 2"),
    ({f"{Q_KEY}.lora_A.weight": torch.zeros(4, 64, dtype=torch.int32)}, f"{Q_KEY}.lora_A.weight has dtype"),
    ({f"{Q_KEY}.lora_A.weight": torch.zeros(4, 32)}, f"different base model: {Q_KEY}.lora_A.weight has shape [4, 32]"),
    ({"base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight": torch.zeros(4, 64),
      "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight": torch.zeros(64, 4)},
     "self_attn.k_proj is not selected by target_modules=['q_proj', 'v_proj']"),
    ({"base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64),
      "base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4)},
     "model.layers.9.self_attn.q_proj is not a Linear layer of this model; load the adapter onto the base"),
])
def test_malformed_weights_name_file_and_key(saved, tensors, message):
    base, out, _ = saved
    path = out / "adapter_model.safetensors"
    save_file(load_file(path) | tensors, path)
    with pytest.raises(ModelError) as e:
        load_adapter(base, out)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)
    assert not lora_layers(base)


def test_all_linear_adapter_with_output_head_weights_is_refused(tiny_model, tmp_path):
    apply_lora(tiny_model, r=2, alpha=4, target_modules=["q_proj", "lm_head"])
    out = save_adapter(tiny_model, tmp_path / "a")
    path = out / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"target_modules": "all-linear"}))
    other = variant(tiny_model)
    with pytest.raises(ModelError, match=r"lm_head is not selected by target_modules .*all-linear leaves out"):
        load_adapter(other, out)
