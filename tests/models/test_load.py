"""load_model refuses what it should not read: pickle-only weights (unless opted in), pickles holding objects, and
models that need their repository's code (unless trust_remote_code)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import build_tiny_model, build_tiny_tokenizer
from tuneforge.errors import ModelError
from tuneforge.models.load import ALLOW_PICKLE_ENV, load_model


class Payload:
    def __reduce__(self):
        return (os.system, ("echo never",))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tok = build_tiny_tokenizer()
    model = build_tiny_model(len(tok))
    out = {}
    for name in ("bin", "evil", "remote"):
        out[name] = root / name
        model.save_pretrained(out[name])
        tok.save_pretrained(out[name])
    for name in ("bin", "evil"):
        (out[name] / "model.safetensors").unlink()
    torch.save(model.state_dict(), out["bin"] / "pytorch_model.bin")
    torch.save({**model.state_dict(), "x": Payload()}, out["evil"] / "pytorch_model.bin")
    config = json.loads((out["remote"] / "config.json").read_text())
    config.update(model_type="mystery", architectures=["MyModel"],
                  auto_map={"AutoConfig": "conf.MyConfig", "AutoModelForCausalLM": "mod.MyModel"})
    (out["remote"] / "config.json").write_text(json.dumps(config))
    return out


def test_pickle_only_weights_are_refused_unless_the_user_opts_in(folders, monkeypatch):
    monkeypatch.delenv(ALLOW_PICKLE_ENV, raising=False)
    with pytest.raises(ModelError, match=r"only as pickle files \(pytorch_model.bin\).*--allow-pickle"):
        load_model(str(folders["bin"]))
    monkeypatch.setenv(ALLOW_PICKLE_ENV, "1")
    assert load_model(str(folders["bin"])).config.vocab_size > 0


def test_pickle_with_objects_is_refused_even_when_allowed(folders, monkeypatch):
    monkeypatch.setenv(ALLOW_PICKLE_ENV, "1")
    with pytest.raises(ModelError, match=r"not tensors \(.*GLOBAL.*system.*nothing in them ran"):
        load_model(str(folders["evil"]))


def test_remote_code_names_the_setting_and_the_risk(folders):
    with pytest.raises(ModelError, match=r"trust_remote_code: true.*runs with your permissions"):
        load_model(str(folders["remote"]))


@pytest.fixture(scope="module")
def gemma2_folder(tmp_path_factory):
    """A model transformers has no SDPA attention for (Gemma2: soft-capped attention scores)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    out = tmp_path_factory.mktemp("gemma2")
    config = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    Gemma2ForCausalLM(config).save_pretrained(out)
    return out


def test_auto_attention_is_sdpa_where_supported_else_eager_with_a_note(tmp_path, gemma2_folder, capsys):
    build_tiny_model(64).save_pretrained(tmp_path)
    assert load_model(str(tmp_path)).config._attn_implementation == "sdpa"
    capsys.readouterr()
    assert load_model(str(gemma2_folder)).config._attn_implementation == "eager"
    assert "no SDPA kernel for gemma2, so it runs eager attention" in capsys.readouterr().err
    assert load_model(str(gemma2_folder), attn_implementation="eager").config._attn_implementation == "eager"


def test_an_attention_the_architecture_lacks_is_a_model_error(gemma2_folder):
    with pytest.raises(ModelError, match="no sdpa attention for this architecture.*attn_implementation: auto"):
        load_model(str(gemma2_folder), attn_implementation="sdpa")
    with pytest.raises(ModelError, match="attn_implementation 'flash' is not one of auto, sdpa, eager"):
        load_model(str(gemma2_folder), attn_implementation="flash")
