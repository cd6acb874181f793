"""DoRA (weight-decomposed LoRA, arXiv 2402.09353) with peft's exact semantics.

The adapted weight is ``W' = m · (W + s·B·A) / ‖W + s·B·A‖`` with one magnitude ``m`` per output row
(the norm is over each row, the input dimension). As in the paper's section 4.3 and in peft, the
norm is a constant for the gradient (detached). Applied to a layer's output ``y = W x + bias``:
``y' = y + (f - 1)·(W x) + f·s·B(A(x))`` with ``f = m / ‖W + s·B·A‖``.
"""

from __future__ import annotations

import torch


def row_norm(weight: torch.Tensor, lora_weight: torch.Tensor, scaling: float) -> torch.Tensor:
    """``‖W + s·B·A‖`` per output row ([out]), in ``weight``'s dtype."""
    return torch.linalg.norm(weight + scaling * lora_weight, dim=1).to(weight.dtype)


def output_factor(magnitude: torch.Tensor, weight: torch.Tensor, lora_weight: torch.Tensor,
                  scaling: float) -> torch.Tensor:
    """``f = m / ‖W + s·B·A‖`` ([out]); the norm is detached, so only ``m`` and ``B·A`` (through the
    update term) get gradients, as in peft."""
    return magnitude.to(weight.dtype) / row_norm(weight, lora_weight.detach(), scaling).detach()


def update(factor: torch.Tensor, base_out: torch.Tensor, lora_out: torch.Tensor, scaling: float) -> torch.Tensor:
    """What DoRA adds to a layer's output: ``(f - 1)·(W x) + f·s·B(A(x))``; ``base_out`` is ``W x`` without bias."""
    return (factor - 1) * base_out + factor * lora_out * scaling


def merged_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """(``m/‖W + Δ‖ · (W + Δ)``, the row norms) in fp32; the norms are kept to unmerge exactly."""
    adapted = weight.float() + delta
    norm = torch.linalg.norm(adapted, dim=1)
    return (magnitude.float() / norm)[:, None] * adapted, norm


def unmerged_weight(merged: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor,
                    norm: torch.Tensor) -> torch.Tensor:
    """The base weight back from ``merged_weight``'s result, in fp32."""
    return merged.float() / (magnitude.float() / norm)[:, None] - delta
