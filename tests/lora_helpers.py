"""Helpers shared by the adapter tests: random non-zero LoRA B matrices and saved test adapters."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from tuneforge.methods.lora import apply_lora, lora_layers
from tuneforge.methods.peft_format import save_adapter


def randomize_b(model: nn.Module, adapter: str = "default", seed: int = 1, std: float = 0.2) -> None:
    """Give every LoRA B of ``adapter`` random values, so the adapter changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model, adapter).values():
            w = layer.lora_B[adapter].weight
            w.copy_(torch.randn(w.shape, generator=gen) * std)


def make_adapter(base: nn.Module, out, targets, r: int, seed: int, alpha_per_r: float = 2.0, std: float = 0.2,
                 rslora: bool = False, base_name: str = "") -> Path:
    """Save an adapter of a copy of ``base`` with random A and non-zero random B; return its path."""
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    apply_lora(model, r=r, alpha=alpha_per_r * r, target_modules=targets, use_rslora=rslora)
    randomize_b(model, seed=seed, std=std)
    return save_adapter(model, out, base_model_name_or_path=base_name)
