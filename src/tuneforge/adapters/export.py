"""Merge an adapter into the base weights: round-trip check, and export as a plain HF model directory."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from tuneforge.errors import ModelError
from tuneforge.files import replaced_atomically
from tuneforge.methods.lora import LoRALinear, lora_layers, merge_lora, unwrap_lora
from tuneforge.methods.peft_format import load_adapter
from tuneforge.models.generate import stop_token_ids
from tuneforge.models.load import load_model, load_tokenizer, pad_token_id


def merge_roundtrip_error(model: nn.Module, adapter_name: str = "default") -> float:
    """Merge then unmerge the adapter layer by layer; the largest absolute change left in a base weight.

    Layer by layer so only one weight copy is held at a time. Leaves the model as it was (up to the
    reported error, which is the rounding of the base dtype: ~1e-7 in fp32, ~1e-2 in bf16).
    """
    layers = lora_layers(model, adapter_name)
    if not layers:
        raise ModelError(f"the model has no LoRA adapter named {adapter_name!r}")
    worst = 0.0
    for path, layer in layers.items():
        if adapter_name in layer.merged_adapters:
            raise ModelError(f"adapter {adapter_name!r} is already merged in {path}; unmerge it first")
        before = layer.weight.detach().clone()
        layer.merge(adapter_name)
        layer.unmerge(adapter_name)
        worst = max(worst, (layer.weight.detach().float() - before.float()).abs().max().item())
    return worst


def untie_output_head(model: nn.Module) -> bool:
    """Give a head tied to the input embeddings its own weight copy; True when it was tied."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embed is None or head.weight is not embed.weight:
        return False
    linear = head.base_layer if isinstance(head, LoRALinear) else head
    linear.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
    # Without this, from_pretrained would re-tie the head to the embeddings and drop the merged delta.
    model.config.tie_word_embeddings = False
    text_config = model.config.get_text_config()
    if text_config is not model.config:
        text_config.tie_word_embeddings = False
    return True


def merge_and_unload(model: nn.Module, adapter_name: str = "default") -> list[str]:
    """Merge one adapter into the base weights and remove every LoRA layer; returns the merged paths.

    An adapter on a tied output head unties it first (the embeddings must stay unchanged).
    """
    layers = lora_layers(model, adapter_name)
    head = model.get_output_embeddings()
    if any(layer is head for layer in layers.values()):
        untie_output_head(model)
    merged = merge_lora(model, adapter_name)
    unwrap_lora(model)
    return merged


def export_merged(base_ref: str, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike,
                  dtype: torch.dtype = torch.float32, overwrite: bool = False) -> Path:
    """Write base + adapter, merged, as a Hugging Face safetensors directory (model, tokenizer, generation config).

    The generation config stops at the end-of-turn token as well as eos. Written under a temporary
    name and renamed, so a failure never leaves a half-written model.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ModelError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
    tokenizer = load_tokenizer(base_ref)
    model = load_model(base_ref, dtype=dtype).eval()
    load_adapter(model, adapter_dir, "merged")
    merge_and_unload(model, "merged")
    gen = model.generation_config
    gen.eos_token_id = stop_token_ids(tokenizer, model)
    gen.pad_token_id = pad_token_id(tokenizer)
    with replaced_atomically(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out
