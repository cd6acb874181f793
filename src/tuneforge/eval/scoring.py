"""Log-likelihood scoring: continuations given contexts, perplexity of plain text, loss on examples.

Everything here runs the model without generating: one forward pass per batch, with the output
head applied only at the positions that are scored (full-vocabulary logits of every position are
the largest tensor of a forward pass and are never built).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from tuneforge.data.conversation import Example
from tuneforge.data.packing import no_pack
from tuneforge.data.replay import read_text_prefix, text_token_ids
from tuneforge.data.template import encode
from tuneforge.errors import DataError
from tuneforge.models.load import pad_token_id
from tuneforge.train.loss import chunked_lm_loss, logit_transform
from tuneforge.train.step import validation_loss


@dataclass
class ContinuationScore:
    """Summed log-probability of a continuation, its token count, and whether greedy decoding yields it."""

    logprob: float
    n_tokens: int
    greedy: bool


@dataclass
class Perplexity:
    """Mean negative log-likelihood per predicted token and its exponential."""

    nll: float
    n_tokens: int

    @property
    def ppl(self) -> float:
        return math.exp(min(self.nll, 50.0))


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def continuation_logprobs(model: torch.nn.Module, pairs: list[tuple[list[int], list[int]]], pad_id: int = 0,
                          batch_size: int = 32) -> list[ContinuationScore]:
    """Score each ``(context ids, continuation ids)``: log P(continuation | context) under the model.

    Sequences are sorted by length so that batches carry little padding (right padding: causal
    attention never looks at it); results come back in input order.
    """
    for ctx, cont in pairs:
        if not ctx or not cont:
            raise ValueError("continuation_logprobs needs a non-empty context and continuation")
    device = _device(model)
    was_training = model.training
    model.eval()
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    out: list[ContinuationScore | None] = [None] * len(pairs)
    head = model.get_output_embeddings()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            seqs = [pairs[i][0] + pairs[i][1] for i in idx]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for b, s in enumerate(seqs):
                ids[b, :len(s)] = torch.tensor(s)
                mask[b, :len(s)] = 1
            hidden = model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                      use_cache=False).last_hidden_state
            for b, i in enumerate(idx):
                ctx, cont = pairs[i]
                # position p predicts token p + 1: the continuation is predicted from len(ctx)-1 on
                pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1, device=device)
                logp = torch.log_softmax(head(hidden[b, pos]).float(), dim=-1)
                target = torch.tensor(cont, device=device)
                out[i] = ContinuationScore(logprob=float(logp.gather(1, target[:, None]).sum()),
                                           n_tokens=len(cont), greedy=bool((logp.argmax(-1) == target).all()))
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


@torch.no_grad()
def token_perplexity(model: torch.nn.Module, ids: list[int], window: int = 256, batch_size: int = 8,
                     pad_id: int = 0) -> Perplexity:
    """Perplexity over token ids cut into non-overlapping windows of ``window`` tokens.

    Non-overlapping windows give each token less context than a sliding window would (so the
    number is higher than a sliding-window perplexity), but cost one forward pass per token; the
    same windows are used for every model compared, so differences are meaningful.
    """
    if len(ids) < 2:
        raise DataError("perplexity needs at least 2 tokens of text")
    windows = [ids[i:i + window] for i in range(0, len(ids), window)]
    windows = [w for w in windows if len(w) >= 2]
    device = _device(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(windows), batch_size):
            chunk = windows[start:start + batch_size]
            width = max(len(w) for w in chunk)
            inp = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for b, w in enumerate(chunk):
                inp[b, :len(w)] = torch.tensor(w)
                labels[b, :len(w)] = torch.tensor(w)
                mask[b, :len(w)] = 1
            hidden = model.base_model(input_ids=inp.to(device), attention_mask=mask.to(device),
                                      use_cache=False).last_hidden_state
            loss, n = chunked_lm_loss(hidden, model.get_output_embeddings(), labels.to(device),
                                      transform=logit_transform(model))
            total, count = total + float(loss), count + n
    finally:
        model.train(was_training)
    return Perplexity(nll=total / max(count, 1), n_tokens=count)


def text_perplexity(model: torch.nn.Module, tokenizer, text: str, max_tokens: int = 4096, window: int = 256,
                    batch_size: int = 8) -> Perplexity:
    """Perplexity of the first ``max_tokens`` tokens of ``text`` (see :func:`token_perplexity`)."""
    ids = text_token_ids(tokenizer, text, max_tokens)
    return token_perplexity(model, ids, window=window, batch_size=batch_size, pad_id=pad_token_id(tokenizer))


def file_perplexity(model: torch.nn.Module, tokenizer, path: str | Path, max_tokens: int = 4096,
                    window: int = 256, batch_size: int = 8) -> Perplexity:
    """Perplexity of the first ``max_tokens`` tokens of a text file (only a prefix is read)."""
    # ~4 characters per token in English; read generously so the token budget is filled
    text = read_text_prefix(path, max_chars=8 * max_tokens + 1024)
    return text_perplexity(model, tokenizer, text, max_tokens, window, batch_size)


def examples_loss(model: torch.nn.Module, tokenizer, examples: list[Example], max_len: int = 2048,
                  batch_size: int = 8) -> Perplexity:
    """Loss per trained token (assistant answers + end-of-turn, as in training) over examples."""
    tokenized = [t for e in examples for t in encode(e, tokenizer, max_len)]
    if not tokenized:
        raise DataError("no examples to compute a loss on")
    rows = no_pack(tokenized)
    n = sum(sum(1 for x in r.labels[1:] if x != -100) for r in rows)
    loss = validation_loss(model, rows, pad_token_id(tokenizer), batch_size, 1024, None)
    return Perplexity(nll=float(loss), n_tokens=n)
