"""Decide what trains: full, freeze (partial), LoRA or QLoRA, from the method config."""

from __future__ import annotations

import torch

from tuneforge.config import LoraSettings, MethodConfig, RunConfig
from tuneforge.errors import ConfigError
from tuneforge.log import get_logger
from tuneforge.methods.freeze import apply_freeze
from tuneforge.methods.lora import LoRALinear, apply_lora, format_trainable, lora_layers
from tuneforge.methods.lora_groups import group_projections
from tuneforge.methods.lora_params import apply_lora_params, describe_targets, parameter_targets
from tuneforge.models.load import empty_model, load_model
from tuneforge.models.quantized_load import load_model_4bit
from tuneforge.quant.fp8 import Linear8, check_fp8_device, convertible
from tuneforge.quant.linear4bit import Linear4bit, quantize_model
from tuneforge.quant.nf4_gpu import fp8_convertible

logger = get_logger(__name__)


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU: the dtype 4-bit weights are dequantized to."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def gpu_weight_dtype(method: str, train_dtype: str = "auto") -> str:
    """The dtype non-quantized weights load in on a GPU: ``bf16`` for a frozen LoRA base (it needs no fp32
    master copy: half the memory and the reads), else ``fp32`` (master weights of what trains)."""
    return "bf16" if method == "lora" and train_dtype != "fp32" else "fp32"


def load_model_for(config: RunConfig, device: torch.device, placement: str = "device") -> torch.nn.Module:
    """Load the model as the method needs it: ``qlora`` quantizes each linear weight as it is read.

    ``placement``: ``device`` loads onto ``device``; ``host`` into CPU memory in the dtype it will have on
    ``device``; ``meta`` builds the structure only, no weights (``host`` and ``meta`` are a sharded load's
    rank 0 and other ranks; not for ``qlora``).
    """
    if config.method.name == "qlora":
        q = config.method.quant
        return load_model_4bit(config.model, quant_type=q.quant_type, double_quant=q.double_quant,
                               compute_dtype=compute_dtype(device), device=device,
                               trust_remote_code=config.trust_remote_code,
                               attn_implementation=config.attn_implementation)
    bf16 = device.type == "cuda" and gpu_weight_dtype(config.method.name, config.train.dtype) == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    if placement == "meta":
        return empty_model(config.model, dtype=dtype, trust_remote_code=config.trust_remote_code,
                           attn_implementation=config.attn_implementation)
    return load_model(config.model, dtype=dtype, device=str(device) if placement == "device" else "cpu",
                      trust_remote_code=config.trust_remote_code, attn_implementation=config.attn_implementation)


def prepare_model(model: torch.nn.Module, method: MethodConfig, device: torch.device | None = None) -> str:
    """Set ``requires_grad`` (and inject LoRA layers) per the method; return a one-line summary.

    ``device`` is where training runs (default: where the weights are); an FP8 base is checked against it.
    """
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
                   use_rslora=lo.use_rslora, use_dora=lo.use_dora)
        params = parameter_targets(model, lo.target_modules, lo.target_parameters)  # MoE experts (routers opt-in)
        if params and lo.use_dora:
            raise ConfigError("method.lora.use_dora=true cannot adapt MoE expert/router parameters (nor can peft); "
                              "set method.lora.target_parameters: [] to put DoRA on the Linear layers only")
        if params:
            apply_lora_params(model, params, lo.r, lo.alpha, lo.use_rslora)
        if (targets := describe_targets(model)) is not None:
            logger.info(targets)
        lora_speedups(model, lo, device or next(model.parameters()).device)
        if isinstance(model.get_output_embeddings(), LoRALinear):  # the fused loss reads the head's weight only
            raise ConfigError(f"method.lora.target_modules={lo.target_modules!r} puts LoRA on the output head, "
                              "which training does not support; leave the head out (all-linear already does)")
    return format_trainable(model)


def lora_speedups(model: torch.nn.Module, lora: LoraSettings, device: torch.device) -> None:
    """What the LoRA settings ask of a model whose adapters are in place: an FP8 base, grouped projections."""
    if lora.base_precision == "fp8":
        to_fp8_base(model, device)
    if lora.group_projections and not lora.use_dora:  # q/k/v and gate/up: one GEMM for their LoRA A (lora_groups.py)
        group_projections(model)


def to_fp8_base(model: torch.nn.Module, device: torch.device) -> int:
    """Put the frozen base of every LoRA layer on FP8 GEMMs; returns how many layers were converted.

    A 16-bit base Linear becomes a :class:`Linear8` (e4m3 weights in memory); a 4-bit one (QLoRA) stays 4-bit and
    computes in FP8 from codes made on the fly (``Linear4bit.fp8``). Raises ConfigError when ``device`` has no FP8
    matrix units. Layers with a dimension that is not a multiple of 16 (or, 4-bit, rows that are not whole blocks)
    keep their 16-bit compute.
    """
    check_fp8_device(device)
    n = 0
    for layer in lora_layers(model).values():
        base = layer.base_layer
        if isinstance(base, Linear4bit) and fp8_convertible(base.quantized):
            base.fp8 = True
        elif convertible(base):
            layer.base_layer = Linear8.from_linear(base)
        else:
            continue
        n += 1
    return n
