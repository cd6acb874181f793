"""AdapterSet: one base, many adapters: load, activate, switch, stack with weights, merge, unload."""

import copy
import json

import pytest
import torch
from torch import nn

from lora_helpers import make_adapter
from tuneforge.adapters.manager import AdapterSet, adapter_info, normalize_spec, scan_adapters
from tuneforge.errors import ConfigError, ModelError
from tuneforge.methods.lora import lora_layers
from tuneforge.methods.peft_format import load_adapter


def logits(model: nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 400, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


def alone(base: nn.Module, adapter_dir) -> torch.Tensor:
    model = copy.deepcopy(base)
    load_adapter(model, adapter_dir)
    return logits(model)


@pytest.fixture
def dirs(tiny_model, tmp_path):
    return {
        "a": make_adapter(tiny_model, tmp_path / "a", ["q_proj", "v_proj"], 4, 1, base_name="tiny"),
        "b": make_adapter(tiny_model, tmp_path / "b", "all-linear", 2, 2, base_name="tiny"),
    }


@pytest.fixture
def aset(tiny_model, tiny_tokenizer, dirs):
    s = AdapterSet(copy.deepcopy(tiny_model), tiny_tokenizer, "tiny")
    for name, d in dirs.items():
        s.load(name, d)
    return s


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}


def test_switch_between_adapters_without_touching_the_base(aset, tiny_model, dirs):
    before = base_weights(aset.model)
    assert aset.active == {}  # loading does not activate
    torch.testing.assert_close(logits(aset.model), logits(tiny_model), rtol=0, atol=0)
    for name in ("a", "b", "a"):
        seconds = aset.switch(name)
        assert seconds == aset.last_switch_s and 0 <= seconds < 1
        assert aset.active == {name: 1.0}
        torch.testing.assert_close(logits(aset.model), alone(tiny_model, dirs[name]), atol=1e-6, rtol=0)
    aset.deactivate()
    torch.testing.assert_close(logits(aset.model), logits(tiny_model), rtol=0, atol=0)
    after = base_weights(aset.model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_stacked_adapters_scale_each_delta_by_its_weight(aset, tiny_model):
    aset.activate({"a": 0.5, "b": -1.5})
    expected = copy.deepcopy(tiny_model)  # base + Σ wᵢ·Δᵢ, written into the weights by hand
    with torch.no_grad():
        for name, w in aset.active.items():
            for path, layer in lora_layers(aset.model, aset.key(name)).items():
                expected.get_submodule(path).weight += w * layer.delta_weight(aset.key(name))
    torch.testing.assert_close(logits(aset.model), logits(expected), atol=1e-5, rtol=0)
    aset.activate(["a", "b"])
    assert aset.active == {"a": 1.0, "b": 1.0}


def test_merge_then_switch_unmerges(aset, tiny_model, dirs):
    before = base_weights(aset.model)
    aset.merge("a")
    assert aset.active == {"a": 1.0}
    torch.testing.assert_close(logits(aset.model), alone(tiny_model, dirs["a"]), atol=1e-5, rtol=0)
    aset.switch("b")  # must not leave a's delta in the base
    torch.testing.assert_close(logits(aset.model), alone(tiny_model, dirs["b"]), atol=1e-5, rtol=0)
    after = base_weights(aset.model)
    assert max((before[k] - after[k]).abs().max().item() for k in before) < 1e-6


def test_info_and_unload(aset, tiny_model, dirs):
    info = aset.info("a")
    assert (info.r, info.lora_alpha, info.target_modules) == (4, 8, ["q_proj", "v_proj"])
    assert info.n_modules == 4 and info.n_params == 4 * 4 * (64 + 64) - 2 * 4 * (64 - 32)  # k/v are 32 wide
    assert info.size_bytes == (dirs["a"] / "adapter_model.safetensors").stat().st_size
    assert info.base_model_name_or_path == "tiny"
    assert len(aset.info("b").target_modules) == 7 and aset.info("b").n_modules == 14
    aset.activate(["a", "b"])
    aset.unload("a")
    assert aset.names == ["b"] and aset.active == {"b": 1.0}
    with pytest.raises(ModelError, match="no adapter named 'a'.*loaded: \\['b'\\]"):
        aset.info("a")
    aset.unload("b")
    assert not lora_layers(aset.model)  # every wrapper gone: the plain base again
    torch.testing.assert_close(logits(aset.model), logits(tiny_model), rtol=0, atol=0)


def test_any_name_works_even_ones_torch_rejects_as_module_keys(tiny_model, dirs):
    s = AdapterSet(copy.deepcopy(tiny_model))
    for name in ("train", "org/lora.v1.2", "a"):
        s.load(name, dirs["a"])
    s.activate("org/lora.v1.2")
    torch.testing.assert_close(logits(s.model), alone(tiny_model, dirs["a"]), atol=1e-6, rtol=0)
    assert len(set(map(s.key, s.names))) == 3


def test_peft_made_adapter(tiny_model, tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(copy.deepcopy(tiny_model),
                                peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                                target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    model.save_pretrained(str(tmp_path / "p"))
    s = AdapterSet(copy.deepcopy(tiny_model))
    s.load("p", tmp_path / "p")
    s.activate("p")
    torch.testing.assert_close(logits(s.model), logits(model.eval()), atol=1e-5, rtol=0)


def test_errors_leave_the_set_unchanged(aset, tmp_path, dirs):
    with pytest.raises(ModelError, match="already loaded"):
        aset.load("a", dirs["a"])
    with pytest.raises(ModelError, match="no adapter named 'zz'"):
        aset.activate({"a": 1.0, "zz": 1.0})
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        aset.load("bad", bad)
    with pytest.raises(ConfigError, match="non-empty"):
        aset.load(" ", dirs["a"])
    assert aset.names == ["a", "b"] and aset.active == {}


def test_normalize_spec():
    assert normalize_spec("a") == {"a": 1.0}
    assert normalize_spec([("a", 0.5), "b"]) == {"a": 0.5, "b": 1.0}
    with pytest.raises(ConfigError, match="twice"):
        normalize_spec(["a", "a"])
    with pytest.raises(ConfigError, match="name or a"):
        normalize_spec([3])


def test_scan_adapters_reports_broken_ones(dirs, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    (broken / "adapter_model.safetensors").write_bytes(b"garbage")
    (tmp_path / "notes").mkdir()  # not an adapter folder: ignored
    infos, errors = scan_adapters(tmp_path)
    assert [i.name for i in infos] == ["a", "b"]
    assert list(errors) == ["broken"] and "not a valid safetensors" in errors["broken"]
    assert [i.name for i in scan_adapters(dirs["a"])[0]] == ["a"]  # an adapter dir itself
    with pytest.raises(ModelError, match="does not exist"):
        scan_adapters(tmp_path / "nope")
    assert adapter_info(dirs["b"]).r == 2
