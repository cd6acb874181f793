"""The attention mask a training batch needs, and the attention kernel that reads it.

Rows that hold one example each only need a padding mask, and SDPA keeps its fused causal kernel. Packed
rows need each example to see only itself. On a GPU that is a FlexAttention document mask: a block-sparse
mask that skips every tile lying between two examples, so attention costs what the examples cost, not what
the row's length would. On the CPU, where FlexAttention has no fast kernel, it is a dense block-causal mask.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

FLEX = "flex_attention"


def block_causal_mask(seq_ids: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask [B, 1, L, L] from ``seq_ids`` [B, L]: True where a query may attend a key.

    A query attends keys of its own example at or before it. HF models take it as ``attention_mask``.
    """
    length = seq_ids.shape[-1]
    same = seq_ids[:, :, None] == seq_ids[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=seq_ids.device).tril()
    return (same & causal)[:, None]


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keyword arguments for an HF causal LM's forward: ids, position ids and the block-causal mask."""
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
            "attention_mask": block_causal_mask(batch["seq_ids"])}


def use_document_attention(model: torch.nn.Module, device: torch.device) -> bool:
    """Switch ``model`` to FlexAttention on a GPU (where packed rows then get block-sparse masks).

    Models with attention dropout stay on SDPA (HF's FlexAttention path has no dropout).
    """
    if device.type != "cuda" or getattr(model.config, "attention_dropout", 0.0):
        return False
    if model.config._attn_implementation == FLEX:
        return True
    try:
        model.set_attn_implementation(FLEX)
    except (ValueError, ImportError, AttributeError):  # an architecture or version without it: keep SDPA
        return False
    return model.config._attn_implementation == FLEX


def document_mask(seq_ids: torch.Tensor) -> BlockMask:
    """A FlexAttention BlockMask from ``seq_ids`` [B, L]: a query sees earlier keys of its own example."""
    from torch.nn.attention.flex_attention import create_block_mask  # optional dependency: torch>=2.5, GPU path

    def same_example_causal(b, h, q, kv):
        return (seq_ids[b, q] == seq_ids[b, kv]) & (q >= kv)

    batch, length = seq_ids.shape
    return create_block_mask(same_example_causal, batch, None, length, length, device=seq_ids.device)


def attention_mask(model: torch.nn.Module, seq_ids: torch.Tensor, device: torch.device) -> torch.Tensor | BlockMask:
    """The ``attention_mask`` to pass with a batch whose example ids are ``seq_ids`` (-1 = padding)."""
    if getattr(model.config, "_attn_implementation", None) == FLEX:
        return document_mask(seq_ids.to(device))
    if int(seq_ids.max()) <= 0:
        return (seq_ids >= 0).long().to(device)
    return block_causal_mask(seq_ids).to(device)
