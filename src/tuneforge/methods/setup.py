"""Decide what trains: full, freeze (partial) or LoRA, from the method config."""

from __future__ import annotations

import torch

from tuneforge.config import MethodConfig
from tuneforge.methods.freeze import apply_freeze
from tuneforge.methods.lora import apply_lora, format_trainable


def prepare_model(model: torch.nn.Module, method: MethodConfig) -> str:
    """Set ``requires_grad`` (and inject LoRA layers) per the method; return a one-line summary."""
    if method.name == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif method.name == "freeze":
        f = method.freeze
        apply_freeze(model, top_k_layers=f.top_k_layers, layers=f.layers, patterns=f.patterns)
    else:
        lo = method.lora
        apply_lora(model, r=lo.r, alpha=lo.alpha, dropout=lo.dropout, target_modules=lo.target_modules,
                   use_rslora=lo.use_rslora)
    return format_trainable(model)
