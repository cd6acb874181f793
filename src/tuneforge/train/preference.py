"""Preference objectives (DPO, IPO, ORPO, SimPO) and the fused per-sequence log-probs they need.

Every objective is a function of four numbers per pair: the summed log-prob of the chosen and of the
rejected answer under the policy (and, for DPO/IPO, under a reference), and the two answers' trained-token
counts. Those come from one forward over a batch holding both answers of each pair
(:func:`tuneforge.data.preference.collate_pairs`): as two documents, or as one ``[prompt | chosen | rejected]``
that computes the prompt once (``share_prompt``); there the prompt's last hidden state predicts the first token
of both answers (:func:`predictor_positions`).

The log-probs are computed from the final hidden states and the output head a chunk of trained positions
at a time, never as full-vocabulary logits (like :mod:`tuneforge.train.loss`). Unlike the SFT loss, the
gradient of the objective w.r.t. a token's log-prob is not known in forward (it depends on the whole pair),
so the forward keeps, per trained token, d logp / d hidden = (onehot - softmax) @ W (tokens × hidden), and
backward scales it by the upstream gradient of the token's sequence. A trainable head's gradient needs
each token's softmax once more: backward recomputes the chunk logits for it (full fine-tuning only; with
LoRA/QLoRA the head is frozen and nothing is recomputed).

Reference log-probs, for DPO and IPO: with LoRA/QLoRA the same model with its adapters switched off
(:func:`tuneforge.methods.lora.disable_adapters`, no second copy in memory); for full fine-tuning a frozen copy
(:func:`frozen_reference`) or log-probs precomputed in one no-grad pass (:func:`precompute_reference_logps`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from tuneforge.config import RunConfig
from tuneforge.data.packing import IGNORE
from tuneforge.data.preference import PROMPT, REJECTED, TokenizedPair, collate_pairs
from tuneforge.errors import ConfigError
from tuneforge.log import get_logger
from tuneforge.methods.lora import disable_adapters, lora_layers
from tuneforge.train.attention import attention_mask, shared_prompt_refusal
from tuneforge.train.loss import CHUNK_TOKENS, IDENTITY, LogitTransform, _compute_dtype, logit_transform

logger = get_logger(__name__)

OBJECTIVES = ("dpo", "ipo", "orpo", "simpo")
REFERENCE_MODES = ("auto", "adapters_off", "model", "precomputed")
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "orpo": 0.1, "simpo": 2.0}
_NEEDS_REFERENCE = ("dpo", "ipo")


@dataclass(frozen=True)
class PreferenceSettings:
    """How a preference step computes its loss.

    ``beta``: DPO/IPO/SimPO temperature (None: ``DEFAULT_BETA`` of the objective; for ORPO it is unused,
    ``orpo_lambda`` weighs the odds-ratio term). ``label_smoothing``: conservative DPO/SimPO (the share of
    labels assumed flipped). ``simpo_gamma``: SimPO's target margin. ``reference`` (DPO/IPO only):
    ``adapters_off`` (LoRA/QLoRA), ``model`` (a frozen copy passed to the step), ``precomputed`` (batch
    ``ref_logps``), or ``auto`` (precomputed when the batch has them, else adapters_off when the model has
    LoRA layers, else the model passed). ``share_prompt``: with packing, each pair is one document
    ``[prompt | chosen | rejected]`` (the prompt computed once) where the model's attention can take that mask.
    """

    objective: str = "dpo"
    beta: float | None = None
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    orpo_lambda: float = 0.1
    reference: str = "auto"
    chunk_tokens: int = CHUNK_TOKENS
    share_prompt: bool = True

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"train.objective: '{self.objective}' is not a preference objective; use one of "
                              f"{', '.join(OBJECTIVES)}")
        if self.reference not in REFERENCE_MODES:
            raise ConfigError(f"preference.reference: '{self.reference}' is unknown; use one of "
                              f"{', '.join(REFERENCE_MODES)}")
        if self.beta is not None and not self.beta > 0:
            raise ConfigError(f"preference.beta: must be > 0 (e.g. 0.1 for DPO, 2.0 for SimPO), got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"preference.label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        if not self.orpo_lambda >= 0:
            raise ConfigError(f"preference.orpo_lambda: must be >= 0 (e.g. 0.1), got {self.orpo_lambda}")
        if self.chunk_tokens < 1:
            raise ConfigError(f"train.loss_chunk_tokens: must be positive, got {self.chunk_tokens}")

    @property
    def resolved_beta(self) -> float:
        return DEFAULT_BETA[self.objective] if self.beta is None else self.beta

    @property
    def needs_reference(self) -> bool:
        return self.objective in _NEEDS_REFERENCE


def settings_for(config: RunConfig) -> PreferenceSettings:
    """The preference settings of a run, ``reference: auto`` resolved.

    auto: the reference is the model as it is before step 1. For a fresh LoRA/QLoRA adapter (B = 0) that is
    the base with adapters off; for full/freeze, or an adapter started from ``method.lora.init_adapter``, its
    log-probs are precomputed in one pass (no second copy in memory).
    """
    p, method = config.preference, config.method
    lora = method.name in ("lora", "qlora")
    reference = p.reference
    if reference == "auto":
        reference = "adapters_off" if lora and not method.lora.init_adapter else "precomputed"
    elif reference == "adapters_off" and not lora:
        raise ConfigError(f"preference.reference: adapters_off needs method lora or qlora, not {method.name}; "
                          "use model (a frozen copy) or precomputed")
    return PreferenceSettings(objective=config.train.objective, beta=p.beta, label_smoothing=p.label_smoothing,
                              simpo_gamma=p.simpo_gamma, orpo_lambda=p.orpo_lambda, reference=reference,
                              chunk_tokens=config.train.loss_chunk_tokens, share_prompt=p.share_prompt)


def can_share_prompt(model: torch.nn.Module, settings: PreferenceSettings) -> bool:
    """Whether pair batches for ``model`` may share their prompt: ``settings`` ask for it and the model's attention
    takes the mask (when it cannot, the two-document layout is used, and the user is told why)."""
    if not settings.share_prompt:
        return False
    reason = shared_prompt_refusal(model)
    if reason is not None:
        logger.info(f"preference.share_prompt: {model.config.model_type} cannot compute the prompt once for both "
                    f"answers ({reason}); each answer is a document with its own copy of the prompt")
    return reason is None


# --- objectives: pure functions of per-sequence log-probs -----------------------------------------


@dataclass
class PairLogps:
    """Summed log-probs [pairs] of each answer, trained-token counts, and the reference's (DPO/IPO)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None


@dataclass
class ObjectiveResult:
    """The loss (mean over pairs), each pair's implicit rewards, and objective-specific extras."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    extras: dict[str, torch.Tensor]


def _sigmoid_loss(x: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """-log σ(βx), with a share ``label_smoothing`` of the pairs assumed flipped (conservative DPO)."""
    return -(1 - label_smoothing) * F.logsigmoid(beta * x) - label_smoothing * F.logsigmoid(-beta * x)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _ref_ratios(lp: PairLogps) -> tuple[torch.Tensor, torch.Tensor]:
    if lp.ref_chosen is None or lp.ref_rejected is None:
        raise ValueError("this objective needs reference log-probs")
    return lp.chosen - lp.ref_chosen, lp.rejected - lp.ref_rejected


def dpo_loss(lp: PairLogps, beta: float, label_smoothing: float = 0.0) -> ObjectiveResult:
    """DPO (sigmoid), conservative with ``label_smoothing`` > 0; rewards β·(logp - ref logp)."""
    chosen, rejected = _ref_ratios(lp)
    losses = _sigmoid_loss(chosen - rejected, beta, label_smoothing)
    return ObjectiveResult(losses.mean(), beta * chosen.detach(), beta * rejected.detach(), {})


def ipo_loss(lp: PairLogps, beta: float) -> ObjectiveResult:
    """IPO: (Δ - 1/(2β))² with Δ the difference of per-token log-ratios (length-normalized, as TRL and the
    IPO authors do); rewards β·(logp - ref logp)."""
    chosen, rejected = _ref_ratios(lp)
    delta = chosen / lp.chosen_tokens.clamp(min=1) - rejected / lp.rejected_tokens.clamp(min=1)
    losses = (delta - 1 / (2 * beta)) ** 2
    return ObjectiveResult(losses.mean(), beta * chosen.detach(), beta * rejected.detach(), {})


def orpo_loss(lp: PairLogps, lam: float) -> ObjectiveResult:
    """ORPO: NLL of the chosen answers (per trained token) + λ·(-log σ(log odds ratio)) on mean log-probs.

    No reference. Rewards λ·(mean log-prob), as TRL logs them.
    """
    avg_c = lp.chosen / lp.chosen_tokens.clamp(min=1)
    avg_r = lp.rejected / lp.rejected_tokens.clamp(min=1)
    log_odds = (avg_c - avg_r) - (_log1mexp(avg_c) - _log1mexp(avg_r))
    ratio = F.logsigmoid(log_odds)
    nll = -lp.chosen.sum() / lp.chosen_tokens.sum().clamp(min=1)
    extras = {"nll": nll.detach(), "log_odds_ratio": ratio.detach().mean(), "log_odds_chosen": log_odds.detach().mean()}
    return ObjectiveResult(nll - lam * ratio.mean(), lam * avg_c.detach(), lam * avg_r.detach(), extras)


def simpo_loss(lp: PairLogps, beta: float, gamma: float, label_smoothing: float = 0.0) -> ObjectiveResult:
    """SimPO: -log σ(β·(mean logp chosen - mean logp rejected) - γ); no reference. Rewards β·mean logp."""
    avg_c = lp.chosen / lp.chosen_tokens.clamp(min=1)
    avg_r = lp.rejected / lp.rejected_tokens.clamp(min=1)
    losses = _sigmoid_loss(avg_c - avg_r - gamma / beta, beta, label_smoothing)
    return ObjectiveResult(losses.mean(), beta * avg_c.detach(), beta * avg_r.detach(), {})


def objective_loss(settings: PreferenceSettings, lp: PairLogps) -> ObjectiveResult:
    """The loss of ``settings.objective`` on ``lp``."""
    beta = settings.resolved_beta
    if settings.objective == "dpo":
        return dpo_loss(lp, beta, settings.label_smoothing)
    if settings.objective == "ipo":
        return ipo_loss(lp, beta)
    if settings.objective == "orpo":
        return orpo_loss(lp, settings.orpo_lambda)
    return simpo_loss(lp, beta, settings.simpo_gamma, settings.label_smoothing)


def preference_metrics(result: ObjectiveResult, lp: PairLogps) -> dict[str, float]:
    """Means over the batch's pairs: rewards, margin, preference accuracy, summed log-probs, extras."""
    c, r = result.chosen_rewards, result.rejected_rewards
    metrics = {"rewards/chosen": c.mean(), "rewards/rejected": r.mean(), "rewards/margins": (c - r).mean(),
               "rewards/accuracies": (c > r).float().mean(), "logps/chosen": lp.chosen.detach().mean(),
               "logps/rejected": lp.rejected.detach().mean(), **result.extras}
    out = {k: float(v) for k, v in metrics.items()}
    out["pairs"] = float(lp.chosen.numel())
    return out


# --- fused per-sequence log-probs -----------------------------------------------------------------


def _chunks(h_all: torch.Tensor, rows: torch.Tensor, chunk_tokens: int,
            dtype: torch.dtype) -> Iterator[tuple[int, int, torch.Tensor]]:
    for start in range(0, rows.numel(), chunk_tokens):
        end = min(start + chunk_tokens, rows.numel())
        yield start, end, h_all.index_select(0, rows[start:end]).to(dtype)


def _dlogp_dlogits(logits: torch.Tensor, lse: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """onehot(t) - softmax, built in place in the fp32 ``logits``."""
    d = logits.sub_(lse[:, None]).exp_().neg_()
    d[torch.arange(t.numel(), device=t.device), t] += 1.0
    return d


def _sums(hidden, weight, bias, rows, targets, seq, n_seq, chunk_tokens, compute_dtype, transform, need_h):
    """Per-sequence summed log-probs and, with ``need_h``, each trained token's d logp / d hidden."""
    h_all = hidden.reshape(-1, hidden.shape[-1])
    with torch.autocast(hidden.device.type, enabled=False):
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        sums = torch.zeros(n_seq, dtype=torch.float32, device=hidden.device)
        grad_h = h_all.new_empty((rows.numel(), h_all.shape[-1])) if need_h else None
        for start, end, h in _chunks(h_all, rows, chunk_tokens, compute_dtype):
            t = targets[start:end]
            logits = F.linear(h, w, b).float()
            slope = transform.apply_(logits)
            lse = torch.logsumexp(logits, dim=-1)
            sums.index_add_(0, seq[start:end], logits.gather(1, t[:, None]).squeeze(1) - lse)
            if grad_h is not None:
                d = transform.backward_(_dlogp_dlogits(logits, lse, t), slope)
                grad_h[start:end] = d.to(compute_dtype) @ w
            del logits
    return sums, grad_h


class _SequenceLogps(torch.autograd.Function):
    """Per-sequence sums of log softmax(hidden[rows] @ W.T + b)[targets]; see the module docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, rows, targets, seq, n_seq, chunk_tokens, compute_dtype, transform,
                need_h, need_w, need_b):
        sums, grad_h = _sums(hidden, weight, bias, rows, targets, seq, n_seq, chunk_tokens, compute_dtype, transform,
                             need_h)
        ctx.chunk_tokens, ctx.compute_dtype, ctx.need_w, ctx.need_b = chunk_tokens, compute_dtype, need_w, need_b
        ctx.transform = transform
        ctx.hidden_shape = hidden.shape
        saved_hidden = hidden if (need_w or need_b) else None
        ctx.save_for_backward(rows, targets, seq, grad_h, saved_hidden, weight, bias)
        return sums

    @staticmethod
    def backward(ctx, grad_sums):
        rows, targets, seq, grad_h, hidden, weight, bias = ctx.saved_tensors
        g = grad_sums.float().index_select(0, seq)  # each token's share: its sequence's upstream gradient
        d_hidden = d_weight = d_bias = None
        if grad_h is not None and ctx.needs_input_grad[0]:
            d_hidden = grad_h.new_zeros((math.prod(ctx.hidden_shape[:-1]), grad_h.shape[-1]))
            # add, not copy: a shared prompt's last position predicts the first token of both answers
            d_hidden.index_add_(0, rows, grad_h * g[:, None].to(grad_h.dtype))
            d_hidden = d_hidden.view(ctx.hidden_shape)
        if ctx.need_w or ctx.need_b:
            d_weight, d_bias = _head_grads(hidden, weight, bias, rows, targets, g, ctx)
        return d_hidden, d_weight, d_bias, None, None, None, None, None, None, None, None, None, None


def _head_grads(hidden, weight, bias, rows, targets, g, ctx):
    """Gradients of a trainable head: the chunk logits are recomputed, scaled by each token's upstream gradient."""
    h_all = hidden.reshape(-1, hidden.shape[-1])
    cd = ctx.compute_dtype
    gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.need_w else None
    gb = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if ctx.need_b else None
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        w = weight.to(cd)
        b = bias.to(cd) if bias is not None else None
        for start, end, h in _chunks(h_all, rows, ctx.chunk_tokens, cd):
            t = targets[start:end]
            logits = F.linear(h, w, b).float()
            slope = ctx.transform.apply_(logits)
            d = _dlogp_dlogits(logits, torch.logsumexp(logits, dim=-1), t).mul_(g[start:end, None])
            d = ctx.transform.backward_(d, slope)
            if gb is not None:
                gb += d.sum(0)
            if gw is not None:
                gw += (d.to(cd).t() @ h).float()
    return (gw.to(weight.dtype) if gw is not None else None, gb.to(bias.dtype) if gb is not None else None)


def predictor_positions(branch_ids: torch.Tensor) -> torch.Tensor:
    """The position [B, L] whose hidden state predicts each token: the one before it, except that the first token
    of a rejected answer sharing its prompt is predicted from the prompt's last token (as in its own row)."""
    positions = torch.arange(branch_ids.shape[1], device=branch_ids.device).expand_as(branch_ids)
    rejected = branch_ids == REJECTED
    first_rejected = rejected.clone()
    first_rejected[:, 1:] &= ~rejected[:, :-1]
    last_prompt = torch.where(branch_ids == PROMPT, positions, -1).cummax(dim=1).values
    return torch.where(first_rejected, last_prompt, positions - 1)


def _scored(labels: torch.Tensor, sequence_index: torch.Tensor, branch_ids: torch.Tensor | None,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat hidden rows that predict the trained tokens, the tokens, and their sequences (row-major order)."""
    labels = labels.to(device)
    keep = labels != IGNORE
    keep[:, 0] = False  # nothing predicts a row's first token
    b, j = keep.nonzero(as_tuple=True)
    before = j - 1 if branch_ids is None else predictor_positions(branch_ids.to(device))[b, j]
    return b * labels.shape[1] + before, labels[b, j], sequence_index.to(device)[b, j]


def sequence_logps(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor,
                   sequence_index: torch.Tensor, n_sequences: int, chunk_tokens: int = CHUNK_TOKENS,
                   branch_ids: torch.Tensor | None = None,
                   transform: LogitTransform = IDENTITY) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the trained tokens of each sequence [S] (fp32), and their counts [S].

    ``labels`` [B, L] are aligned with the inputs (-100 = not scored; position i predicts labels[i + 1], or as
    :func:`predictor_positions` says for ``branch_ids``); ``sequence_index`` [B, L] gives each token's sequence
    in ``range(n_sequences)`` (-1 on padding). ``head`` is the output projection (``weight``, optional ``bias``),
``transform`` what the model applies to its output (``loss.logit_transform``).
    Differentiable w.r.t. ``hidden`` and a trainable head, without full-vocabulary logits.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    device = hidden.device
    rows, targets, seq = _scored(labels, sequence_index, branch_ids, device)
    counts = torch.bincount(seq, minlength=n_sequences)
    weight, bias = head.weight, getattr(head, "bias", None)
    grad_on = torch.is_grad_enabled()
    need_h = grad_on and hidden.requires_grad
    need_w = grad_on and weight.requires_grad
    need_b = grad_on and bias is not None and bias.requires_grad
    if rows.numel() == 0:
        # zeros that still reach every trainable input: under FSDP each process must produce every gradient
        zero = hidden.sum() * 0.0 if need_h else 0.0
        for p, need in ((weight, need_w), (bias, need_b)):
            if need:
                zero = zero + p.sum() * 0.0
        return torch.zeros(n_sequences, device=device) + zero, counts
    args = (hidden, weight, bias, rows, targets, seq, n_sequences, chunk_tokens, _compute_dtype(hidden), transform)
    if not (need_h or need_w or need_b):
        with torch.no_grad():
            return _sums(*args, need_h=False)[0], counts
    return _SequenceLogps.apply(*args, need_h, need_w, need_b), counts


# --- the model: policy and reference passes ---------------------------------------------------------


def batch_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int = CHUNK_TOKENS,
                amp: torch.dtype | None = None,
                activations: Callable[[], AbstractContextManager] = nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs and trained-token counts of every sequence of a pair batch, in batch order.

    ``activations`` is entered around the decoder (e.g. activation offloading), as in the SFT loss.
    A batch whose pairs share their prompt (``branch_ids``) is refused for a model that cannot take its mask.
    """
    device = next(model.parameters()).device
    branch_ids = batch.get("branch_ids")
    if branch_ids is not None and (reason := shared_prompt_refusal(model)) is not None:
        raise ConfigError(f"preference.share_prompt: {model.config.model_type} cannot compute the prompt once for "
                          f"both answers ({reason}); set preference.share_prompt: false")
    mask = attention_mask(model, batch["seq_ids"], device, branch_ids)
    n_seq = int(batch["sequence_index"].max()) + 1
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        with activations():
            hidden = model.base_model(input_ids=batch["input_ids"].to(device), attention_mask=mask,
                                      position_ids=batch["position_ids"].to(device),
                                      use_cache=False).last_hidden_state
        return sequence_logps(hidden, model.get_output_embeddings(), batch["labels"],
                              batch["sequence_index"], n_seq, chunk_tokens, branch_ids, logit_transform(model))


def frozen_reference(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of ``model`` (eval mode, no gradients): the DPO reference for full fine-tuning."""
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    return ref.eval()


def _reference_mode(settings: PreferenceSettings, model: torch.nn.Module, batch: dict[str, torch.Tensor],
                    reference: torch.nn.Module | None) -> str:
    mode = settings.reference
    if mode == "auto":
        if "ref_logps" in batch:
            return "precomputed"
        if reference is not None:
            return "model"
        return "adapters_off" if lora_layers(model) else "missing"
    return mode


@torch.no_grad()
def reference_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], settings: PreferenceSettings,
                    reference: torch.nn.Module | None = None, amp: torch.dtype | None = None) -> torch.Tensor:
    """The reference's summed log-probs of every sequence of ``batch`` [S], by ``settings.reference``."""
    mode = _reference_mode(settings, model, batch, reference)
    if mode == "precomputed":
        if "ref_logps" not in batch:
            raise ConfigError("preference.reference: precomputed, but the batch has no reference log-probs; "
                              "run precompute_reference_logps over the pairs first")
        return batch["ref_logps"].to(next(model.parameters()).device, torch.float32)
    if mode == "model":
        if reference is None:
            raise ConfigError("preference.reference: model needs the reference model; pass reference=")
        return batch_logps(reference, batch, settings.chunk_tokens, amp)[0]
    if mode == "missing":
        raise ConfigError(f"train.objective: {settings.objective} needs a reference model, and this model has no "
                          "LoRA adapters to switch off; set preference.reference to model or precomputed, or use "
                          "orpo/simpo (no reference)")
    with disable_adapters(model):
        return batch_logps(model, batch, settings.chunk_tokens, amp)[0]


def precompute_reference_logps(model: torch.nn.Module, pairs: list[TokenizedPair], pad_id: int,
                               batch_size: int = 8, chunk_tokens: int = CHUNK_TOKENS, amp: torch.dtype | None = None,
                               adapters_off: bool = False) -> list[TokenizedPair]:
    """One no-grad pass over ``pairs``: copies with ``ref_logps`` set to ``model``'s (chosen, rejected) log-probs.

    Run it before training (full fine-tuning: the model is still the reference), or with
    ``adapters_off`` on a LoRA model at any time.
    """
    out: list[TokenizedPair] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), (disable_adapters(model) if adapters_off else nullcontext()):
            for i in range(0, len(pairs), batch_size):
                part = pairs[i:i + batch_size]
                logps = batch_logps(model, collate_pairs(part, pad_id), chunk_tokens, amp)[0].tolist()
                out += [replace(p, ref_logps=(logps[2 * k], logps[2 * k + 1])) for k, p in enumerate(part)]
    finally:
        model.train(was_training)
    return out


def split_pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected entries of a per-sequence tensor in batch order ``[c0, r0, c1, r1, ...]``."""
    return values[0::2], values[1::2]


def preference_step_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], settings: PreferenceSettings,
                         reference: torch.nn.Module | None = None, amp: torch.dtype | None = None,
                         activations: Callable[[], AbstractContextManager] = nullcontext,
                         ) -> tuple[torch.Tensor, dict[str, float]]:
    """The objective's loss on one pair batch (mean over its pairs) and its metrics.

    One forward over both answers of every pair; for DPO/IPO a no-grad reference pass as
    ``settings.reference`` says (``reference``: the frozen model for mode ``model``). With gradient
    accumulation, weight each micro-batch's loss by its share of the pairs (``metrics["pairs"]``).
    The reference pass runs first, so the policy's activations are the last thing the forward leaves.
    """
    ref = reference_logps(model, batch, settings, reference, amp) if settings.needs_reference else None
    logps, counts = batch_logps(model, batch, settings.chunk_tokens, amp, activations)
    chosen, rejected = split_pairs(logps)
    n_chosen, n_rejected = split_pairs(counts)
    lp = PairLogps(chosen, rejected, n_chosen, n_rejected)
    if ref is not None:
        lp.ref_chosen, lp.ref_rejected = split_pairs(ref)
    result = objective_loss(settings, lp)
    return result.loss, preference_metrics(result, lp)
