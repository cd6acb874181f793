"""Batched text generation from chat prompts or raw text, greedy or sampled.

``RowSampler`` picks every row's next token itself (logit bias, penalties, an optional grammar
mask, temperature, top-p, a seeded generator per row) and hands Hugging Face ``generate`` a
one-hot score, so each row of one batch decodes by its own parameters and reports log-probabilities.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Protocol

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteriaList

from tuneforge.data.conversation import Message
from tuneforge.data.template import CHATML_TEMPLATE, EOT_MARKERS
from tuneforge.log import get_logger
from tuneforge.models.load import pad_token_id


@dataclass
class Decoding:
    """How one row picks its tokens (OpenAI's sampling parameters)."""

    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh random seed
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    top_logprobs: int | None = None  # None: no log-probabilities; k: the chosen token's and the k likeliest

    def plain_greedy(self) -> bool:
        """Greedy with nothing to adjust or report: the argmax of the model's own scores."""
        return (self.temperature == 0 and not self.logit_bias and not self.presence_penalty
                and not self.frequency_penalty and self.top_logprobs is None)


class Constraint(Protocol):
    """A grammar that limits which tokens may come next (see serve/structured.py)."""

    def allowed(self, vocab_size: int) -> torch.Tensor:
        """A bool mask over the vocabulary: the tokens the grammar accepts next."""

    def advance(self, token: int) -> None:
        """Take ``token`` as generated."""


@dataclass
class Choice:
    """One picked token with its log-probability and the ``top_logprobs`` likeliest alternatives."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


class RowSampler(LogitsProcessor):
    """Picks each row's next token; ``last[i]`` holds row i's latest Choice when it asked for logprobs.

    Log-probabilities are those of the distribution the token is drawn from at temperature 1: after
    logit bias, penalties and the grammar mask, before temperature and top-p. Rows listed in
    ``finished`` are left alone (their constraint has ended). A row whose grammar fails (no token allowed, or
    its token refused) is added to ``finished`` with the reason in ``failed[i]``; the other rows go on, and the
    caller's stopping criterion ends the failed row.
    """

    def __init__(self, rows: list[Decoding], prompt_width: int,
                 constraints: list[Constraint | None] | None = None) -> None:
        self.rows, self.prompt_width = rows, prompt_width
        self.constraints = constraints or [None] * len(rows)
        self.seeds = [d.seed if d.seed is not None else int.from_bytes(os.urandom(7), "little") for d in rows]
        self.generators: list[torch.Generator] = []
        self.finished: set[int] = set()
        self.failed: dict[int, str] = {}
        self.last: list[Choice | None] = [None] * len(rows)
        # Plain greedy rows need nothing from us: Hugging Face's argmax over the raw scores is the answer.
        self.plain = all(d.plain_greedy() for d in rows) and not any(self.constraints)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.plain:
            return scores
        if not self.generators:
            self.generators = [torch.Generator(scores.device).manual_seed(s) for s in self.seeds]
        out = torch.full_like(scores, float("-inf"))
        for i, d in enumerate(self.rows):
            if i in self.finished:
                out[i] = scores[i]
                continue
            try:
                out[i, self._step(i, d, scores[i].float(), input_ids[i, self.prompt_width:])] = 0.0
            except RuntimeError as e:  # this row's grammar failed: only this row ends
                self.failed[i] = str(e)
                self.finished.add(i)
                out[i] = scores[i]
        return out

    def _step(self, i: int, d: Decoding, logits: torch.Tensor, generated: torch.Tensor) -> int:
        logits = self._adjust(i, d, logits, generated)
        token = self._pick(i, d, logits)
        if d.top_logprobs is not None:
            logprobs = torch.log_softmax(logits, -1)
            top = torch.topk(logprobs, d.top_logprobs)
            self.last[i] = Choice(token, logprobs[token].item(),
                                  list(zip(top.indices.tolist(), top.values.tolist(), strict=True)))
        if self.constraints[i] is not None:
            self.constraints[i].advance(token)
        return token

    def _adjust(self, i: int, d: Decoding, logits: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        if d.logit_bias:
            ids = torch.tensor(list(d.logit_bias), device=logits.device)
            logits[ids] += torch.tensor(list(d.logit_bias.values()), device=logits.device)
        if d.presence_penalty or d.frequency_penalty:  # OpenAI: over the tokens generated so far
            counts = torch.bincount(generated, minlength=logits.shape[-1])[:logits.shape[-1]].float()
            logits -= d.frequency_penalty * counts + d.presence_penalty * (counts > 0).float()
        if self.constraints[i] is not None:
            allowed = self.constraints[i].allowed(logits.shape[-1]).to(logits.device)
            logits = logits.masked_fill(~allowed, float("-inf"))
        if not torch.isfinite(logits).any():
            raise RuntimeError("no token is allowed next (the grammar or logit_bias excludes every token)")
        return logits

    def _pick(self, i: int, d: Decoding, logits: torch.Tensor) -> int:
        if d.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / d.temperature, -1)
        if d.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            drop = sorted_probs.cumsum(-1) - sorted_probs >= d.top_p  # keep the smallest set reaching top_p
            probs = probs.scatter(0, order[drop], 0.0)
        return int(torch.multinomial(probs, 1, generator=self.generators[i]))


def chat_template(tokenizer) -> str:
    """The tokenizer's chat template, or ChatML when it has none."""
    return getattr(tokenizer, "chat_template", None) or CHATML_TEMPLATE


def render_chat(tokenizer, messages: list[Message] | list[dict], system_prompt: str | None = None,
                tools: list[dict] | None = None) -> str:
    """Render a conversation as text ending with the assistant generation prompt.

    Turns are Messages or OpenAI-style dicts (which may carry ``tool_calls`` or ``tool_call_id``);
    ``tools`` (OpenAI function definitions) go to the template, which decides how to show them.
    """
    turns = [{"role": m.role, "content": m.content} if isinstance(m, Message) else m for m in messages]
    if system_prompt is not None and not any(t["role"] == "system" for t in turns):
        turns.insert(0, {"role": "system", "content": system_prompt})
    return tokenizer.apply_chat_template(turns, chat_template=chat_template(tokenizer), tools=tools or None,
                                         add_generation_prompt=True, tokenize=False)


def supports_tools(tokenizer) -> bool:
    """Whether the chat template shows tool definitions (rendered with one, its name appears)."""
    probe = "tuneforge_probe_function"
    tool = {"type": "function", "function": {"name": probe, "description": "", "parameters": {"type": "object"}}}
    try:
        return probe in render_chat(tokenizer, [{"role": "user", "content": "hi"}], tools=[tool])
    except Exception:  # a template that fails on the tools argument does not support it
        return False


def encode_prompts(tokenizer, prompts: list[list[Message]] | list[list[dict]] | list[str],
                   system_prompt: str | None = None, tools: list[dict] | None = None) -> list[list[int]]:
    """Token ids of each prompt: chats through the template, plain strings as they are."""
    ids = []
    for p in prompts:
        if isinstance(p, str):
            ids.append(tokenizer(p)["input_ids"])
        else:
            text = render_chat(tokenizer, p, system_prompt, tools)
            ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """End-of-turn and end-of-sequence ids known to the tokenizer (and the model's config)."""
    ids = [tokenizer.eos_token_id]
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in EOT_MARKERS if t in vocab]
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += config_eos if isinstance(config_eos, list) else [config_eos]
    return sorted({i for i in ids if i is not None})


def left_pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` for a batch of id lists."""
    width = max(len(x) for x in batch)
    input_ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in batch], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch], dtype=torch.long)
    return input_ids, mask


def cut_at_stop(ids: list[int], stops: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i]
    return ids


def progress_bar(total: int, desc: str, unit: str, single_step: bool) -> tqdm:
    """A progress bar with ETA on stderr: minutes of silence look like a hang. Hidden under --quiet, on ranks
    other than 0, and when the work is one step (nothing to estimate)."""
    quiet = get_logger("tuneforge").getEffectiveLevel() > logging.INFO
    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True,
                disable=quiet or single_step or os.environ.get("RANK", "0") != "0")


def generate_rows(model, input_ids: torch.Tensor, mask: torch.Tensor, sampler: RowSampler, max_new_tokens: int,
                  stops: list[int], pad_id: int, stopping: StoppingCriteriaList | None = None) -> torch.Tensor:
    """Hugging Face ``generate`` in which only ``sampler`` shapes the scores: it takes the one token the sampler
    left and stops at ``stops``. Returns the prompt and generated ids.

    transformers fills every field a GenerationConfig leaves unset from ``model.generation_config``, so a checkpoint's
    repetition_penalty, no_repeat_ngram_size, min_new_tokens, bad_words_ids, suppress_tokens, forced_bos_token_id...
    would change the scores before the sampler sees them (and most of these have no neutral value but None). For the
    call the model's own config is therefore this neutral one.
    """
    device = next(model.parameters()).device
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                              top_k=None, eos_token_id=stops, pad_token_id=pad_id)
    own, model.generation_config = model.generation_config, config
    try:
        return model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                              generation_config=config, logits_processor=LogitsProcessorList([sampler]),
                              stopping_criteria=stopping)
    finally:
        model.generation_config = own


def generate(model, tokenizer, prompts: list[list[Message]] | list[str], max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 16, seed: int = 0,
             system_prompt: str | None = None) -> list[str]:
    """Complete each prompt; return the decoded completions, stripped, without special tokens.

    Chat prompts (lists of messages) go through the chat template with the assistant
    generation prompt; plain strings are continued as raw text. Greedy when ``temperature``
    is 0, else sampling with ``temperature`` and ``top_p``; prompt i is seeded by ``seed + i``, so
    its completion does not depend on ``batch_size``.
    """
    encoded = encode_prompts(tokenizer, prompts, system_prompt)
    stops = stop_token_ids(tokenizer, model)
    pad_id = pad_token_id(tokenizer)
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    bar = progress_bar(len(encoded), "generate", "prompt", single_step=len(encoded) <= batch_size)
    try:
        with torch.no_grad():
            for start in range(0, len(encoded), batch_size):
                input_ids, mask = left_pad(encoded[start:start + batch_size], pad_id)
                rows = [Decoding(temperature, top_p, seed + start + i) for i in range(len(input_ids))]
                sampler = RowSampler(rows, input_ids.shape[1])
                out = generate_rows(model, input_ids, mask, sampler, max_new_tokens, stops, pad_id)
                for row in out[:, input_ids.shape[1]:].tolist():
                    text = tokenizer.decode(cut_at_stop(row, set(stops)), skip_special_tokens=True)
                    outputs.append(text.strip())
                bar.update(len(out))
    finally:
        bar.close()
        model.train(was_training)
    return outputs
