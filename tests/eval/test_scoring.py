import math

import pytest
import torch

from tuneforge.data.conversation import Example, Message
from tuneforge.errors import DataError
from tuneforge.eval.scoring import continuation_logprobs, examples_loss, file_perplexity, token_perplexity


def full_logprob(model, ctx, cont):
    """Reference: one unpadded forward over context + continuation, full logits."""
    with torch.no_grad():
        logits = model(torch.tensor([ctx + cont])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    return sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


def test_continuation_logprobs_match_unpadded_forward(tiny_model):
    pairs = [([5, 6, 7, 8, 9], [10, 11]), ([12], [13, 14, 15, 16]), ([3, 4], [5])]
    scores = continuation_logprobs(tiny_model, pairs, pad_id=0, batch_size=8)
    for (ctx, cont), s in zip(pairs, scores, strict=True):
        assert s.n_tokens == len(cont)
        assert s.logprob == pytest.approx(full_logprob(tiny_model, ctx, cont), abs=1e-4)
    # order and batch size do not change the results
    again = continuation_logprobs(tiny_model, pairs[::-1], pad_id=0, batch_size=1)[::-1]
    assert [a.logprob for a in again] == pytest.approx([s.logprob for s in scores], abs=1e-4)


def test_greedy_flag(tiny_model):
    ctx = [5, 6, 7]
    with torch.no_grad():
        nxt = int(tiny_model(torch.tensor([ctx])).logits[0, -1].argmax())
    other = (nxt + 1) % 50
    greedy, not_greedy = continuation_logprobs(tiny_model, [(ctx, [nxt]), (ctx, [other])])
    assert greedy.greedy and not not_greedy.greedy


def test_token_perplexity_matches_cross_entropy(tiny_model):
    ids = list(range(3, 3 + 50))
    p = token_perplexity(tiny_model, ids, window=20, batch_size=2)
    total, n = 0.0, 0
    for w in (ids[0:20], ids[20:40], ids[40:50]):
        with torch.no_grad():
            logits = tiny_model(torch.tensor([w])).logits[0]
        total += float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(w[1:]), reduction="sum"))
        n += len(w) - 1
    assert p.n_tokens == n == 47
    assert p.nll == pytest.approx(total / n, rel=1e-5)
    assert p.ppl == pytest.approx(math.exp(total / n), rel=1e-5)


def test_file_perplexity_reads_a_bounded_prefix(tiny_model, tiny_tokenizer, tmp_path):
    path = tmp_path / "general.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    p = file_perplexity(tiny_model, tiny_tokenizer, path, max_tokens=64, window=32)
    assert p.n_tokens == 62  # two windows of 32 tokens, 31 predictions each
    with pytest.raises(DataError, match="does not exist"):
        file_perplexity(tiny_model, tiny_tokenizer, tmp_path / "missing.txt")


def test_examples_loss_counts_only_the_answer(tiny_model, tiny_tokenizer):
    ex = Example(messages=[Message("user", "Upper-case the word: apple"), Message("assistant", "APPLE")])
    p = examples_loss(tiny_model, tiny_tokenizer, [ex])
    # the reference plus the end-of-turn token are the trained tokens
    assert p.n_tokens == len(tiny_tokenizer("APPLE", add_special_tokens=False)["input_ids"]) + 1
    longer = Example(messages=[Message("user", "Upper-case the word: apple. " * 5), Message("assistant", "APPLE")])
    assert examples_loss(tiny_model, tiny_tokenizer, [longer]).n_tokens == p.n_tokens
