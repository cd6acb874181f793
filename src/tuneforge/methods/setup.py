"""Decide what trains: full, freeze (partial), LoRA or QLoRA, from the method config."""

from __future__ import annotations

import torch

from tuneforge.config import MethodConfig, RunConfig
from tuneforge.methods.freeze import apply_freeze
from tuneforge.methods.lora import apply_lora, format_trainable
from tuneforge.models.load import load_model
from tuneforge.quant.linear4bit import Linear4bit, quantize_model
from tuneforge.train.plan import gpu_weight_dtype


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU: the dtype 4-bit weights are dequantized to."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model_for(config: RunConfig, device: torch.device) -> torch.nn.Module:
    """Load the model as the method needs it: ``qlora`` quantizes each linear weight as it is read."""
    if config.method.name == "qlora":
        from tuneforge.models.quantized_load import load_model_4bit

        q = config.method.quant
        return load_model_4bit(config.model, quant_type=q.quant_type, double_quant=q.double_quant,
                               compute_dtype=compute_dtype(device), device=device,
                               trust_remote_code=config.trust_remote_code)
    # a frozen LoRA base needs no fp32 master copy on a GPU: bf16 halves its memory and its reads
    dtype = torch.bfloat16 if device.type == "cuda" and gpu_weight_dtype(config) == "bf16" else torch.float32
    return load_model(config.model, dtype=dtype, device=str(device), trust_remote_code=config.trust_remote_code)


def prepare_model(model: torch.nn.Module, method: MethodConfig) -> str:
    """Set ``requires_grad`` (and inject LoRA layers) per the method; return a one-line summary."""
    if method.name == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif method.name == "freeze":
        f = method.freeze
        apply_freeze(model, top_k_layers=f.top_k_layers, layers=f.layers, patterns=f.patterns)
    else:
        if method.name == "qlora" and not any(isinstance(m, Linear4bit) for m in model.modules()):
            device = next(model.parameters()).device
            quantize_model(model, quant_type=method.quant.quant_type, double_quant=method.quant.double_quant,
                           compute_dtype=compute_dtype(device))
        lo = method.lora
        apply_lora(model, r=lo.r, alpha=lo.alpha, dropout=lo.dropout, target_modules=lo.target_modules,
                   use_rslora=lo.use_rslora)
    return format_trainable(model)
