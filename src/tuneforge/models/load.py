"""Load a causal LM and its tokenizer from a resolved model reference."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tuneforge.errors import ModelError
from tuneforge.models.resolve import resolve_model


def load_tokenizer(ref: str, trust_remote_code: bool = False):
    """Load the tokenizer for a model reference, with a pad token set."""
    path = resolve_model(ref)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ModelError(offline_hint(ref, e)) from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def pad_token_id(tokenizer) -> int:
    """The id that fills padding: the tokenizer's pad token, else its eos token, else 0.

    Padding is always masked out, so the value matters only for being a valid id.
    """
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def load_model(ref: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
               trust_remote_code: bool = False) -> torch.nn.Module:
    """Load a causal LM (SDPA attention) for a model reference onto ``device``."""
    path = resolve_model(ref)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa",
                                                     trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ModelError(offline_hint(ref, e)) from e
    return model.to(device)


def empty_model(ref: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> torch.nn.Module:
    """The causal LM of a model reference on the meta device: its structure and shapes, no memory, no weights."""
    path = resolve_model(ref)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ModelError(offline_hint(ref, e)) from e
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa",
                                                trust_remote_code=trust_remote_code)


def offline_hint(ref: str, error: Exception) -> str:
    """A message for a reference transformers could not load, saying why and what to do."""
    return (f"could not load model '{ref}': {error}\n"
            "If this is a hub id, this machine may be offline: download the model elsewhere and "
            "pass its local directory, or use the builtin 'smollm2-135m'.")
