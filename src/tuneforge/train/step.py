"""One training step, the one place it is written: forward with the fused loss, backward, normalization, clip, update.

``train()``, validation, evaluation's example loss and every GPU benchmark call this module, so what the
benchmarks time is what the product runs.

:class:`CausalLMLoss` wraps an HF causal LM; its public ``forward`` runs the decoder and the chunked fused
loss (``tuneforge.train.loss``), like LitGPT's ``model(..., lm_head_chunk_size=)`` or torchtune's
LinearCrossEntropyLoss. Under FSDP2 this wrapper is the root module ``fully_shard`` wraps, so the root's
parameters (embeddings, final norm, head) are gathered for exactly the forward that reads them.

:class:`PreferenceLoss` is its sibling for preference pairs (DPO, IPO, ORPO, SimPO): its forward runs the reference
pass (when the objective has one) and the policy pass over both answers of every pair
(:mod:`tuneforge.train.preference`). Both wrappers say what a step's loss is divided by (``count``) and compute one
micro-batch's summed loss (``batch_loss``), so :func:`train_step` is the one step for every objective.

The loss of a step is divided by the units of the whole accumulated batch (all micro-batches, all processes):
trained tokens for SFT, pairs for a preference objective, so accumulation and the number of processes do not
change what a step means.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tuneforge.data.packing import IGNORE, PackedRow, collate, unpack
from tuneforge.errors import TuneforgeError
from tuneforge.train.attention import attention_mask, packing_refusal
from tuneforge.train.loss import CHUNK_TOKENS, chunked_lm_loss, logit_transform
from tuneforge.train.preference import PreferenceSettings, can_share_prompt, preference_step_loss

Batch = dict[str, torch.Tensor]


class CausalLMLoss(torch.nn.Module):
    """An HF causal LM whose forward returns the summed next-token loss of a batch and its trained-token count.

    ``chunk_tokens``: rows of logits the fused loss makes at once. ``amp``: the autocast dtype (None: off).
    ``activations``: a context manager factory entered around the decoder (e.g. offloading the tensors
    autograd saves, :class:`tuneforge.train.recompute.OffloadedActivations`); none by default.
    """

    def __init__(self, model: torch.nn.Module, chunk_tokens: int = CHUNK_TOKENS, amp: torch.dtype | None = None,
                 activations: Callable[[], contextlib.AbstractContextManager] | None = None) -> None:
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.amp = amp
        self.activations = activations or contextlib.nullcontext
        self.transform = logit_transform(model)  # the model's own output path: logit scale, soft-cap
        self.unpack = packing_refusal(model) is not None  # packed rows it cannot keep apart go one per row

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor,
                seq_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        device = next(self.model.parameters()).device
        if self.unpack and int(seq_ids.max()) > 0:
            rows = unpack({"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "seq_ids": seq_ids})
            input_ids, labels, position_ids, seq_ids = (rows[k] for k in ("input_ids", "labels", "position_ids",
                                                                         "seq_ids"))
        mask = attention_mask(self.model, seq_ids, device)
        amp = self.amp
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            with self.activations():
                hidden = self.model.base_model(input_ids=input_ids.to(device), attention_mask=mask,
                                               position_ids=position_ids.to(device),
                                               use_cache=False).last_hidden_state
            return chunked_lm_loss(hidden, self.model.get_output_embeddings(), labels.to(device), self.chunk_tokens,
                                   self.transform)

    def count(self, batch: Batch) -> int:
        """What a step's loss is divided by: the batch's trained tokens."""
        return trained_tokens(batch)

    def batch_loss(self, batch: Batch) -> tuple[torch.Tensor, int, dict[str, float]]:
        """The summed loss of one collated batch, its ``count`` and per-unit metrics (none for SFT)."""
        loss, n = batch_loss(self, batch)
        return loss, n, {}


class PreferenceLoss(CausalLMLoss):
    """An HF causal LM whose forward returns a preference objective summed over the pairs of a batch, the pair
    count, and the pairs' mean metrics (rewards, margins, accuracy, log-probs).

    ``reference``: the frozen copy for ``settings.reference == "model"``. It is kept out of the module tree:
    it is not trained, not checkpointed and not sharded. ``share_prompt``: whether packed pair batches for this
    model should share their prompt (``collate_pairs(..., share_prompt=)``): the settings ask for it and the
    model's attention can take the mask.
    """

    def __init__(self, model: torch.nn.Module, settings: PreferenceSettings, amp: torch.dtype | None = None,
                 activations: Callable[[], contextlib.AbstractContextManager] | None = None,
                 reference: torch.nn.Module | None = None) -> None:
        super().__init__(model, settings.chunk_tokens, amp, activations)
        self.settings = settings
        self.share_prompt = can_share_prompt(model, settings)
        object.__setattr__(self, "reference", reference)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor,
                seq_ids: torch.Tensor, sequence_index: torch.Tensor, ref_logps: torch.Tensor | None = None,
                branch_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, int, dict[str, float]]:
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "seq_ids": seq_ids,
                 "sequence_index": sequence_index}
        for key, value in (("ref_logps", ref_logps), ("branch_ids", branch_ids)):
            if value is not None:
                batch[key] = value
        loss, metrics = preference_step_loss(self.model, batch, self.settings, self.reference, self.amp,
                                             self.activations)
        n = int(metrics.pop("pairs"))
        return loss * n, n, metrics

    def count(self, batch: Batch) -> int:
        """What a step's loss is divided by: the batch's pairs."""
        return (int(batch["sequence_index"].max()) + 1) // 2

    def batch_loss(self, batch: Batch) -> tuple[torch.Tensor, int, dict[str, float]]:
        return self(batch["input_ids"], batch["labels"], batch["position_ids"], batch["seq_ids"],
                    batch["sequence_index"], batch.get("ref_logps"), batch.get("branch_ids"))


def batch_loss(loss_model: CausalLMLoss, batch: Batch) -> tuple[torch.Tensor, int]:
    """Summed next-token loss and trained-token count of one collated batch."""
    return loss_model(batch["input_ids"], batch["labels"], batch["position_ids"], batch["seq_ids"])


def trained_tokens(batch: Batch) -> int:
    """Positions whose next token is trained (the count the loss is divided by)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def _one_process_sum(value: Any) -> Any:
    return value


@dataclass
class StepResult:
    """What one optimizer step measured (summed over processes)."""

    loss: float  # mean per unit: trained token (SFT) or pair (preference)
    grad_norm: float
    lr: float
    trained: int  # trained tokens
    tokens: int  # real (non-padding) tokens
    metrics: dict[str, float] = field(default_factory=dict)  # the objective's own, mean per unit


def train_step(loss_model: CausalLMLoss, batches: Sequence[Batch], optimizer: torch.optim.Optimizer,
               scheduler: Any = None, max_grad_norm: float | None = None,
               all_sum: Callable[[Any], Any] = _one_process_sum) -> StepResult:
    """Forward and backward every micro-batch, then clip and take one optimizer (and scheduler) step.

    ``loss_model`` is a :class:`CausalLMLoss` or :class:`PreferenceLoss`; the step's loss is divided by the units
    (``loss_model.count``) of all micro-batches. ``all_sum`` sums a number over the processes (identity on one).
    Raises TuneforgeError, before the update, when the loss is not finite.
    """
    n_total = all_sum(sum(loss_model.count(b) for b in batches))
    step_loss, sums = 0.0, {}
    for b in batches:
        loss, n, metrics = loss_model.batch_loss(b)
        (loss / max(n_total, 1)).backward()
        step_loss += float(loss.detach())
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v * n
    loss_value = all_sum(step_loss) / max(n_total, 1)
    if not math.isfinite(loss_value):
        optimizer.zero_grad(set_to_none=True)
        raise TuneforgeError(f"loss became {loss_value}; stopping without saving these weights. Lower train.lr, "
                             "keep train.max_grad_norm set, or use fp32 (train.dtype=fp32).")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm else math.inf)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = all_sum(sum(int((b["seq_ids"] >= 0).sum()) for b in batches))
    trained = all_sum(sum(trained_tokens(b) for b in batches))
    metrics = {k: all_sum(v) / max(n_total, 1) for k, v in sums.items()}
    return StepResult(loss=loss_value, grad_norm=_scalar(grad_norm), lr=lr, trained=trained, tokens=tokens,
                      metrics=metrics)


def _scalar(t: torch.Tensor) -> float:
    """A float of a tensor that may be a DTensor (the norm of sharded gradients)."""
    full = getattr(t, "full_tensor", None)
    return float(full() if callable(full) else t)


@torch.no_grad()
def validation_loss(model: torch.nn.Module, rows: list[PackedRow], pad_id: int, batch_size: int,
                    chunk_tokens: int = CHUNK_TOKENS, amp: torch.dtype | None = None,
                    local_rows: Callable[[list[PackedRow]], list[PackedRow]] = _one_process_sum,
                    all_sum: Callable[[Any], Any] = _one_process_sum) -> float | None:
    """Mean per-token loss over ``rows`` (None when there are none).

    ``model`` is a :class:`CausalLMLoss` (its own chunking and autocast are used) or an HF causal LM, wrapped
    with ``chunk_tokens`` and ``amp``. Under torchrun each process takes its share of each batch (``local_rows``).
    """
    if not rows:
        return None
    loss_model = model if isinstance(model, CausalLMLoss) else CausalLMLoss(model, chunk_tokens, amp)
    batches = (collate(local_rows(rows[i:i + batch_size]), pad_id) for i in range(0, len(rows), batch_size))
    return validate(loss_model, batches, all_sum)[0]


@torch.no_grad()
def validate(loss_model: CausalLMLoss, batches: Iterable[Batch],
             all_sum: Callable[[Any], Any] = _one_process_sum) -> tuple[float, dict[str, float]]:
    """Mean loss per unit over ``batches`` (this process's share of each), and the objective's mean metrics."""
    was_training = loss_model.training
    loss_model.eval()
    total, count, sums = 0.0, 0, {}
    for b in batches:
        loss, n, metrics = loss_model.batch_loss(b)
        total, count = total + float(loss), count + n
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v * n
    loss_model.train(was_training)
    n_total = max(all_sum(count), 1)
    return all_sum(total) / n_total, {k: all_sum(v) / n_total for k, v in sums.items()}
