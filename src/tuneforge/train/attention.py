"""The attention mask a training batch needs, and the attention kernel that reads it.

Rows that hold one example each only need a padding mask, and SDPA keeps its fused causal kernel. Packed
rows need each example to see only itself. On a GPU that is a FlexAttention document mask: a block-sparse
mask that skips every tile lying between two examples, so attention costs what the examples cost, not what
the row's length would. On the CPU, where FlexAttention has no fast kernel, it is a dense block-causal mask.

Preference pairs can share their prompt (:func:`tuneforge.data.preference.collate_pairs` with ``share_prompt``):
one document ``[prompt | chosen | rejected]`` whose ``branch_ids`` say which part a token is in. Both answers see
the prompt and their own earlier tokens, never the other answer, so the prompt runs once for both. Only models
whose every layer is full causal attention over position ids take that mask (:func:`shared_prompt_refusal`).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import torch

from tuneforge.data.preference import PROMPT

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

FLEX = "flex_attention"


def block_causal_mask(seq_ids: torch.Tensor, branch_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean attention mask [B, 1, L, L] from ``seq_ids`` [B, L]: True where a query may attend a key.

    A query attends keys of its own example at or before it; with ``branch_ids`` [B, L] only those in the
    prompt or in its own branch. HF models take it as ``attention_mask``.
    """
    length = seq_ids.shape[-1]
    allowed = seq_ids[:, :, None] == seq_ids[:, None, :]
    allowed &= torch.ones(length, length, dtype=torch.bool, device=seq_ids.device).tril()
    if branch_ids is not None:
        allowed &= (branch_ids[:, None, :] == PROMPT) | (branch_ids[:, :, None] == branch_ids[:, None, :])
    return allowed[:, None]


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


def document_mask(seq_ids: torch.Tensor, branch_ids: torch.Tensor | None = None) -> BlockMask:
    """A FlexAttention BlockMask from ``seq_ids`` [B, L]: a query sees earlier keys of its own example (and, with
    ``branch_ids``, only those in the prompt or its own branch: the rule of :func:`block_causal_mask`)."""
    from torch.nn.attention.flex_attention import create_block_mask  # optional dependency: torch>=2.5, GPU path

    def same_example_causal(b, h, q, kv):
        return (seq_ids[b, q] == seq_ids[b, kv]) & (q >= kv)

    def same_branch_causal(b, h, q, kv):
        branch = (branch_ids[b, kv] == PROMPT) | (branch_ids[b, q] == branch_ids[b, kv])
        return same_example_causal(b, h, q, kv) & branch

    batch, length = seq_ids.shape
    mask_mod = same_example_causal if branch_ids is None else same_branch_causal
    return create_block_mask(mask_mod, batch, None, length, length, device=seq_ids.device)


def attention_mask(model: torch.nn.Module, seq_ids: torch.Tensor, device: torch.device,
                   branch_ids: torch.Tensor | None = None) -> torch.Tensor | BlockMask:
    """The ``attention_mask`` to pass with a batch whose example ids are ``seq_ids`` (-1 = padding) and, for pairs
    sharing their prompt, whose branches are ``branch_ids``."""
    if branch_ids is not None:
        branch_ids = branch_ids.to(device)
    if getattr(model.config, "_attn_implementation", None) == FLEX:
        return document_mask(seq_ids.to(device), branch_ids)
    if branch_ids is None and int(seq_ids.max()) <= 0:
        return (seq_ids >= 0).long().to(device)
    return block_causal_mask(seq_ids.to(device), branch_ids)


def shared_prompt_refusal(model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot take a shared-prompt mask (None when it can).

    The layout places the rejected answer after the chosen one in the row, so it is only equal to two rows when
    every layer is full causal attention that reads positions from ``position_ids`` and the mask from the one
    passed: a sliding window, chunked or linear attention would see the row's layout, not the mask's.
    """
    config = model.config
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        return f"its layers are {', '.join(sorted(kinds))}, not all full attention"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return f"it uses sliding-window attention (window {config.sliding_window})"
    if getattr(config, "attention_chunk_size", None):
        return f"it uses chunked attention (chunks of {config.attention_chunk_size})"
    if "position_ids" not in inspect.signature(model.base_model.forward).parameters:
        return "its forward takes no position_ids"
    return None
