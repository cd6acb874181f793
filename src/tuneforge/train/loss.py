"""Causal-LM cross-entropy with the output head fused in: chunked, trained positions only, no recompute.

Full-vocabulary logits for every token are the largest tensor of a fine-tuning step
(tokens × vocab × 4 bytes in fp32). Here the output head runs only on positions whose next token is
trained, a chunk of rows at a time, so at most one chunk's logits exist at once.

The head and the cross-entropy are one ``torch.autograd.Function`` (the idea behind Liger's
FusedLinearCrossEntropy and Unsloth's fused loss; this is our own code). While a chunk's logits
are live, its forward computes the loss (fp32 logsumexp) and at once the gradient of the loss
w.r.t. the logits, ``softmax - onehot``, and from it

- the gradient w.r.t. the chunk's hidden states, ``dlogits @ W`` (kept, in hidden's dtype, for the
  trained rows only), and
- when the head is trainable, ``dlogits^T @ h`` added into one fp32 weight-gradient accumulator
  (and the bias gradient likewise).

The loss is a scalar, so backward only multiplies those stored gradients by ``grad_output``.
Unlike checkpointing each chunk, this never runs the head a second time in backward (one
tokens × hidden × vocab matmul saved per step), and unlike plain autograd it never keeps logits.

The Function does the casting autocast would do for ``F.linear``: with autocast on for hidden's
device, the matmuls run in the autocast dtype, else in hidden's dtype; the gradients it returns
have the dtypes of the inputs.

The logits are the model's own: :func:`logit_transform` reads what a model does after its head (Cohere's
``logit_scale``, Granite's ``logits_scaling``, Gemma2/3's ``final_logit_softcapping``) and the loss applies
it, in fp32, with its derivative in the gradient. A model whose forward transforms the logits in a way not
known here is refused rather than trained on logits it never produces.
"""

from __future__ import annotations

import functools
import inspect
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tuneforge.errors import ModelError

_AUTOCAST_CASTABLE = (torch.float16, torch.bfloat16, torch.float32)
# aten::addmm.dtype_out (recent torch): a bf16 GEMM accumulating into an fp32 output; without it, added apart
_ADDMM_OUT_DTYPE = "dtype_out" in torch.ops.aten.addmm.overloads()
CHUNK_TOKENS = 256
"""Default tokens per loss chunk: a chunk's logits and their gradient (bf16 and fp32 copies) are ~8 bytes per token
and vocabulary entry, 256 MiB at Llama-3's 128,256 (1 GiB at 1,024 tokens, which left an 8B QLoRA run 0.7 GiB
above bitsandbytes+PEFT+Liger's peak on an H200); the head's GEMM stays large enough to run at full rate."""


@dataclass(frozen=True)
class LogitTransform:
    """What a model applies to its head's output: ``softcap * tanh(scale * logits / softcap)`` (no cap: ``scale *
    logits``)."""

    scale: float = 1.0
    softcap: float | None = None

    def apply_(self, logits: torch.Tensor) -> torch.Tensor | None:
        """Transform fp32 ``logits`` in place; returns d(output)/d(input) per element when it is not constant."""
        if self.scale != 1.0:
            logits.mul_(self.scale)
        if self.softcap is None:
            return None
        logits.div_(self.softcap).tanh_()
        slope = (1.0 - logits.square()).mul_(self.scale)
        logits.mul_(self.softcap)
        return slope

    def backward_(self, grad: torch.Tensor, slope: torch.Tensor | None) -> torch.Tensor:
        """Carry ``grad`` w.r.t. the model's logits back to the head's output, in place (``slope`` from ``apply_``)."""
        if slope is not None:
            return grad.mul_(slope)
        return grad.mul_(self.scale) if self.scale != 1.0 else grad


IDENTITY = LogitTransform()
# the statements that may follow the head in a transformers forward, with what each does to the logits
_STEPS = ((re.compile(r"\* self\.logit_scale\b"), "mul", "logit_scale"),
          (re.compile(r"/ self\.config\.logits_scaling\b"), "div", "logits_scaling"),
          (re.compile(r"\* self\.config\.logits_scaling\b"), "mul", "logits_scaling"),
          (re.compile(r"\* self\.model\.lm_head_multiplier\b"), "mul", "lm_head_multiplier"),
          (re.compile(r"final_logit_softcapping|torch\.tanh\(logits\)"), "cap", "final_logit_softcapping"),
          (re.compile(r"logits\.float\(\)$"), "cast", None))


def logit_transform(model: torch.nn.Module) -> LogitTransform:
    """The transform ``model``'s forward applies to its head's output, read from the statements that follow the
    head in its source and the config values they use; a statement not known here is refused."""
    config, scale, softcap = model.config, 1.0, None
    for op, key in _steps_after_head(type(model)):
        value = getattr(config, key, None) if key else None
        if op == "mul" and value is not None:
            scale *= float(value)
        elif op == "div" and value is not None:
            scale /= float(value)
        elif op == "cap" and value is not None:
            softcap = float(value)
    return LogitTransform(scale, softcap)


@functools.cache
def _steps_after_head(cls: type) -> frozenset[tuple[str, str | None]]:
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):  # remote or compiled code without source: nothing to read
        return frozenset()
    head_line, *rest = source.split("self.lm_head(", 1)[-1].split("loss", 1)[0].splitlines()
    statements = [head_line] if re.search(r"\)\s*[*/]", head_line) else []
    statements += [line.strip() for line in rest  # assignments, not a ``logits=`` keyword argument
                   if re.match(r"\s*logits\s*=", line) and not line.rstrip().endswith(",")]
    steps = set()
    for statement in statements:
        known = [(op, key) for pattern, op, key in _STEPS if pattern.search(statement)]
        if not known:
            raise ModelError(f"{cls.__name__} transforms its output logits ({statement.strip()}) in a way "
                             "tuneforge's fused loss does not reproduce; training it would optimize logits the "
                             "model never produces. Please report it with the model's name")
        steps.update(known)
    return frozenset(steps)


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Targets for each position: the next token's label, -100 at the last position."""
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]
    return targets


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run ``F.linear`` on ``hidden`` in."""
    device_type = hidden.device.type
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know
        return hidden.dtype
    if enabled and hidden.dtype in _AUTOCAST_CASTABLE:
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


def _chunks(h_all: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
            dtype: torch.dtype) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """(start, end, hidden states in ``dtype``, targets) of each chunk of the trained rows."""
    for start in range(0, rows.numel(), chunk_tokens):
        end = min(start + chunk_tokens, rows.numel())
        yield start, end, h_all.index_select(0, rows[start:end]).to(dtype), targets[start:end]


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  transform: LogitTransform) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 logits of a chunk as the model outputs them, and their per-element slope w.r.t. the head's output
    when it is not ``transform.scale``; inputs already in the compute dtype, autocast off."""
    logits = F.linear(h, weight, bias).float()
    return logits, transform.apply_(logits)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden[rows] @ weight.T + bias`` against ``targets``, grads made in forward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                rows: torch.Tensor, targets: torch.Tensor, chunk_tokens: int, compute_dtype: torch.dtype,
                transform: LogitTransform, need_h: bool, need_w: bool, need_b: bool) -> torch.Tensor:
        h_all = hidden.reshape(-1, hidden.shape[-1])
        n = rows.numel()
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute_dtype)
            b = bias.to(compute_dtype) if bias is not None else None
            grad_h = h_all.new_empty((n, h_all.shape[-1])) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start, end, h, t in _chunks(h_all, rows, targets, chunk_tokens, compute_dtype):
                logits, slope = _chunk_logits(h, w, b, transform)
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                # d loss / d logits = softmax - onehot, built in place in the fp32 logits
                dlogits = logits.sub_(lse[:, None]).exp_()
                dlogits[torch.arange(end - start, device=t.device), t] -= 1.0
                dlogits = transform.backward_(dlogits, slope)  # back through the soft-cap and scale
                if grad_b is not None:
                    grad_b += dlogits.sum(0)
                dlogits = dlogits.to(compute_dtype)
                if grad_h is not None:
                    if compute_dtype == grad_h.dtype:
                        torch.mm(dlogits, w, out=grad_h[start:end])
                    else:
                        grad_h[start:end] = dlogits @ w
                if grad_w is not None:
                    if compute_dtype == torch.float32:
                        grad_w.addmm_(dlogits.t(), h)
                    elif h.is_cuda and _ADDMM_OUT_DTYPE:  # the bf16 GEMM accumulates into the fp32 gradient
                        torch.addmm(grad_w, dlogits.t(), h, out_dtype=torch.float32, out=grad_w)
                    else:
                        grad_w += dlogits.t() @ h
                del logits, dlogits
        ctx.hidden_shape = hidden.shape
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(rows, grad_h, grad_w, grad_b)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        rows, grad_h, grad_w, grad_b = ctx.saved_tensors
        d_hidden = d_weight = d_bias = None
        if grad_h is not None and ctx.needs_input_grad[0]:
            d_hidden = grad_h.new_zeros((math.prod(ctx.hidden_shape[:-1]), grad_h.shape[-1]))
            d_hidden.index_copy_(0, rows, grad_h)
            d_hidden = d_hidden.mul_(grad_output).view(ctx.hidden_shape)  # in hidden's dtype (bf16 on a GPU)
        if grad_w is not None and ctx.needs_input_grad[1]:
            d_weight = (grad_w * grad_output).to(ctx.weight_dtype)
        if grad_b is not None and ctx.needs_input_grad[2]:
            d_bias = (grad_b * grad_output).to(ctx.bias_dtype)
        return d_hidden, d_weight, d_bias, None, None, None, None, None, None, None, None


@torch.no_grad()
def _plain_chunked_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        rows: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
                        compute_dtype: torch.dtype, transform: LogitTransform) -> torch.Tensor:
    h_all = hidden.reshape(-1, hidden.shape[-1])
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        for _, _, h, t in _chunks(h_all, rows, targets, chunk_tokens, compute_dtype):
            total += F.cross_entropy(_chunk_logits(h, w, b, transform)[0], t, reduction="sum")
    return total


def chunked_lm_loss(hidden: torch.Tensor, head: torch.nn.Linear | torch.nn.Module, labels: torch.Tensor,
                    chunk_tokens: int = CHUNK_TOKENS, transform: LogitTransform = IDENTITY) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over trained positions, and their count.

    ``labels`` are aligned with the inputs (-100 = no loss); position i predicts labels[i + 1].
    ``head`` is the output projection (anything with ``weight`` and optional ``bias``; it may be tied
    to the input embeddings); ``transform`` what the model applies to its output (:func:`logit_transform`).
    The loss is fp32; see the module docstring for how gradients are made.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    targets = shifted_targets(labels).reshape(-1)
    keep = targets != -100
    n = int(keep.sum())
    if n == 0:
        # a zero that still reaches the hidden states and a trainable head: under FSDP every process must
        # produce a gradient for every parameter, even one whose share of the batch has no trained token
        zero = hidden.sum() * 0.0
        for p in (head.weight, getattr(head, "bias", None)):
            if p is not None and p.requires_grad:
                zero = zero + p.sum() * 0.0
        return zero, 0
    rows = keep.nonzero().squeeze(1).to(hidden.device)
    t = targets[keep].to(hidden.device)
    weight, bias = head.weight, getattr(head, "bias", None)
    compute_dtype = _compute_dtype(hidden)
    grad_on = torch.is_grad_enabled()
    need_h = grad_on and hidden.requires_grad
    need_w = grad_on and weight.requires_grad
    need_b = grad_on and bias is not None and bias.requires_grad
    if not (need_h or need_w or need_b):
        return _plain_chunked_loss(hidden, weight, bias, rows, t, chunk_tokens, compute_dtype, transform), n
    total = _FusedLinearCrossEntropy.apply(hidden, weight, bias, rows, t, chunk_tokens, compute_dtype, transform,
                                           need_h, need_w, need_b)
    return total, n
