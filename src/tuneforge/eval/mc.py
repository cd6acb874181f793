"""Multiple choice by log-likelihood: the model picks the option it finds most probable as its answer.

Each option is scored as the assistant's whole reply: log P(option + end-of-turn | chat prompt).
Including the end-of-turn token means an option that is only the start of a likelier answer is not
favoured. Two accuracies are reported, as in lm-evaluation-harness: ``mc`` takes the option with the
highest summed log-probability; ``mc_norm`` divides by the option's length in characters first
(so long options are not penalized for having more tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

from tuneforge.data.template import CHATML_TEMPLATE, _eot_markers
from tuneforge.eval.items import EvalItem
from tuneforge.eval.scoring import continuation_logprobs
from tuneforge.models.generate import encode_prompts
from tuneforge.models.load import pad_token_id


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids the chat template puts right after an assistant reply (e.g. ``<|im_end|>``); [] if none."""
    probe = "TFREPLYq7Zx"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}],
                                         tokenize=False,
                                         chat_template=getattr(tokenizer, "chat_template", None) or _chatml())
    after = text[text.find(probe) + len(probe):].lstrip(" ")
    marker = next((m for m in _eot_markers(tokenizer) if after.startswith(m)), None)
    return [tokenizer.convert_tokens_to_ids(marker)] if marker else []


def _chatml() -> str:
    return CHATML_TEMPLATE


@dataclass
class ChoiceResult:
    """Per item: the option picked by summed and by length-normalized log-probability."""

    picked: int
    picked_norm: int
    logprobs: list[float]


def score_choices(model, tokenizer, items: list[EvalItem], batch_size: int = 32,
                  system_prompt: str | None = None) -> list[ChoiceResult]:
    """Log-likelihood of every option of every item (items must have ``choices``)."""
    contexts = encode_prompts(tokenizer, [it.prompt for it in items], system_prompt)
    eot = end_of_turn_ids(tokenizer)
    pairs, owner = [], []
    for i, (it, ctx) in enumerate(zip(items, contexts, strict=True)):
        if not it.choices:
            raise ValueError(f"{it.source}: item has no choices")
        for c in it.choices:
            pairs.append((ctx, tokenizer(c, add_special_tokens=False)["input_ids"] + eot))
            owner.append(i)
    pad = pad_token_id(tokenizer)
    scores = continuation_logprobs(model, pairs, pad_id=pad, batch_size=batch_size)
    per_item: list[list[float]] = [[] for _ in items]
    for i, s in zip(owner, scores, strict=True):
        per_item[i].append(s.logprob)
    out = []
    for it, lps in zip(items, per_item, strict=True):
        norm = [lp / max(len(c), 1) for lp, c in zip(lps, it.choices, strict=True)]
        out.append(ChoiceResult(picked=max(range(len(lps)), key=lps.__getitem__),
                                picked_norm=max(range(len(norm)), key=norm.__getitem__), logprobs=lps))
    return out


def choice_hits(results: list[ChoiceResult], items: list[EvalItem]) -> tuple[list[bool], list[bool]]:
    """Per item: correct by summed log-probability, correct by length-normalized log-probability."""
    return ([r.picked == it.answer_index for r, it in zip(results, items, strict=True)],
            [r.picked_norm == it.answer_index for r, it in zip(results, items, strict=True)])
