"""Combining adapters: the new adapter's deltas against the exact weighted sum of deltas."""

import copy
import math

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from lora_helpers import make_adapter
from tuneforge.adapters.combine import combine_adapters, fro_norm
from tuneforge.errors import ConfigError, ModelError
from tuneforge.methods.lora import lora_layers
from tuneforge.methods.peft_format import load_adapter

WEIGHTS = [0.7, -0.3]




def deltas(base: nn.Module, adapter_dir) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(base)
    load_adapter(model, adapter_dir)
    return {p: layer.delta_weight("default").double() for p, layer in lora_layers(model).items()}


def weighted_sum(base, dirs, weights) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for w, d in zip(weights, dirs, strict=True):
        for p, delta in deltas(base, d).items():
            out[p] = out.get(p, 0) + w * delta
    return out


@pytest.fixture
def mixed(tiny_model, tmp_path):
    """Two adapters with different ranks, targets (overlapping) and scaling rules."""
    return [make_adapter(tiny_model, tmp_path / "a", ["q_proj", "v_proj"], 4, 1, alpha_per_r=3),
            make_adapter(tiny_model, tmp_path / "b", ["v_proj", "down_proj"], 2, 2, rslora=True, alpha_per_r=3)]


@pytest.fixture
def same(tiny_model, tmp_path):
    return [make_adapter(tiny_model, tmp_path / "c", ["q_proj", "o_proj"], 4, 3, alpha_per_r=3),
            make_adapter(tiny_model, tmp_path / "d", ["q_proj", "o_proj"], 4, 4, alpha_per_r=3)]


def test_cat_is_exact_with_different_ranks_and_targets(tiny_model, mixed, tmp_path):
    result = combine_adapters(mixed, WEIGHTS, tmp_path / "cat", method="cat")
    got, expected = deltas(tiny_model, result.path), weighted_sum(tiny_model, mixed, WEIGHTS)
    assert set(got) == set(expected) and len(got) == 6  # q, v, down in 2 layers
    for p in expected:
        torch.testing.assert_close(got[p], expected[p], atol=1e-6, rtol=0)
    v = "model.layers.0.self_attn.v_proj"
    assert lora_layers(_loaded(tiny_model, result.path))[v].r["default"] == 6  # 4 + 2
    assert result.relative_error < 1e-6


def test_svd_at_full_rank_is_exact(tiny_model, mixed, tmp_path):
    result = combine_adapters(mixed, WEIGHTS, tmp_path / "svd", method="svd", rank=6)
    got, expected = deltas(tiny_model, result.path), weighted_sum(tiny_model, mixed, WEIGHTS)
    for p in expected:
        torch.testing.assert_close(got[p], expected[p], atol=1e-6, rtol=0)
    assert result.relative_error < 1e-6


def test_svd_at_lower_rank_reports_the_eckart_young_error(tiny_model, mixed, tmp_path):
    k = 3
    result = combine_adapters(mixed, WEIGHTS, tmp_path / "svd3", method="svd", rank=k)
    got, expected = deltas(tiny_model, result.path), weighted_sum(tiny_model, mixed, WEIGHTS)
    v = "model.layers.1.self_attn.v_proj"  # rank 6 → 3: truncated
    s = torch.linalg.svdvals(expected[v])
    residual = got[v] - expected[v]
    assert torch.linalg.matrix_norm(residual, ord=2) <= s[k] * (1 + 1e-5)  # the best rank-k error
    assert result.module_errors[v] == pytest.approx(s[k:].norm().item() / s.norm().item(), rel=1e-4)
    assert result.module_errors[v] == pytest.approx((residual.norm() / expected[v].norm()).item(), rel=1e-4)
    assert result.module_errors[v] > 0.01
    q = "model.layers.0.self_attn.q_proj"  # rank 4 → 3
    assert result.module_errors[q] > 0
    assert result.r == 3 and set(result.rank_pattern.values()) == {2}  # down_proj stays at its rank 2
    assert 0 < result.relative_error <= result.max_module_error


def test_linear_keeps_the_rank_and_reports_its_cross_term_error(tiny_model, same, tmp_path):
    result = combine_adapters(same, WEIGHTS, tmp_path / "lin", method="linear")
    got, expected = deltas(tiny_model, result.path), weighted_sum(tiny_model, same, WEIGHTS)
    assert result.r == 4
    err = math.sqrt(sum((got[p] - expected[p]).norm().item() ** 2 for p in expected))
    ref = math.sqrt(sum(expected[p].norm().item() ** 2 for p in expected))
    assert result.relative_error == pytest.approx(err / ref, rel=1e-4) and result.relative_error > 0.01
    one = combine_adapters(same[:1], [-2.0], tmp_path / "one", method="linear")  # no cross terms: exact
    for p, delta in deltas(tiny_model, one.path).items():
        torch.testing.assert_close(delta, -2 * deltas(tiny_model, same[0])[p], atol=1e-6, rtol=0)


def test_peft_loads_a_combined_adapter_with_mixed_ranks(tiny_model, mixed, tmp_path):
    peft = pytest.importorskip("peft")
    result = combine_adapters(mixed, WEIGHTS, tmp_path / "svd", method="svd", rank=5)
    assert result.rank_pattern  # v_proj 5, others 4 / 2
    ids = torch.randint(0, 400, (2, 9), generator=torch.Generator().manual_seed(0))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_model), str(result.path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, _loaded(tiny_model, result.path)(input_ids=ids).logits,
                                   atol=1e-5, rtol=0)


def test_errors(tiny_model, mixed, same, tmp_path):
    with pytest.raises(ConfigError, match="equal ranks|same target modules"):
        combine_adapters(mixed, WEIGHTS, tmp_path / "x", method="linear")
    with pytest.raises(ConfigError, match="2 weights for 1 adapters"):
        combine_adapters(mixed[:1], WEIGHTS, tmp_path / "x")
    with pytest.raises(ConfigError, match="use one of"):
        combine_adapters(mixed, WEIGHTS, tmp_path / "x", method="ties")
    config = copy.deepcopy(tiny_model.config)
    config.hidden_size, config.intermediate_size = 32, 48
    other = make_adapter(LlamaForCausalLM(config), tmp_path / "other", ["q_proj"], 4, 5, alpha_per_r=3)
    with pytest.raises(ModelError, match="different base models: module model.layers.0.self_attn.q_proj"):
        combine_adapters([same[0], other], None, tmp_path / "x")
    with pytest.raises(ModelError, match="does not exist"):
        combine_adapters([tmp_path / "nope"], None, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_fro_norm_matches_the_dense_product():
    gen = torch.Generator().manual_seed(0)
    b = torch.randn(30, 5, generator=gen, dtype=torch.float64)
    a = torch.randn(5, 20, generator=gen, dtype=torch.float64)
    assert fro_norm(b, a) == pytest.approx((b @ a).norm().item(), rel=1e-12)


def _loaded(base: nn.Module, adapter_dir) -> nn.Module:
    model = copy.deepcopy(base)
    load_adapter(model, adapter_dir)
    return model
