"""Causal-LM cross-entropy computed in chunks, only on trained positions.

Full-vocabulary fp32 logits for every token are the largest tensor of a fine-tuning step
(tokens × vocab × 4 bytes). Here the output head runs only on positions whose next token is
trained, a chunk at a time, and each chunk's logits are recomputed in backward instead of stored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Targets for each position: the next token's label, -100 at the last position."""
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]
    return targets


def chunked_lm_loss(hidden: torch.Tensor, head: torch.nn.Linear | torch.nn.Module, labels: torch.Tensor,
                    chunk_tokens: int = 1024) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over trained positions, and their count.

    ``labels`` are aligned with the inputs (-100 = no loss); position i predicts labels[i + 1].
    """
    targets = shifted_targets(labels).reshape(-1)
    keep = targets != -100
    n = int(keep.sum())
    if n == 0:
        return hidden.sum() * 0.0, 0
    h = hidden.reshape(-1, hidden.shape[-1])[keep]
    t = targets[keep]
    weight, bias = head.weight, getattr(head, "bias", None)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk_tokens):
        hs, ts = h[start:start + chunk_tokens], t[start:start + chunk_tokens]
        if torch.is_grad_enabled() and (hs.requires_grad or weight.requires_grad):
            total = total + checkpoint(_chunk_loss, hs, weight, bias, ts, use_reentrant=False)
        else:
            total = total + _chunk_loss(hs, weight, bias, ts)
    return total, n
