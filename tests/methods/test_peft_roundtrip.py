"""Every peft LoraConfig tuneforge supports gives peft's logits both ways; every other one is refused by name.

peft-made → tuneforge: peft builds the adapter (random non-zero weights), saves it, and our loader must give
peft's logits. tuneforge-made → peft: we build the same kind of adapter, save it, and peft must give ours.
fp32, a tiny random Llama; a difference of 1e-5 is rounding, a wrong feature is > 1e-2.
"""

import copy
import json
import re
import warnings

import pytest
import torch
from torch import nn

from tuneforge.adapters.combine import combine_adapters
from tuneforge.errors import ModelError
from tuneforge.methods.lora import add_lora, apply_lora, lora_layers, merge_lora, unmerge_lora
from tuneforge.methods.peft_format import load_adapter, save_adapter

peft = pytest.importorskip("peft")

TOL = 1e-5


def logits(model: nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 400, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


def randomize(model: nn.Module, seed: int = 3) -> None:
    """Random shifts of A, B and DoRA magnitudes, so every part of the adapter shows in the logits (even where
    an init leaves A or B zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(part in name for part in ("lora_A", "lora_B", "lora_magnitude_vector")):  # lora_B.bias too
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)


def peft_made(base: nn.Module, out, **config) -> torch.Tensor:
    """Save a peft adapter of ``config`` into ``out``; return peft's logits."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns about e.g. unused exclude_modules: not what is tested
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(task_type="CAUSAL_LM", **config))
        randomize(model)
        model.save_pretrained(str(out))
    return logits(model.eval())


def peft_logits(base: nn.Module, adapter_dir) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir)).eval())


SUPPORTED = {
    "default": {"target_modules": ["q_proj", "v_proj"]},
    "all-linear, rsLoRA": {"target_modules": "all-linear", "use_rslora": True, "lora_alpha": 16},
    "regex targets": {"target_modules": r".*layers\.1\.(self_attn\.k_proj|mlp\.up_proj)"},
    "exclude_modules list": {"target_modules": "all-linear", "exclude_modules": ["down_proj", "o_proj"]},
    "exclude_modules regex": {"target_modules": ["q_proj", "v_proj"], "exclude_modules": r".*\.0\.self_attn\.v_proj"},
    "layers_to_transform": {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": [1]},
    "layers_to_transform int, layers_pattern": {"target_modules": ["q_proj"], "layers_to_transform": 0,
                                                "layers_pattern": "layers"},
    "rank/alpha patterns: suffix, regex, full name": {
        "target_modules": ["q_proj", "k_proj", "v_proj", "gate_proj"], "rank_pattern": {
            "k_proj": 2, r"layers\.1\.mlp\..*": 6, "model.layers.0.self_attn.q_proj": 3},
        "alpha_pattern": {"^model.layers.1.self_attn.v_proj": 32, "q_proj": 4}},
    "rank_pattern first key wins": {"target_modules": ["q_proj"], "rank_pattern": {r"layers\.1\..*": 6, "q_proj": 2}},
    "init gaussian": {"target_modules": ["q_proj"], "init_lora_weights": "gaussian"},
    "init false": {"target_modules": ["v_proj"], "init_lora_weights": False},
    "init orthogonal": {"target_modules": ["q_proj"], "init_lora_weights": "orthogonal"},
    "init mica": {"target_modules": ["q_proj"], "init_lora_weights": "mica"},
    "dropout": {"target_modules": ["q_proj"], "lora_dropout": 0.1},
    "DoRA": {"target_modules": "all-linear", "use_dora": True},
    "lora_bias": {"target_modules": ["q_proj", "down_proj"], "lora_bias": True},
    "DoRA, rsLoRA, rank_pattern": {"target_modules": ["q_proj", "down_proj"], "use_dora": True, "use_rslora": True,
                                   "rank_pattern": {"down_proj": 2}},
}


@pytest.mark.parametrize("config", SUPPORTED.values(), ids=SUPPORTED.keys())
def test_peft_made_adapter_gives_peft_logits(tiny_model, tmp_path, config):
    config = {"r": 4, "lora_alpha": 8} | config
    expected = peft_made(tiny_model, tmp_path / "a", **config)
    ours = copy.deepcopy(tiny_model)
    load_adapter(ours, tmp_path / "a")
    assert (logits(ours) - expected).abs().max() < TOL
    assert (logits(tiny_model) - expected).abs().max() > 1e-2  # the adapter matters


OURS = {
    "default": {"target_modules": ["q_proj", "v_proj"]},
    "all-linear, rsLoRA": {"target_modules": "all-linear", "use_rslora": True},
    "DoRA": {"target_modules": "all-linear", "use_dora": True},
    "DoRA, rsLoRA": {"target_modules": ["k_proj", "up_proj"], "use_dora": True, "use_rslora": True},
}


@pytest.mark.parametrize("config", OURS.values(), ids=OURS.keys())
def test_tuneforge_made_adapter_gives_our_logits_in_peft(tiny_model, tmp_path, config):
    ours = copy.deepcopy(tiny_model)
    apply_lora(ours, r=4, alpha=8, **config)
    randomize(ours)
    out = save_adapter(ours, tmp_path / "a")
    assert (peft_logits(tiny_model, out) - logits(ours)).abs().max() < TOL


@pytest.mark.parametrize("kind", ["use_dora", "lora_bias"])
def test_tuneforge_made_per_module_ranks_alphas_dora_and_bias_in_peft(tiny_model, tmp_path, kind):
    ours = copy.deepcopy(tiny_model)
    paths = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    add_lora(ours, paths, "default", r={p: 2 if "down" in p else 4 for p in paths},
             alpha={p: 16 if ".1.self" in p else 8 for p in paths}, **{kind: True})
    randomize(ours)
    out = save_adapter(ours, tmp_path / "a")
    assert (peft_logits(tiny_model, out) - logits(ours)).abs().max() < TOL


def test_converted_olora_loads_and_unconverted_is_refused(tiny_model, tmp_path):
    """The issue's case: OLoRA rewrites the base weights. peft's conversion makes a plain adapter of the
    original base, which loads exactly; the unconverted one is refused with that fix, never loaded wrong."""
    model = peft.get_peft_model(copy.deepcopy(tiny_model), peft.LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="olora"))
    model.save_pretrained(str(tmp_path / "init"))
    randomize(model)  # "training"
    model.save_pretrained(str(tmp_path / "raw"))
    model.save_pretrained(str(tmp_path / "converted"),
                          path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    ours = copy.deepcopy(tiny_model)
    with pytest.raises(ModelError, match="init_lora_weights='olora' rewrote the base model's weights.*"
                                         "path_initial_model_for_weight_conversion"):
        load_adapter(ours, tmp_path / "raw")
    assert not lora_layers(ours)
    load_adapter(ours, tmp_path / "converted")
    expected = peft_logits(tiny_model, tmp_path / "converted")
    assert (logits(ours) - expected).abs().max() < TOL
    assert (logits(model.eval()) - expected).abs().max() < 1e-4  # the conversion itself is exact


REFUSED = {
    "init_lora_weights": ["pissa", "pissa_niter_4", "corda", "loftq", "lora_ga", "olora", "kaiming"],
    "modules_to_save": [["lm_head"]],
    "trainable_token_indices": [[1, 2]],
    "layer_replication": [[[0, 2], [1, 2]]],
    "alora_invocation_tokens": [[5, 6]],
    "use_qalora": [True],
    "use_bdlora": [{"nblocks": 2}],
    "arrow_config": [{"top_k": 2}],
    "kasa_config": [{"beta": 1.0}],
    "velora_config": [{"num_groups": 2}],
    "monteclora_config": [{"num_samples": 2}],
    "megatron_config": [{"tensor_model_parallel_size": 2}],
    "bias": ["all", "lora_only"],
}


@pytest.mark.parametrize("key, value", [(k, v) for k, vs in REFUSED.items() for v in vs])
def test_unsupported_config_fields_are_refused_by_name(tiny_model, tmp_path, key, value):
    ours = copy.deepcopy(tiny_model)
    apply_lora(ours, r=4, alpha=8, target_modules=["q_proj"])
    out = save_adapter(ours, tmp_path / "a")
    path = out / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {key: value}))
    fresh = copy.deepcopy(tiny_model)
    with pytest.raises(ModelError) as e:
        load_adapter(fresh, out)
    assert str(e.value).startswith(f"{path}: {key}={value!r}")
    assert not lora_layers(fresh)


def test_peft_made_unsupported_adapters_are_refused(tiny_model, tmp_path):
    """Real peft output, not an edited file: the fields are found where peft writes them."""
    for name, config in {"pissa": {"init_lora_weights": "pissa"}, "modules_to_save": {"modules_to_save": ["lm_head"]},
                         "trainable_token_indices": {"trainable_token_indices": [1, 2]}}.items():
        peft_made(tiny_model, tmp_path / name, r=4, lora_alpha=8, target_modules=["q_proj"], **config)
        with pytest.raises(ModelError, match=name):
            load_adapter(copy.deepcopy(tiny_model), tmp_path / name)


def test_weights_outside_layers_to_transform_are_refused(tiny_model, tmp_path):
    """peft would ignore weights of a layer its config does not select; loading them would differ from peft."""
    ours = copy.deepcopy(tiny_model)
    apply_lora(ours, r=4, alpha=8, target_modules=["q_proj"])
    out = save_adapter(ours, tmp_path / "a")
    path = out / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"layers_to_transform": [1]}))
    with pytest.raises(ModelError, match=r"layers.0.self_attn.q_proj is not selected by target_modules=\['q_proj'\] "
                                         r"in adapter_config.json, layers_to_transform=\[1\]"):
        load_adapter(copy.deepcopy(tiny_model), out)


def test_rank_pattern_peft_cannot_reload_is_refused_with_the_reason(tiny_model, tmp_path):
    """peft writes rank_pattern with sorted keys, so a first-match order that sorting changes gives a file whose
    ranks do not fit its weights (peft itself fails to reload it): refused, saying why."""
    peft_made(tiny_model, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"],
              rank_pattern={"q_proj": 2, r"layers\.1\..*": 6})
    with pytest.raises(ModelError, match=r"layers.1.self_attn.q_proj: adapter_config.json gives rank 6 but the "
                                         r"weights have rank 2.*first match wins"):
        load_adapter(copy.deepcopy(tiny_model), tmp_path / "a")


@pytest.mark.parametrize("init", ["eva", "orthogonal", "gaussian", False, "mica"])
def test_inits_that_keep_the_base_load_as_saved(tiny_model, tmp_path, init):
    """These inits only choose the starting A and B; peft loads the saved weights over them, and so do we."""
    ours = copy.deepcopy(tiny_model)
    apply_lora(ours, r=4, alpha=8, target_modules=["q_proj", "up_proj"])
    randomize(ours)
    out = save_adapter(ours, tmp_path / "a")
    path = out / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"init_lora_weights": init}))
    again = copy.deepcopy(tiny_model)
    load_adapter(again, out)
    assert (logits(again) - logits(ours)).abs().max() == 0
    assert (peft_logits(tiny_model, out) - logits(ours)).abs().max() < TOL


def test_lora_bias_merges_into_the_base_bias_as_peft(tmp_path):
    from conftest import build_tiny_model

    base = build_tiny_model(400)
    base.config.attention_bias = True
    base = type(base)(base.config).eval()  # q/k/v/o with biases
    expected = peft_made(base, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"],
                         lora_bias=True)
    ours = copy.deepcopy(base)
    load_adapter(ours, tmp_path / "a")
    bias = ours.get_submodule("model.layers.0.self_attn.q_proj").bias.clone()
    merge_lora(ours)
    assert (logits(ours) - expected).abs().max() < TOL
    unmerge_lora(ours)
    torch.testing.assert_close(ours.get_submodule("model.layers.0.self_attn.q_proj").bias, bias, atol=1e-7, rtol=0)
    with pytest.raises(ModelError, match="lora_bias=true: its bias on lora_B is not a low-rank delta"):
        combine_adapters([tmp_path / "a"], None, tmp_path / "c")


@pytest.mark.parametrize("change, message", [
    ({"target_modules": "all-linear", "layers_to_transform": [1]}, "layers_to_transform=[1]; it works with a list"),
    ({"target_modules": ".*q_proj", "layers_to_transform": 0}, "layers_to_transform=0; it works with a list"),
    ({"layers_pattern": "layers"}, "layers_pattern='layers'; it needs layers_to_transform"),
])
def test_configs_peft_itself_refuses_are_refused(tiny_model, tmp_path, change, message):
    ours = copy.deepcopy(tiny_model)
    apply_lora(ours, r=4, alpha=8, target_modules=["q_proj"])
    out = save_adapter(ours, tmp_path / "a")
    path = out / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | change))
    with pytest.raises(ModelError, match=re.escape(message)):
        load_adapter(copy.deepcopy(tiny_model), out)
