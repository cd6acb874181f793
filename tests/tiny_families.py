"""Tiny seeded random causal LMs of the Hugging Face families, built from transformers' config classes.

Shared by the per-family tests (LoRA variants, freeze, 4-bit loading); nothing is downloaded.
"""

from __future__ import annotations

import torch
import transformers
from torch import nn

SMALL = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 64, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
MOE = {"num_key_value_heads": 2, "num_experts_per_tok": 2}
FAMILIES = {
    "gpt2": ("GPT2Config", {"vocab_size": 64, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64,
                            "bos_token_id": 0, "eos_token_id": 0}),
    "phi3": ("Phi3Config", {**SMALL, "num_key_value_heads": 2}),
    "gpt_neox": ("GPTNeoXConfig", SMALL),
    "falcon": ("FalconConfig", SMALL),
    "bloom": ("BloomConfig", {"vocab_size": 64, "hidden_size": 32, "n_layer": 2, "n_head": 4,
                              "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}),
    "mpt": ("MptConfig", {"vocab_size": 64, "d_model": 32, "n_heads": 4, "n_layers": 2}),
    "mixtral": ("MixtralConfig", {**SMALL, **MOE, "num_local_experts": 4}),
    "qwen2_moe": ("Qwen2MoeConfig", {**SMALL, **MOE, "num_experts": 4, "moe_intermediate_size": 16,
                                     "shared_expert_intermediate_size": 32}),
    "qwen3_moe": ("Qwen3MoeConfig", {**SMALL, **MOE, "num_experts": 4, "moe_intermediate_size": 16}),
    "olmoe": ("OlmoeConfig", {**SMALL, **MOE, "num_experts": 4}),
    "gpt_oss": ("GptOssConfig", {**SMALL, **MOE, "num_local_experts": 4, "head_dim": 8}),
    "opt": ("OPTConfig", {**SMALL, "ffn_dim": 64, "word_embed_proj_dim": 32}),
    "llama": ("LlamaConfig", {**SMALL, "num_key_value_heads": 2}),
}


def tiny(family: str) -> nn.Module:
    """A seeded random model of ``family`` in eval mode."""
    config_class, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**kwargs)
    return transformers.AutoModelForCausalLM.from_config(config).eval()
