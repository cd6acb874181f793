"""The one training step for every objective: a preference step accumulates like the SFT step (divided by the pairs
of the whole accumulated batch), and its metrics are the pairs' means."""

from __future__ import annotations

import copy

import pytest
import torch

from tuneforge.data.preference import collate_pairs, encode_pair, normalize_pair
from tuneforge.methods.lora import apply_lora
from tuneforge.train.preference import PreferenceSettings, preference_step_loss
from tuneforge.train.step import PreferenceLoss, train_step, validate

RECORDS = [{"prompt": f"What is {i} + 2?", "chosen": str(i + 2), "rejected": f"Sure! It is {i + 3}, I think."}
           for i in range(4)]


@pytest.fixture
def pairs(tiny_tokenizer):
    return [encode_pair(normalize_pair(r, "prompt_chosen_rejected", f"t:{i}"), tiny_tokenizer, 128)
            for i, r in enumerate(RECORDS)]


def _lora_model(tiny_tokenizer):
    from conftest import build_tiny_model

    model = build_tiny_model(len(tiny_tokenizer)).train()
    apply_lora(model, r=4, alpha=8)
    with torch.no_grad():  # a policy that differs from its reference, so the gradients are not trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("objective", ["dpo", "simpo"])
def test_accumulated_preference_step_equals_one_big_batch(tiny_tokenizer, pairs, objective):
    pad = tiny_tokenizer.pad_token_id
    settings = PreferenceSettings(objective=objective)
    one = _lora_model(tiny_tokenizer)
    two = copy.deepcopy(one)
    results = []
    for model, batches in ((one, [collate_pairs(pairs, pad)]),
                           (two, [collate_pairs(pairs[:2], pad), collate_pairs(pairs[2:], pad, pack_len=256)])):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.5)
        results.append(train_step(PreferenceLoss(model, settings), batches, opt, max_grad_norm=None))
    assert results[0].loss == pytest.approx(results[1].loss, abs=1e-5)
    for key in ("rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert results[0].metrics[key] == pytest.approx(results[1].metrics[key], abs=1e-4), key
    for (name, a), b in zip(one.named_parameters(), two.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_validate_gives_the_pairs_mean_loss_and_metrics(tiny_tokenizer, pairs):
    model = _lora_model(tiny_tokenizer)
    settings = PreferenceSettings(objective="dpo")
    pad = tiny_tokenizer.pad_token_id
    loss, metrics = validate(PreferenceLoss(model, settings), [collate_pairs(pairs[:3], pad),
                                                               collate_pairs(pairs[3:], pad)])
    with torch.no_grad():
        whole, expected = preference_step_loss(model.eval(), collate_pairs(pairs, pad), settings)
    assert loss == pytest.approx(float(whole), abs=1e-5)
    assert metrics["rewards/accuracies"] == pytest.approx(expected["rewards/accuracies"])
    assert metrics["rewards/margins"] == pytest.approx(expected["rewards/margins"], abs=1e-5)
