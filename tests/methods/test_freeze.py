"""Partial fine-tuning: which blocks and parameters train."""

import pytest
import torch

from tuneforge.errors import ConfigError
from tuneforge.methods.freeze import apply_freeze, find_decoder_layers, freeze_summary


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_top_k_layers_trains_only_the_last_blocks(tiny_model):
    names = apply_freeze(tiny_model, top_k_layers=1)
    assert names and all(n.startswith("model.layers.1.") for n in names)
    assert trainable(tiny_model) == {n for n, _ in tiny_model.named_parameters()
                                     if n.startswith("model.layers.1.")}
    assert "trainable blocks (model.layers, 2 total): [1]" in freeze_summary(tiny_model)


def test_negative_layer_index(tiny_model):
    apply_freeze(tiny_model, layers=[-2])
    assert trainable(tiny_model) and all(n.startswith("model.layers.0.") for n in trainable(tiny_model))


def test_patterns_glob_regex_and_tied_head(tiny_model):
    names = apply_freeze(tiny_model, patterns=["*.mlp.*"])
    assert names and all(".mlp." in n for n in names)
    assert "partly trainable block 0: ['mlp.down_proj', 'mlp.gate_proj', 'mlp.up_proj']" in (
        freeze_summary(tiny_model))
    names = apply_freeze(tiny_model, patterns=[r".*self_attn\.q_proj\.weight", "model.norm"])
    assert set(names) == {"model.layers.0.self_attn.q_proj.weight",
                          "model.layers.1.self_attn.q_proj.weight", "model.norm.weight"}
    # The head is tied to the embeddings: naming it trains the shared weight.
    names = apply_freeze(tiny_model, patterns=["lm_head"])
    assert "lm_head.weight" in names and tiny_model.lm_head.weight.requires_grad
    assert trainable(tiny_model) == {"model.embed_tokens.weight"}


def test_layers_and_patterns_combine(tiny_model):
    apply_freeze(tiny_model, layers=[0], patterns=["lm_head"])
    got = trainable(tiny_model)
    assert any(n.startswith("model.layers.0.") for n in got)
    assert not any(n.startswith("model.layers.1.") for n in got)
    assert "model.embed_tokens.weight" in got


@pytest.mark.parametrize("kwargs, message", [
    ({"layers": [2]}, "2 decoder layers"),
    ({"layers": [-3]}, "out of range"),
    ({"top_k_layers": 3}, "top_k_layers=3"),
    ({}, "nothing would train"),
    ({"top_k_layers": 0}, "nothing would train"),
    ({"patterns": ["*.mlpx.*"]}, "matches no parameter"),
])
def test_errors(tiny_model, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        apply_freeze(tiny_model, **kwargs)
    assert all(p.requires_grad for p in tiny_model.parameters())  # untouched on error


def test_find_decoder_layers(tiny_model):
    path, layers = find_decoder_layers(tiny_model)
    assert path == "model.layers" and len(layers) == 2


@pytest.mark.parametrize("family, path", [
    ("gpt2", "transformer.h"), ("gpt_neox", "gpt_neox.layers"), ("falcon", "transformer.h"),
    ("bloom", "transformer.h"), ("mpt", "transformer.blocks"), ("opt", "model.decoder.layers"),
    ("mixtral", "model.layers"), ("gpt_oss", "model.layers"),
])
def test_layer_indices_select_the_blocks_of_every_family(family, path):
    from tiny_families import tiny

    model = tiny(family)
    assert find_decoder_layers(model)[0] == path
    names = apply_freeze(model, layers=[-1])
    assert names and all(n.startswith(f"{path}.1.") for n in names)
    assert trainable(model) == {n for n, _ in model.named_parameters() if n.startswith(f"{path}.1.")}
    assert f"trainable blocks ({path}, 2 total): [1]" in freeze_summary(model)


def test_unlisted_architecture_finds_transformers_decoder_blocks(tiny_model):
    # a block list under a name tuneforge does not know is found by transformers' own block class
    tiny_model.model.blocks_renamed = tiny_model.model.layers
    del tiny_model.model.layers
    tiny_model.model.extra = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(5)])  # longer, not blocks
    assert find_decoder_layers(tiny_model)[0] == "model.blocks_renamed"
