"""Preference objectives and fused log-probs: equal to TRL's losses and gradients, packed == unpacked,
the LoRA-off reference == the base model."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tuneforge.data.preference import collate_pairs, encode_pair, normalize_pair
from tuneforge.errors import ConfigError
from tuneforge.methods.lora import apply_lora, lora_layers
from tuneforge.train.loss import LogitTransform
from tuneforge.train.preference import (
    PreferenceSettings,
    batch_logps,
    precompute_reference_logps,
    preference_step_loss,
    reference_logps,
    sequence_logps,
)

TOL = 1e-5
RECORDS = [
    {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "The answer is 6, I think."},
    {"prompt": "Upper-case the word: apple", "chosen": "APPLE", "rejected": "apple"},
    {"prompt": "Classify the sentiment: I love it", "chosen": "positive", "rejected": "Sure! It is negative."},
]


@pytest.fixture
def pairs(tiny_tokenizer):
    return [encode_pair(normalize_pair(r, "prompt_chosen_rejected", f"t.jsonl:{i}"), tiny_tokenizer, 256)
            for i, r in enumerate(RECORDS, 1)]


@pytest.fixture
def models(tiny_tokenizer):
    from conftest import build_tiny_model

    policy = build_tiny_model(len(tiny_tokenizer), seed=0).train()
    ref = build_tiny_model(len(tiny_tokenizer), seed=1)
    ref.requires_grad_(False)
    return policy, ref


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_close_grads(a, b):
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=TOL, rtol=TOL, msg=name)


def _trl_layout(batch):
    """TRL's concatenated layout: all chosen rows, then all rejected rows; completion mask from our labels."""
    order = list(range(0, batch["input_ids"].shape[0], 2)) + list(range(1, batch["input_ids"].shape[0], 2))
    ids = batch["input_ids"][order]
    attention = (batch["seq_ids"][order] >= 0).long()
    completion = (batch["labels"][order] != -100).long()
    return {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}


def _ours(model, batch, ref_model=None, **kw):
    loss, metrics = preference_step_loss(model, batch, PreferenceSettings(**kw), reference=ref_model)
    loss.backward()
    return loss.detach(), metrics, _grads(model)


def _trl_dpo(policy, ref, batch, tiny_tokenizer, tmp_path, loss_type, beta):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(tmp_path), report_to=[], beta=beta, loss_type=[loss_type], use_cpu=True,
                     bf16=False, per_device_train_batch_size=len(RECORDS))
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, processing_class=tiny_tokenizer,
                         train_dataset=Dataset.from_list(RECORDS))
    policy.train()
    loss = trainer.compute_loss(policy, _trl_layout(batch))
    loss.backward()
    return loss.detach(), {k: v[-1] for k, v in trainer._metrics["train"].items()}, _grads(policy)


@pytest.mark.parametrize(("objective", "loss_type", "beta"), [("dpo", "sigmoid", 0.1), ("ipo", "ipo", 0.5)])
def test_dpo_and_ipo_equal_trl_dpo_trainer(models, pairs, tiny_tokenizer, tmp_path, objective, loss_type, beta):
    policy, ref = models
    batch = collate_pairs(pairs, tiny_tokenizer.pad_token_id)
    theirs = _trl_dpo(copy.deepcopy(policy), ref, batch, tiny_tokenizer, tmp_path, loss_type, beta)
    ours = _ours(policy, batch, ref, objective=objective, beta=beta, reference="model")
    torch.testing.assert_close(ours[0], theirs[0], atol=TOL, rtol=TOL)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected"):
        assert ours[1][key] == pytest.approx(theirs[1][key], abs=TOL), key
    _assert_close_grads(ours[2], theirs[2])


def _full_logits_logps(model, trl_batch, average):
    """TRL's own log-prob path (full logits + get_batch_logps) on the concatenated batch."""
    from trl.experimental.cpo import CPOTrainer

    labels = trl_batch["input_ids"].masked_fill(trl_batch["completion_mask"] == 0, -100)
    logits = model(input_ids=trl_batch["input_ids"], attention_mask=trl_batch["attention_mask"]).logits
    logps = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=average)
    return logits, labels, logps.chunk(2)


def _stub(**kw):
    return SimpleNamespace(accelerator=SimpleNamespace(device=torch.device("cpu")), alpha=0.0, **kw)


def test_conservative_dpo_equals_trl_label_smoothed_sigmoid(models, pairs, tiny_tokenizer):
    from trl.experimental.cpo import CPOTrainer

    policy, ref = models
    batch = collate_pairs(pairs, tiny_tokenizer.pad_token_id)
    twin = copy.deepcopy(policy)
    trl_batch = _trl_layout(batch)
    _, _, (c, r) = _full_logits_logps(twin, trl_batch, average=False)
    with torch.no_grad():
        _, _, (rc, rr) = _full_logits_logps(ref, trl_batch, average=False)
    stub = _stub(beta=0.2, label_smoothing=0.1, loss_type="sigmoid")
    losses, _, _ = CPOTrainer.cpo_loss(stub, c - rc, r - rr)
    losses.mean().backward()
    ours = _ours(policy, batch, ref, objective="dpo", beta=0.2, label_smoothing=0.1, reference="model")
    torch.testing.assert_close(ours[0], losses.mean().detach(), atol=TOL, rtol=TOL)
    _assert_close_grads(ours[2], _grads(twin))


def test_simpo_equals_trl_cpo_simpo(models, pairs, tiny_tokenizer):
    from trl.experimental.cpo import CPOTrainer

    policy, _ = models
    batch = collate_pairs(pairs, tiny_tokenizer.pad_token_id)
    twin = copy.deepcopy(policy)
    _, _, (c, r) = _full_logits_logps(twin, _trl_layout(batch), average=True)
    stub = _stub(beta=2.0, label_smoothing=0.05, loss_type="simpo", simpo_gamma=0.7)
    losses, chosen_rewards, _ = CPOTrainer.cpo_loss(stub, c, r)
    losses.mean().backward()
    ours = _ours(policy, batch, objective="simpo", beta=2.0, simpo_gamma=0.7, label_smoothing=0.05)
    torch.testing.assert_close(ours[0], losses.mean().detach(), atol=TOL, rtol=TOL)
    assert ours[1]["rewards/chosen"] == pytest.approx(float(chosen_rewards.mean()), abs=TOL)
    _assert_close_grads(ours[2], _grads(twin))


def test_orpo_equals_trl_odds_ratio_plus_answer_nll(models, pairs, tiny_tokenizer):
    """TRL's ORPOTrainer also trains its NLL on the prompt tokens; ours, like the ORPO paper, on the answer only."""
    from trl.experimental.orpo import ORPOTrainer

    policy, _ = models
    batch = collate_pairs(pairs, tiny_tokenizer.pad_token_id)
    twin = copy.deepcopy(policy)
    logits, labels, (c, r) = _full_logits_logps(twin, _trl_layout(batch), average=True)
    n = len(RECORDS)
    nll = F.cross_entropy(logits[:n, :-1].reshape(-1, logits.shape[-1]), labels[:n, 1:].reshape(-1))
    losses, _, _, log_odds_ratio, _ = ORPOTrainer.odds_ratio_loss(_stub(beta=0.25), c, r)
    loss = nll - losses.mean()
    loss.backward()
    ours = _ours(policy, batch, objective="orpo", orpo_lambda=0.25)
    torch.testing.assert_close(ours[0], loss.detach(), atol=TOL, rtol=TOL)
    assert ours[1]["nll"] == pytest.approx(nll.item(), abs=TOL)
    assert ours[1]["log_odds_ratio"] == pytest.approx(float(log_odds_ratio), abs=TOL)
    _assert_close_grads(ours[2], _grads(twin))


@pytest.mark.parametrize("transform", [LogitTransform(), LogitTransform(scale=0.25),
                                       LogitTransform(scale=1.7, softcap=2.0)], ids=["plain", "scaled", "soft-capped"])
def test_sequence_logps_equal_full_logits_with_bias_and_chunks(transform):
    """Also through a model's logit scale and soft-cap (Cohere, Granite, Gemma2/3), gradients included."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 7, 16, requires_grad=True)
    head = torch.nn.Linear(16, 50)
    labels = torch.randint(0, 50, (2, 7))
    labels[0, :3] = -100
    labels[1, 5:] = -100
    index = torch.tensor([[0] * 4 + [1] * 3, [2] * 7])
    index[1, 5:] = -1
    logps, counts = sequence_logps(hidden, head, labels, index, 3, chunk_tokens=3, transform=transform)
    weights = torch.tensor([0.3, -1.2, 2.0])
    (logps * weights).sum().backward()
    ours = (logps.detach(), hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone())
    hidden.grad = head.weight.grad = head.bias.grad = None

    logits = head(hidden).float() * transform.scale
    if transform.softcap is not None:
        logits = transform.softcap * torch.tanh(logits / transform.softcap)
    logp = F.log_softmax(logits, -1)[:, :-1]
    target = labels[:, 1:]
    token = logp.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1) * (target != -100)
    seq = index[:, 1:]
    ref = torch.zeros(3).index_add(0, seq[target != -100], token[target != -100])
    (ref * weights).sum().backward()
    assert counts.tolist() == [1, 3, 4]
    for a, b in zip(ours, (ref.detach(), hidden.grad, head.weight.grad, head.bias.grad), strict=True):
        torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)


def test_packed_equals_unpacked(models, pairs, tiny_tokenizer):
    policy, ref = models
    unpacked = collate_pairs(pairs, tiny_tokenizer.pad_token_id)
    packed = collate_pairs(pairs, tiny_tokenizer.pad_token_id, pack_len=2 * max(len(p) for p in pairs))
    assert packed["input_ids"].shape[0] < unpacked["input_ids"].shape[0]
    with torch.no_grad():
        a, na = batch_logps(policy, unpacked)
        b, nb = batch_logps(policy, packed)
    assert na.tolist() == nb.tolist()
    torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)
    twin = copy.deepcopy(policy)
    loss_u, _, grads_u = _ours(policy, unpacked, ref, objective="dpo", reference="model")
    loss_p, _, grads_p = _ours(twin, packed, ref, objective="dpo", reference="model")
    torch.testing.assert_close(loss_u, loss_p, atol=TOL, rtol=TOL)
    _assert_close_grads(grads_u, grads_p)


def test_lora_disabled_reference_equals_separately_loaded_base(tiny_model_dir, pairs, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    apply_lora(model, r=4, alpha=8)
    torch.manual_seed(0)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.5)  # adapters that change the output
    batch = collate_pairs(pairs, tiny_tokenizer.pad_token_id)
    settings = PreferenceSettings(objective="dpo", reference="adapters_off")
    with torch.no_grad():
        before = batch_logps(model, batch)[0]
        ref = reference_logps(model, batch, settings)
        after = batch_logps(model, batch)[0]
        expected = batch_logps(base, batch)[0]
    torch.testing.assert_close(ref, expected, atol=TOL, rtol=TOL)
    assert (before - expected).abs().max() > 0.1
    torch.testing.assert_close(after, before)  # the adapters are back on
    loss, metrics = preference_step_loss(model, batch, PreferenceSettings(objective="dpo"))
    loss.backward()  # auto picks adapters_off for a LoRA model; only adapters receive gradients
    assert all((p.grad is not None) == ("lora_" in n) for n, p in model.named_parameters())
    assert metrics["pairs"] == len(pairs)


def test_precomputed_reference_equals_reference_model(models, pairs, tiny_tokenizer):
    policy, ref = models
    pad = tiny_tokenizer.pad_token_id
    with_ref = precompute_reference_logps(ref, pairs, pad, batch_size=2)
    assert all(p.ref_logps is not None for p in with_ref) and pairs[0].ref_logps is None
    twin = copy.deepcopy(policy)
    loss_m, metrics_m, grads_m = _ours(policy, collate_pairs(pairs, pad), ref, objective="dpo", reference="model")
    loss_p, metrics_p, grads_p = _ours(twin, collate_pairs(with_ref, pad), objective="dpo")
    torch.testing.assert_close(loss_m, loss_p, atol=TOL, rtol=TOL)
    assert metrics_m == pytest.approx(metrics_p, abs=TOL)
    _assert_close_grads(grads_m, grads_p)


def test_full_fine_tuning_without_reference_is_refused(models, pairs, tiny_tokenizer):
    policy, _ = models
    with pytest.raises(ConfigError, match="preference.reference"):
        preference_step_loss(policy, collate_pairs(pairs, tiny_tokenizer.pad_token_id), PreferenceSettings())


@pytest.mark.parametrize(("kw", "key"), [({"objective": "kto"}, "train.objective"),
                                         ({"beta": 0}, "preference.beta"),
                                         ({"label_smoothing": 0.5}, "preference.label_smoothing"),
                                         ({"reference": "copy"}, "preference.reference")])
def test_settings_validated(kw, key):
    with pytest.raises(ConfigError, match=key):
        PreferenceSettings(**kw)


def test_disable_adapters_runs_the_base_and_restores(tiny_tokenizer):
    from conftest import build_tiny_model
    from tuneforge.errors import ModelError
    from tuneforge.methods.lora import disable_adapters, merge_lora

    model = build_tiny_model(len(tiny_tokenizer))
    ids = torch.tensor([[5, 6, 7, 8]])
    base = model(ids).logits
    apply_lora(model, r=4, alpha=8)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    tuned = model(ids).logits
    with disable_adapters(model):
        torch.testing.assert_close(model(ids).logits, base)
    torch.testing.assert_close(model(ids).logits, tuned)
    merge_lora(model)
    with pytest.raises(ModelError, match="merged"), disable_adapters(model):
        pass


def _lora_policy(tiny_tokenizer):
    from conftest import build_tiny_model

    model = build_tiny_model(len(tiny_tokenizer), seed=0).train()
    apply_lora(model, r=4, alpha=8)
    torch.manual_seed(0)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.3)  # the policy differs from the reference
    return model


def test_shared_prompt_equals_two_documents(pairs, tiny_tokenizer):
    """[prompt | chosen | rejected] in one document: the same log-probs, DPO loss and LoRA gradients as two rows."""
    pad = tiny_tokenizer.pad_token_id
    assert all(p.prompt_len > 0 for p in pairs)
    two_rows = collate_pairs(pairs, pad)
    one_per_row = collate_pairs(pairs, pad, share_prompt=True)
    several = collate_pairs(pairs, pad, pack_len=sum(p.shared_len for p in pairs), share_prompt=True)
    assert several["input_ids"].shape[0] == 1 and one_per_row["input_ids"].shape[0] == len(pairs)
    assert int((several["seq_ids"] >= 0).sum()) == sum(len(p) - p.prompt_len for p in pairs)
    policy = _lora_policy(tiny_tokenizer)
    with torch.no_grad():
        expected, counts = batch_logps(policy, two_rows)
        for batch in (one_per_row, several):
            logps, n = batch_logps(policy, batch)
            assert n.tolist() == counts.tolist()
            torch.testing.assert_close(logps, expected, atol=TOL, rtol=TOL)
    settings = {"objective": "dpo", "reference": "adapters_off"}
    results = [_ours(copy.deepcopy(policy), b, **settings) for b in (two_rows, one_per_row, several)]
    assert all("lora_" in name for name in results[0][2])
    for loss, metrics, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], atol=TOL, rtol=TOL)
        assert metrics == pytest.approx(results[0][1], abs=TOL)
        _assert_close_grads(grads, results[0][2])


def test_shared_prompt_scores_the_first_rejected_token_from_the_prompt():
    from tuneforge.data.preference import CHOSEN, PROMPT, REJECTED
    from tuneforge.train.preference import predictor_positions

    # two pairs in a row: prompt 2, chosen 2, rejected 3; then prompt 1, chosen 1, rejected 1; padding
    branch = torch.tensor([[PROMPT] * 2 + [CHOSEN] * 2 + [REJECTED] * 3 + [PROMPT, CHOSEN, REJECTED, PROMPT]])
    assert predictor_positions(branch).tolist() == [[-1, 0, 1, 2, 1, 4, 5, 6, 7, 7, 9]]


def test_sliding_window_models_keep_two_documents(pairs, tiny_tokenizer, caplog):
    from transformers import MistralConfig, MistralForCausalLM

    from tuneforge.train.preference import can_share_prompt

    config = MistralConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, sliding_window=8)
    model = MistralForCausalLM(config)
    assert not can_share_prompt(model, PreferenceSettings())
    assert "sliding-window" in caplog.text
    with pytest.raises(ConfigError, match="preference.share_prompt"):
        batch_logps(model, collate_pairs(pairs, tiny_tokenizer.pad_token_id, share_prompt=True))
    assert can_share_prompt(_lora_policy(tiny_tokenizer), PreferenceSettings())
    assert not can_share_prompt(_lora_policy(tiny_tokenizer), PreferenceSettings(share_prompt=False))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's fast path is for GPUs")
def test_shared_prompt_with_flex_equals_two_documents_on_gpu(pairs, tiny_tokenizer):
    from tuneforge.train.attention import FLEX, use_document_attention

    device = torch.device("cuda")
    policy = _lora_policy(tiny_tokenizer).to(device)
    pad = tiny_tokenizer.pad_token_id
    pairs = pairs * 2  # a row of 128+ tokens: inductor has no flex kernel for fp32 rows shorter than a block
    two_rows = collate_pairs(pairs, pad)
    shared = collate_pairs(pairs, pad, pack_len=sum(p.shared_len for p in pairs), share_prompt=True)
    settings = {"objective": "dpo", "reference": "adapters_off"}
    expected = _ours(copy.deepcopy(policy), two_rows, **settings)
    assert use_document_attention(policy, device) and policy.config._attn_implementation == FLEX
    loss, metrics, grads = _ours(policy, shared, **settings)
    torch.testing.assert_close(loss, expected[0], atol=1e-4, rtol=1e-4)
    assert metrics == pytest.approx(expected[1], abs=1e-4)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[2][name], atol=1e-4, rtol=1e-4, msg=name)
