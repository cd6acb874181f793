"""The attention mask a training batch needs, and the attention kernel that reads it.

Rows that hold one example each only need a padding mask: the model builds its own causal (and sliding-window)
masks from it, and SDPA keeps its fused causal kernel. Packed rows need each example to see only itself, under
the same per-layer rule the model applies alone: full causal attention, or a sliding window on the layers that
have one (Mistral, Gemma2/3, Starcoder2, Cohere2, GPT-OSS, Qwen with ``use_sliding_window``). A model that builds
one mask per layer type (``config.layer_types``) gets a mask per type; one that shares a mask gets that mask.
On a GPU these are FlexAttention document masks: block-sparse masks that skip every tile lying between two
examples, so attention costs what the examples cost, not what the row's length would. On the CPU they are dense
block-causal masks (additive floats for eager attention, which adds its mask to the scores).

Some models cannot see a packed row as separate examples (:func:`packing_refusal`): ALiBi biases built from a
2D padding mask (Bloom, MPT, Falcon with ``alibi``), no position ids, chunked or non-attention layers. Their
packed batches are split back into one example per row (:func:`tuneforge.data.packing.unpack`): exact, at the
cost of padding.

Preference pairs can share their prompt (:func:`tuneforge.data.preference.collate_pairs` with ``share_prompt``):
one document ``[prompt | chosen | rejected]`` whose ``branch_ids`` say which part a token is in. Both answers see
the prompt and their own earlier tokens, never the other answer, so the prompt runs once for both. Only models
whose every layer is full causal attention over position ids take that mask (:func:`shared_prompt_refusal`).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tuneforge.data.preference import PROMPT
from tuneforge.errors import ConfigError
from tuneforge.log import get_logger

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

logger = get_logger(__name__)

FLEX = "flex_attention"
FULL, SLIDING = "full_attention", "sliding_attention"
SHARED = "shared"
"""Key of :attr:`AttentionLayout.windows` for a model that passes one mask to every layer."""


@dataclass(frozen=True)
class AttentionLayout:
    """How a model's layers attend: the sliding window of each mask it builds (None: full causal), keyed by
    layer type when it builds one mask per type (else one key, ``SHARED``), and why packed rows cannot be exact
    for it (None when they can)."""

    windows: dict[str, int | None]
    refusal: str | None = None

    @property
    def per_layer_type(self) -> bool:
        return SHARED not in self.windows


def attention_layout(model: torch.nn.Module) -> AttentionLayout:
    """The :class:`AttentionLayout` of an HF causal LM, read from its config and its decoder's forward."""
    config = model.config
    base = type(model.base_model)
    window = getattr(config, "sliding_window", None) or None
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    if _takes_mask_per_layer_type(base):
        kinds = set(getattr(config, "layer_types", None) or [FULL]) & {FULL, SLIDING}
        return AttentionLayout({kind: window if kind == SLIDING else None for kind in kinds}, _packing_refusal(model))
    shared = window if _source_mentions(base, "create_sliding_window_causal_mask") else None
    return AttentionLayout({SHARED: shared}, _packing_refusal(model))


def packing_refusal(model: torch.nn.Module) -> str | None:
    """Why packed rows cannot be computed exactly for ``model`` (None when they can)."""
    return attention_layout(model).refusal


# config keys that list each layer's kind, and the kinds that are attention (or attention's MLP) under a mask
_LAYER_KIND_KEYS = ("layer_types", "block_types", "layers_block_type")
_MASKED_KINDS = {FULL, SLIDING, "attention", "moe", "mlp"}


def _packing_refusal(model: torch.nn.Module) -> str | None:
    config = model.config
    kinds = {kind for key in _LAYER_KIND_KEYS for kind in (getattr(config, key, None) or [])}
    if kinds - _MASKED_KINDS:
        return f"its layers include {', '.join(sorted(kinds - _MASKED_KINDS))}, which no attention mask confines"
    if any(key.startswith(("mamba", "ssm", "linear_")) for key in config.to_dict()):
        return "it has state-space or linear-attention layers, which no attention mask confines"
    attn_config = getattr(config, "attn_config", None)
    if (getattr(config, "alibi", False) or getattr(attn_config, "alibi", False)
            or config.model_type == "bloom"):
        return "its ALiBi position biases are built from a 2D padding mask"
    if getattr(config, "attention_chunk_size", None):
        return f"it uses chunked attention (chunks of {config.attention_chunk_size})"
    if "position_ids" not in inspect.signature(model.base_model.forward).parameters:
        return "its forward takes no position_ids"
    if config._attn_implementation.startswith("flash_attention"):
        return f"{config._attn_implementation} takes no attention mask of this kind"
    return None


@functools.cache
def _takes_mask_per_layer_type(base: type) -> bool:
    """Whether the decoder takes a dict of prepared masks keyed by layer type (transformers 5 hybrid models)."""
    return _source_mentions(base, "attention_mask, dict)")


@functools.cache
def _source_mentions(base: type, text: str) -> bool:
    try:
        return text in inspect.getsource(base.forward)
    except (OSError, TypeError):  # no source (compiled or generated code): assume the plain path
        return False


def block_causal_mask(seq_ids: torch.Tensor, branch_ids: torch.Tensor | None = None,
                      window: int | None = None) -> torch.Tensor:
    """Boolean attention mask [B, 1, L, L] from ``seq_ids`` [B, L]: True where a query may attend a key.

    A query attends keys of its own example at or before it (and less than ``window`` tokens back); with
    ``branch_ids`` [B, L] only those in the prompt or in its own branch. HF models take it as ``attention_mask``.
    """
    length = seq_ids.shape[-1]
    allowed = seq_ids[:, :, None] == seq_ids[:, None, :]
    allowed &= torch.ones(length, length, dtype=torch.bool, device=seq_ids.device).tril()
    if window is not None:
        allowed &= torch.ones(length, length, dtype=torch.bool, device=seq_ids.device).triu(1 - window)
    if branch_ids is not None:
        allowed &= (branch_ids[:, None, :] == PROMPT) | (branch_ids[:, :, None] == branch_ids[:, None, :])
    return allowed[:, None]


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keyword arguments for an HF causal LM's forward: ids, position ids and the block-causal mask."""
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
            "attention_mask": block_causal_mask(batch["seq_ids"])}


def use_document_attention(model: torch.nn.Module, device: torch.device) -> bool:
    """Prepare ``model`` for packed rows: FlexAttention on a GPU (block-sparse document masks).

    A model whose packed rows cannot be exact is told to the user: its batches are unpacked, one example per row.
    Models with attention dropout stay on SDPA (HF's FlexAttention path has no dropout).
    """
    refusal = packing_refusal(model)
    if refusal is not None:
        logger.info(f"data.packing: {model.config.model_type} cannot keep packed examples apart exactly "
                    f"({refusal}); each example gets its own padded row instead (set data.packing: false to "
                    "batch that way from the start)")
        return False
    if device.type != "cuda" or getattr(model.config, "attention_dropout", 0.0):
        return False
    if model.config._attn_implementation == FLEX:
        return True
    try:
        model.set_attn_implementation(FLEX)
    except (ValueError, ImportError, AttributeError):  # an architecture or version without it: keep SDPA
        return False
    return model.config._attn_implementation == FLEX


def document_mask(seq_ids: torch.Tensor, branch_ids: torch.Tensor | None = None,
                  window: int | None = None) -> BlockMask:
    """A FlexAttention BlockMask from ``seq_ids`` [B, L]: a query sees earlier keys of its own example (less than
    ``window`` tokens back; and, with ``branch_ids``, only those in the prompt or its own branch: the rule of
    :func:`block_causal_mask`)."""
    from torch.nn.attention.flex_attention import create_block_mask  # optional dependency: torch>=2.5, GPU path

    def same_example_causal(b, h, q, kv):
        return (seq_ids[b, q] == seq_ids[b, kv]) & (q >= kv)

    def in_window(b, h, q, kv):
        return same_example_causal(b, h, q, kv) & (q - kv < window)

    causal = same_example_causal if window is None else in_window

    def same_branch_causal(b, h, q, kv):
        branch = (branch_ids[b, kv] == PROMPT) | (branch_ids[b, q] == branch_ids[b, kv])
        return causal(b, h, q, kv) & branch

    batch, length = seq_ids.shape
    mask_mod = causal if branch_ids is None else same_branch_causal
    return create_block_mask(mask_mod, batch, None, length, length, device=seq_ids.device)


def attention_mask(model: torch.nn.Module, seq_ids: torch.Tensor, device: torch.device,
                   branch_ids: torch.Tensor | None = None) -> torch.Tensor | BlockMask | dict:
    """The ``attention_mask`` to pass with a batch whose example ids are ``seq_ids`` (-1 = padding) and, for pairs
    sharing their prompt, whose branches are ``branch_ids``: a padding mask for one example per row, else the
    packed mask of each of the model's layer types (a dict keyed by type when the model takes one per type)."""
    if branch_ids is None and int(seq_ids.max()) <= 0:
        return (seq_ids >= 0).long().to(device)
    layout = attention_layout(model)
    if layout.refusal is not None:
        raise ConfigError(f"data.packing: {model.config.model_type} cannot keep packed examples apart exactly "
                          f"({layout.refusal}); set data.packing: false")
    seq_ids = seq_ids.to(device)
    if branch_ids is not None:
        branch_ids = branch_ids.to(device)
    if model.config._attn_implementation == FLEX:
        masks = {kind: document_mask(seq_ids, branch_ids, w) for kind, w in layout.windows.items()}
    else:
        masks = {kind: _dense(model, block_causal_mask(seq_ids, branch_ids, w)) for kind, w in layout.windows.items()}
    return masks if layout.per_layer_type else masks[SHARED]


def _dense(model: torch.nn.Module, allowed: torch.Tensor) -> torch.Tensor:
    """``allowed`` as the model's attention reads it: boolean for SDPA, additive (0 / most negative) for eager."""
    if model.config._attn_implementation == "sdpa":
        return allowed
    dtype = model.dtype
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed,
                                                                                      torch.finfo(dtype).min)


def shared_prompt_refusal(model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot take a shared-prompt mask (None when it can).

    The layout places the rejected answer after the chosen one in the row, so it is only equal to two rows when
    every layer is full causal attention that reads positions from ``position_ids`` and the mask from the one
    passed: a sliding window, chunked or linear attention would see the row's layout, not the mask's.
    """
    config = model.config
    kinds = set(getattr(config, "layer_types", None) or [FULL])
    if kinds != {FULL}:
        return f"its layers are {', '.join(sorted(kinds))}, not all full attention"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return f"it uses sliding-window attention (window {config.sliding_window})"
    return packing_refusal(model)  # chunked attention among others
