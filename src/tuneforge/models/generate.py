"""Batched text generation from chat prompts or raw text, greedy or sampled."""

from __future__ import annotations

import logging
import os

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from tuneforge.data.conversation import Message
from tuneforge.data.template import CHATML_TEMPLATE, EOT_MARKERS
from tuneforge.log import get_logger
from tuneforge.models.load import pad_token_id


def chat_template(tokenizer) -> str:
    """The tokenizer's chat template, or ChatML when it has none."""
    return getattr(tokenizer, "chat_template", None) or CHATML_TEMPLATE


def render_chat(tokenizer, messages: list[Message], system_prompt: str | None = None) -> str:
    """Render a conversation as text ending with the assistant generation prompt."""
    turns = [{"role": m.role, "content": m.content} for m in messages]
    if system_prompt is not None and not any(t["role"] == "system" for t in turns):
        turns.insert(0, {"role": "system", "content": system_prompt})
    return tokenizer.apply_chat_template(turns, chat_template=chat_template(tokenizer),
                                         add_generation_prompt=True, tokenize=False)


def encode_prompts(tokenizer, prompts: list[list[Message]] | list[str],
                   system_prompt: str | None = None) -> list[list[int]]:
    """Token ids of each prompt: chats through the template, plain strings as they are."""
    ids = []
    for p in prompts:
        if isinstance(p, str):
            ids.append(tokenizer(p)["input_ids"])
        else:
            text = render_chat(tokenizer, p, system_prompt)
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


def generate(model, tokenizer, prompts: list[list[Message]] | list[str], max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 16, seed: int = 0,
             system_prompt: str | None = None) -> list[str]:
    """Complete each prompt; return the decoded completions, stripped, without special tokens.

    Chat prompts (lists of messages) go through the chat template with the assistant
    generation prompt; plain strings are continued as raw text. Greedy when ``temperature``
    is 0, else sampling with ``temperature`` and ``top_p`` (seeded by ``seed``).
    """
    encoded = encode_prompts(tokenizer, prompts, system_prompt)
    stops = stop_token_ids(tokenizer, model)
    pad_id = pad_token_id(tokenizer)
    sample = temperature > 0
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample,
                              temperature=temperature if sample else None,
                              top_p=top_p if sample else None, top_k=None,
                              eos_token_id=stops, pad_token_id=pad_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    bar = progress_bar(len(encoded), "generate", "prompt", single_step=len(encoded) <= batch_size)
    try:
        cuda = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            torch.manual_seed(seed)
            for start in range(0, len(encoded), batch_size):
                input_ids, mask = left_pad(encoded[start:start + batch_size], pad_id)
                out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                     generation_config=config)
                for row in out[:, input_ids.shape[1]:].tolist():
                    text = tokenizer.decode(cut_at_stop(row, set(stops)), skip_special_tokens=True)
                    outputs.append(text.strip())
                bar.update(len(out))
    finally:
        bar.close()
        model.train(was_training)
    return outputs
