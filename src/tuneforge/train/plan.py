"""Predict a run's peak GPU memory (and on the CPU, its RAM) before loading anything, and say what to change if
it won't fit.

peak = weights + gradients + optimizer state + activations + overhead, each term following what
tuneforge's own loop does rather than a rule of thumb:

- weights: ``full``/``freeze``/``lora`` load the base in ``weight_dtype`` (fp32, as ``load_model``
  does); ``qlora`` stores every decoder Linear in NF4 (half a byte per value plus 8-bit block
  scales) and keeps embeddings, norms and the head in the compute dtype. LoRA A/B are fp32.
- gradients and AdamW state: one and two fp32 copies of what trains; with ``weights`` bf16_kahan/bf16_stochastic
  (:mod:`tuneforge.train.optimizer`) bf16 weights and gradients, fp32 or bf16 moments and (Kahan) a bf16
  compensation per parameter.
- activations: the tensors autograd saves in a Llama-style decoder layer under bf16 autocast,
  counted tensor by tensor (norms upcast to fp32, attention saves q/k/v/out, the SwiGLU MLP saves
  four intermediate tensors, LoRA saves its input, a 4-bit Linear saves nothing). With gradient
  checkpointing only each layer's input is kept, plus one layer recomputed during backward. The
  loss is the chunked one: only one chunk of fp32 logits ever exists.
- overhead: CUDA context, library workspaces and allocator slack; a fixed term.

The peak is the largest of the step's phases (end of forward, loss backward, the first layer's
backward, end of backward with all gradients, optimizer step), and the split reports the terms at
that moment, so the parts always add up to the peak.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from tuneforge.errors import ConfigError, TuneforgeError
from tuneforge.methods.setup import gpu_weight_dtype
from tuneforge.models.shapes import PROJECTIONS, ModelShape, model_shape
from tuneforge.train.distributed import world_size
from tuneforge.train.loss import CHUNK_TOKENS
from tuneforge.train.optimizer import WEIGHT_MODES, bytes_per_param

HEADROOM = 0.85  # share of GPU memory a plan may use before recomputation is turned on

GIB = 1 << 30
METHODS = ("full", "freeze", "lora", "qlora")
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
# Memory the process needs that max_memory_allocated never shows: the CUDA context and library
# handles (0.75 GiB measured on an H200, torch 2.11) and the caching allocator's slack (0.2-0.7 GiB).
OVERHEAD_BYTES = int(1.25 * GIB)
SKIP_ENV = "TUNEFORGE_SKIP_MEMORY_CHECK"
# On the CPU the tensors cost more than they count: peak RSS minus the RSS once the model is prepared was 1.18-1.31x
# the planned bytes without recomputation and 1.77x with it (SmolLM2-135M LoRA, 1-2 rows of 512, torch 2.13, glibc
# malloc, 1 thread; glibc keeps freed chunks, so a smaller loss chunk lowers the plan more than the RSS): 1.25x plus
# a fixed 0.45 GiB covers all three.
CPU_SLACK = 1.25
CPU_OVERHEAD_BYTES = int(0.45 * GIB)
# Larger forwards buy the CPU little speed: a batch whose forward would need more than this runs as several
# smaller forwards (the same rows per optimizer step, the same loss normalization).
CPU_FORWARD_BUDGET = 4 * GIB

@dataclass(frozen=True)
class PlanInputs:
    """What a run's memory depends on; the defaults are ``train``'s.

    ``model``: a shape name (``llama-3-8b``), a model reference, an HF config or a dict. ``dtype`` is the
    compute (autocast) dtype; ``weight_dtype`` the dtype non-quantized weights are loaded in (tuneforge: fp32;
    bf16 for a frozen LoRA base on a GPU). ``recompute``: off, on (checkpoint each layer) or offload (the
    checkpointed inputs in host memory). ``attention_mask``: a dense block-causal mask (the CPU path for packed
    rows), which takes SDPA off its flash kernel. ``shards``: FSDP processes; ``batch`` is then per process.
    """

    model: Any
    method: str = "lora"
    seq: int = 2048
    batch: int = 1
    lora_r: int = 16
    targets: str | Sequence[str] = "all-linear"
    recompute: str = "off"
    dtype: str = "bf16"
    weight_dtype: str = "fp32"
    lora_dropout: float = 0.0
    freeze_layers: int = 2
    loss_chunk_tokens: int = CHUNK_TOKENS
    attention_mask: bool = False
    grad_accum: int = 1
    shards: int = 1
    weights: str = "fp32_master"
    optimizer_state: str = "fp32"
    base_precision: str = "bf16"
    group_projections: bool = True


def plan_memory(inputs: PlanInputs, gpu_mem_gib: float | None = None, *, overhead_bytes: int = OVERHEAD_BYTES,
                advise: bool = True) -> MemoryPlan:
    """Predict the peak GPU memory of one training step, split into its parts, with advice.

    ``gpu_mem_gib`` None means the current CUDA device's size, if any.
    """
    i = inputs
    if i.recompute not in ("off", "on", "offload"):
        raise ConfigError(f"recompute={i.recompute!r}: choose off, on or offload")
    run = _resolve(i.model, i.method, i.seq, i.batch, i.lora_r, i.targets, i.recompute != "off", i.dtype,
                   i.weight_dtype, i.lora_dropout, i.freeze_layers, i.loss_chunk_tokens, i.attention_mask,
                   i.recompute == "offload", i.grad_accum, i.shards, i.weights, i.optimizer_state,
                   i.base_precision, i.group_projections)
    plan = _plan(run, overhead_bytes)
    plan.gpu_mem = int(gpu_mem_gib * GIB) if gpu_mem_gib is not None else _cuda_memory()
    plan.settings = {"lora_r": i.lora_r, "targets": i.targets if isinstance(i.targets, str) else list(i.targets),
                     "dtype": i.dtype, "weight_dtype": i.weight_dtype, "lora_dropout": i.lora_dropout,
                     "loss_chunk_tokens": i.loss_chunk_tokens, "attention_mask": i.attention_mask,
                     "offload_checkpoints": i.recompute == "offload", "grad_accum": i.grad_accum,
                     "shards": i.shards, "weights": i.weights, "optimizer_state": i.optimizer_state,
                     "base_precision": i.base_precision, "group_projections": i.group_projections}
    if advise:
        plan.advice = _advice(run, plan, overhead_bytes)
    return plan


def _resolve(model_config, method, seq, batch, lora_r, targets, ckpt, dtype, weight_dtype, dropout,
             freeze_layers, chunk, mask, offload, grad_accum, shards=1, weights="fp32_master",
             optimizer_state="fp32", base_precision="bf16", group_projections=True) -> _Run:
    if method not in METHODS:
        raise ConfigError(f"method {method!r}: choose one of {', '.join(METHODS)}")
    for key, value in (("seq", seq), ("batch", batch), ("lora_r", lora_r), ("loss_chunk_tokens", chunk),
                       ("grad_accum", grad_accum)):
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{key}={value!r}: must be a positive integer")
    for key, value in (("dtype", dtype), ("weight_dtype", weight_dtype)):
        if value not in DTYPE_BYTES:
            raise ConfigError(f"{key}={value!r}: choose one of bf16, fp16, fp32")
    shape = model_shape(model_config)
    cb = DTYPE_BYTES[dtype]
    wb = cb if method == "qlora" else DTYPE_BYTES[weight_dtype]
    lora = frozenset(_lora_targets(targets)) if method in ("lora", "qlora") else frozenset()
    trained = {"full": shape.layers, "freeze": min(freeze_layers, shape.layers)}.get(method, 0)
    if weights not in WEIGHT_MODES:
        raise ConfigError(f"weights={weights!r}: choose one of {', '.join(WEIGHT_MODES)}")
    if weights != "fp32_master":  # train.optimizer's bf16 AdamW: bf16 weights, no master copy
        if method not in ("full", "freeze"):
            raise ConfigError(f"weights={weights} is for method full or freeze, not {method}")
        wb = 2
    pb = wb if method in ("full", "freeze") else 4  # LoRA adapters train in fp32 whatever the base
    held = bytes_per_param(weights, optimizer_state)
    ob = 2 * pb if weights == "fp32_master" else held["moments"] + held["compensation"]
    return _Run(shape=shape, method=method, batch=batch, seq=seq, ckpt=bool(ckpt), offload=bool(offload and ckpt),
                rb=wb, cb=cb, wb=wb, pb=pb, lora=lora, r=lora_r, dropout=float(dropout), trained_layers=trained,
                chunk=chunk, mask=bool(mask), grad_accum=grad_accum, shards=max(1, int(shards)), ob=ob,
                fp8=base_precision == "fp8" and method == "lora",  # qlora's base stays 4-bit, FP8 or not
                grouped=bool(group_projections))


def _lora_targets(targets: str | Sequence[str]) -> list[str]:
    if targets == "all-linear":
        return list(PROJECTIONS)
    names = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip()]
    chosen = [p for p in PROJECTIONS if any(p == t or t.endswith(f".{p}") or t.endswith(p) for t in names)]
    if not chosen:
        raise ConfigError(f"targets={targets!r} names none of the decoder projections "
                          f"({', '.join(PROJECTIONS)}) or 'all-linear'")
    return chosen


def _cuda_memory(device: Any = None) -> int | None:
    """Total memory of a CUDA device (default: the current one); None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device() if device is None else device).total_memory


# --- parameters ---------------------------------------------------------------------------------

def _nf4_bytes(n: int, blocksize: int = 64) -> int:
    """Packed codes + uint8 block scales + fp32 scales of the scales + the fp32 offset."""
    blocks = -(-n // blocksize)
    return (n + 1) // 2 + blocks + 4 * -(-blocks // 256) + 4


def _weights(run: _Run) -> tuple[int, int, int]:
    """(weight bytes, trainable params, total params) per GPU.

    Sharded (FSDP2): each process keeps 1/shards of every parameter, plus, gathered, the root's (embeddings,
    head, final norm: kept through the step) and two decoder layers (the one running and the one prefetched).
    4-bit codes are buffers, not parameters: every process holds all of them.
    """
    s = run.shape
    lora = run.shape.lora_params(run.r, run.lora)
    root = (s.embed_params + s.head_params + s.norm_params) * (run.cb if run.quantized else run.wb)
    if run.quantized:
        codes = s.layers * sum(_nf4_bytes(a * b) for a, b in s.projections().values())
        layer = 0
        base = codes + root
    else:
        layer = (s.layer_linear_params + 2 * s.hidden) * run.wb
        base = s.params * run.wb
        if run.fp8:  # measured on an H200 (8B, all 7 projections): 50.8 → 44.3 GiB peak, these bytes
            fp8 = [s.projections()[name] for name in run.lora]
            base -= s.layers * sum(n_in * n_out * (run.wb - 1) - 4 * n_out for n_in, n_out in fp8)
    lora_layer = lora // s.layers * 4
    if run.shards > 1:
        sharded = base - (codes if run.quantized else 0) + lora * 4
        base = (codes if run.quantized else 0) + sharded // run.shards + root + 2 * (layer + lora_layer)
        lora = 0  # counted in the shards
    if run.method == "full":
        trainable = s.params
    elif run.method == "freeze":
        trainable = run.trained_layers * (s.layer_linear_params + 2 * s.hidden)
    else:
        trainable = run.shape.lora_params(run.r, run.lora)
    return base + lora * 4, trainable, s.params + run.shape.lora_params(run.r, run.lora)


# --- activations --------------------------------------------------------------------------------

def _linear_group(run: _Run, names: Sequence[str], n_in: int, x_bytes: int, trains: bool) -> int:
    """Bytes saved by the Linears reading one input (T × n_in, ``x_bytes`` per value) and their LoRA."""
    t, cb, proj = run.tokens, run.cb, run.shape.projections()
    shared = False  # the input itself is saved (counted once however many layers keep it)
    extra = 0
    adapted = [n for n in names if n in run.lora]
    if adapted:
        if run.dropout > 0:  # each adapter's dropout output and mask (groups form only without dropout)
            extra += len(adapted) * t * n_in * (cb + 1)
        elif x_bytes == cb:
            shared = True
        else:  # the input cast to the compute dtype: once per adapter, once for grouped siblings (lora_groups.py)
            extra += (1 if run.grouped else len(adapted)) * t * n_in * cb
    for name in names:
        n_out = proj[name][1]
        if trains:  # the weight's gradient needs the input in the compute dtype
            if x_bytes == cb:
                shared = True
            else:
                extra += t * n_in * cb  # autocast makes a new copy per Linear
        elif not run.quantized and run.wb != cb:
            extra += n_in * n_out * cb  # a frozen fp32 weight's bf16 cast, kept for the input gradient
        if name in run.lora:
            extra += t * run.r * cb  # A's output, kept for B's gradient
    return extra + (t * n_in * x_bytes if shared else 0)


def _layer_saved(run: _Run, trains: bool) -> int:
    """Bytes autograd keeps for one decoder layer's backward."""
    s, t, cb, rb = run.shape, run.tokens, run.cb, run.rb
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    kv_saved = q if run.mask else kv  # with a mask, HF repeats k/v to every head before SDPA
    saved = 0
    for i in range(2):  # RMSNorm upcasts to fp32 and keeps that copy; a trainable weight also keeps its input
        input_is_checkpoint = i == 0 and run.ckpt and rb == 4
        saved += 0 if input_is_checkpoint else t * s.hidden * 4
        saved += t * s.hidden * rb if trains else 0
    saved += _linear_group(run, ("q_proj", "k_proj", "v_proj"), s.hidden, rb, trains)
    saved += t * cb * (2 * q + 2 * kv_saved) + t * s.heads * 4  # q, k, v, output, log-sum-exp
    saved += run.batch * run.seq * run.seq * cb if run.mask else 0  # the mask as an additive bias
    saved += _linear_group(run, ("o_proj",), q, cb, trains)
    saved += _linear_group(run, ("gate_proj", "up_proj"), s.hidden, rb, trains)
    saved += 3 * t * s.intermediate * cb  # gate (for SiLU), SiLU(gate) and up (for the product)
    saved += _linear_group(run, ("down_proj",), s.intermediate, cb, trains)
    return saved


def _layer_backward_transient(run: _Run) -> int:
    """What a layer's backward holds on top of its saved tensors: MLP gradients and a dequantized weight."""
    s, t = run.shape, run.tokens
    biggest = max(a * b for a, b in s.projections().values())
    return 2 * t * s.intermediate * run.cb + 2 * t * s.hidden * run.rb + (biggest * run.cb if run.quantized else 0)


def _weight_casts(run: _Run, layers: int) -> int:
    """bf16 copies autocast caches of trainable fp32 weights (they live until the forward's autocast ends)."""
    if run.method not in ("full", "freeze") or run.wb == run.cb:
        return 0
    return layers * run.shape.layer_linear_params * run.cb


def _loss_phase(run: _Run) -> int:
    """The fused loss's forward, where its gradients are made: one chunk's logits (compute dtype and fp32) and
    their gradient, the stored gradient of the hidden states, the head's fp32 gradient when it trains, inputs."""
    s, t = run.shape, run.tokens
    chunk = min(run.chunk, t)
    logits = chunk * s.vocab * (2 * run.cb + 4)
    grad_hidden = t * s.hidden * run.rb
    head_trains = run.method == "full"
    head_grad = s.vocab * s.hidden * (4 + run.cb) if head_trains else 0  # fp32 sum and one chunk's product
    head_cast = s.vocab * s.hidden * run.cb if run.wb != run.cb else 0
    inputs = t * s.hidden * (run.rb + 4)  # the gathered hidden states and the final norm's fp32 copy
    return logits + grad_hidden + head_grad + head_cast + inputs


def _phases(run: _Run, grads: int) -> dict[str, tuple[int, int]]:
    """(activation bytes, gradient bytes) at each candidate peak moment of a step."""
    s, t = run.shape, run.tokens
    layers = run.graph_layers
    trained_layers = run.trained_layers if run.method in ("full", "freeze") else 0
    resident_grads = grads if run.grad_accum > 1 else 0  # accumulation keeps them across micro-batches
    per_layer_trainable = _layer_saved(run, True)
    per_layer_frozen = _layer_saved(run, False)
    transient = _layer_backward_transient(run)
    layer_top = per_layer_trainable if trained_layers else per_layer_frozen
    if run.ckpt:
        inputs = 0 if run.offload else layers * t * s.hidden * run.rb
        prefetch = 2 * t * s.hidden * run.rb if run.offload else 0  # the layer being recomputed and the next
        forward_end = inputs + _weight_casts(run, trained_layers) + t * s.hidden * (run.rb + 4)
        loss = inputs + _loss_phase(run)
        first_layer = inputs + prefetch + layer_top + transient + _weight_casts(run, 1 if trained_layers else 0)
        last_layer = (0 if run.offload else t * s.hidden * run.rb) + prefetch + layer_top + transient
    else:
        stack = trained_layers * per_layer_trainable + (layers - trained_layers) * per_layer_frozen
        stack += _weight_casts(run, trained_layers)
        forward_end = stack + t * s.hidden * (run.rb + 4)
        loss = stack + _loss_phase(run)
        first_layer = stack + transient
        last_layer = layer_top + transient
    return {
        "end of forward": (forward_end, resident_grads),
        "loss backward": (loss, resident_grads),
        "top layer backward": (first_layer, resident_grads),
        "end of backward": (last_layer, grads),
        "optimizer step": (0, grads),
    }


def _plan(run: _Run, overhead: int) -> MemoryPlan:
    weights, trainable, total = _weights(run)
    grads = trainable * run.pb // run.shards
    optimizer = trainable * run.ob // run.shards
    phases = _phases(run, grads)
    phase, (activations, gradients) = max(phases.items(), key=lambda kv: sum(kv[1]))
    return MemoryPlan(model=run.shape.name, method=run.method, seq=run.seq, batch=run.batch,
                      gradient_checkpointing=run.ckpt,
                      recompute="offload" if run.offload else "on" if run.ckpt else "off",
                      weights=weights, gradients=gradients, optimizer=optimizer,
                      activations=activations, overhead=overhead, trainable_params=trainable, total_params=total,
                      phase=phase)


# --- advice -------------------------------------------------------------------------------------

def _as_qlora(run: _Run) -> _Run:
    """The same run as QLoRA on all projections (what the advice compares against)."""
    lora = run.lora or frozenset(PROJECTIONS)
    return replace(run, method="qlora", wb=run.cb, rb=run.cb, pb=4, ob=8, lora=lora, trained_layers=0)


def _advice(run: _Run, plan: MemoryPlan, overhead: int) -> list[str]:
    """The least intrusive changes that make the run fit, each with its predicted peak (at most three)."""
    if plan.gpu_mem is None:
        return []
    cap = plan.gpu_mem

    def gib(x: int) -> str:
        return f"{x / GIB:.1f} GiB"

    if plan.fits:
        return [f"fits with {gib(cap - plan.peak)} to spare"]
    qlora = _as_qlora(run)
    ckpt = "gradient checkpointing (train.gradient_checkpointing=true; ~1/3 more compute)"
    use_qlora = "QLoRA, a 4-bit base with LoRA adapters (method.name=qlora)"
    candidates: list[tuple[str, _Run]] = []
    if not run.ckpt:
        candidates.append((ckpt, replace(run, ckpt=True)))
    if run.method != "qlora":
        candidates.append((use_qlora, qlora))
        if not run.ckpt:
            candidates.append((f"{use_qlora} + {ckpt}", replace(qlora, ckpt=True)))
    if run.chunk > CHUNK_TOKENS // 4:  # smaller head GEMMs: some speed for memory
        candidates.append((f"lower train.loss_chunk_tokens to {CHUNK_TOKENS // 4} (a little slower)",
                           replace(run, chunk=CHUNK_TOKENS // 4)))
    for base, prefix in ((run, ""), (replace(run, ckpt=True), f"{ckpt} + "),
                         (replace(qlora, ckpt=True), f"{use_qlora} + {ckpt} + ")):
        if _plan(base, overhead).peak <= cap:
            break  # fits at this batch already: listed above
        b = run.batch // 2
        while b >= 1 and _plan(replace(base, batch=b), overhead).peak > cap:
            b //= 2
        if b >= 1:
            k = math.ceil(run.batch / b)
            candidates.append((f"{prefix}train.batch_size={b} with train.grad_accum ×{k} (same effective batch)",
                               replace(base, batch=b)))
            break
    out = []
    for text, changed in candidates:
        peak = _plan(changed, overhead).peak
        if peak <= cap and len(out) < 3:
            out.append(f"{text}: {gib(peak)}")
    if not out:
        best = _plan(replace(qlora, batch=1, ckpt=True), overhead).peak
        out.append(f"does not fit one GPU of {gib(cap)} even as QLoRA with checkpointing at batch 1 "
                   f"({gib(best)}); use a smaller model, a shorter data.max_seq_len or a GPU with more memory")
    return out


# --- the training loop's check ------------------------------------------------------------------

def plan_inputs(config: Any, recompute: str, gpus: int | None = None) -> PlanInputs:
    """The :class:`PlanInputs` of a ``RunConfig`` run with ``recompute`` on ``gpus`` processes (default: this run's)."""
    m, t = config.method, config.train
    shards = gpus or world_size()
    if t.batch_size % shards:
        raise ConfigError(f"train.batch_size={t.batch_size} is the global rows per micro-batch and must be "
                          f"divisible by the {shards} GPUs")
    return PlanInputs(
        config.model, method=m.name, seq=config.data.max_seq_len, batch=t.batch_size // shards, lora_r=m.lora.r,
        targets=m.lora.target_modules, recompute=recompute, dtype="fp32" if t.dtype == "fp32" else "bf16",
        weight_dtype=gpu_weight_dtype(m.name, t.dtype) if t.weights == "fp32_master" else "bf16",
        lora_dropout=m.lora.dropout,
        freeze_layers=m.freeze.top_k_layers or 0, loss_chunk_tokens=t.loss_chunk_tokens, grad_accum=t.grad_accum,
        shards=shards, weights=t.weights, optimizer_state=t.optimizer_state, base_precision=m.lora.base_precision,
        group_projections=m.lora.group_projections)


def plan_for_config(config: Any, device: Any = None, recompute: str | None = None, gpus: int | None = None,
                    gpu_mem_gib: float | None = None, advise: bool = True) -> MemoryPlan:
    """The plan of a ``RunConfig`` as ``train`` would run it on a GPU (``device``'s memory unless ``gpu_mem_gib``).

    ``recompute``: off/on/offload, or auto for the mode ``train`` would pick (:func:`choose_plan`); None means the
    config's ``train.gradient_checkpointing``. The chosen mode is ``plan.recompute``. ``gpus``: processes the
    batch and the sharded state are split over (default: this run's, 1 outside torchrun); the plan is per GPU.
    """
    if gpu_mem_gib is None and (mem := _cuda_memory(device)) is not None:
        gpu_mem_gib = mem / GIB
    mode = recompute or resolve_mode(config.train.gradient_checkpointing)
    if mode == "auto":
        mode = choose_plan(lambda m: plan_memory(plan_inputs(config, m, gpus), gpu_mem_gib, advise=False))
    return plan_memory(plan_inputs(config, mode, gpus), gpu_mem_gib, advise=advise)


def resolve_mode(setting: bool | str) -> str:
    """A ``train.gradient_checkpointing`` value as one of auto/off/on/offload (booleans are off/on)."""
    if isinstance(setting, bool):
        return "on" if setting else "off"
    return setting


def choose_recompute(config: Any, device: torch.device) -> str:
    """The recomputation mode ``train`` uses for ``config`` on ``device``: the config's, or for ``auto`` the
    least that fits (:func:`choose_plan`); on the CPU ``auto`` is off (memory there is not the limit)."""
    mode = resolve_mode(config.train.gradient_checkpointing)
    if mode != "auto":
        return mode
    if device.type != "cuda":
        return "off"
    try:
        return plan_for_config(config, device, recompute="auto", advise=False).recompute
    except TuneforgeError:  # a model the planner does not model: checkpointing is the safe choice
        return "on"


def choose_plan(plan_for: Callable[[str], MemoryPlan]) -> str:
    """The least activation recomputation whose plan fits in ``HEADROOM`` of the GPU: off, on, else offload.

    ``plan_for(mode)`` plans the run with that mode; with no GPU size known the answer is off.
    """
    for mode in ("off", "on"):
        plan = plan_for(mode)
        if plan.gpu_mem is None or plan.peak <= HEADROOM * plan.gpu_mem:
            return mode
    return "offload"


def check_memory(config: Any, device: Any = None, gpu_mem_gib: float | None = None,
                 recompute: str | None = None) -> MemoryPlan | None:
    """Raise TuneforgeError, with the predicted split and advice, when a run cannot fit the GPU.

    Returns the plan, or None when the planner does not model this model or target list. Set
    ``TUNEFORGE_SKIP_MEMORY_CHECK=1`` to try anyway.
    """
    try:
        plan = plan_for_config(config, device, recompute, gpu_mem_gib=gpu_mem_gib)
    except TuneforgeError:
        return None  # an architecture or target list the planner does not model: loading will tell
    if plan.fits is False and os.environ.get(SKIP_ENV) != "1":
        raise TuneforgeError(
            "this run is predicted not to fit in GPU memory; nothing was loaded.\n" + plan.table()
            + f"\n(the prediction is usually within 15%; set {SKIP_ENV}=1 to try anyway)")
    return plan


# --- the CPU: memory is RAM ---------------------------------------------------------------------

def available_ram() -> int | None:
    """Bytes this process can still take: MemAvailable, capped by a cgroup v2 limit; None where unreadable."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
        avail = int(next(ln.split()[1] for ln in meminfo.splitlines() if ln.startswith("MemAvailable:"))) * 1024
    except (OSError, StopIteration, ValueError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            avail = min(avail, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass  # no cgroup limit to honour
    return max(avail, 0)


def cpu_need(inputs: PlanInputs) -> int:
    """Predicted RAM a CPU training step adds to the process (tensors × the allocator's measured slack)."""
    return int(CPU_SLACK * plan_memory(inputs, advise=False, overhead_bytes=0).allocated) + CPU_OVERHEAD_BYTES


def cpu_plan_inputs(config: Any, model: Any, recompute: str, rows: int) -> PlanInputs:
    """A ``RunConfig`` run as the CPU runs it: fp32 (unless bf16 is asked), packed rows under a dense mask, ``rows``
    rows per forward; ``model`` is the model's HF config when it is loaded already, else the reference."""
    t = config.train
    pairs = getattr(t, "objective", "sft") != "sft"  # a pair's two answers share one row of up to 2 × max_seq_len
    return replace(plan_inputs(config, recompute, 1), model=model, batch=rows,
                   seq=config.data.max_seq_len * (2 if pairs else 1),
                   dtype="bf16" if t.dtype == "bf16" or t.weights != "fp32_master" else "fp32",
                   weight_dtype="fp32" if t.weights == "fp32_master" else "bf16",
                   attention_mask=config.data.packing)


def cpu_rows_per_forward(config: Any, model: Any, recompute: str, ram: int | None = None) -> int:
    """How many of a micro-batch's rows one forward takes on the CPU: all of them when that fits the RAM and
    ``CPU_FORWARD_BUDGET``, else the most that do. Raises TuneforgeError, with advice, when one row cannot fit;
    returns the whole batch when the planner does not model the model or the RAM is unknown."""
    ram = available_ram() if ram is None else ram
    batch = config.train.batch_size
    try:
        need = [cpu_need(cpu_plan_inputs(config, model, recompute, rows)) for rows in (1, batch)]
    except TuneforgeError:
        return batch  # an architecture the planner does not model
    if ram is None:
        return batch
    if need[0] > HEADROOM * ram and os.environ.get(SKIP_ENV) != "1":
        raise TuneforgeError(
            f"this run is predicted to need {need[0] / GIB:.1f} GiB of RAM even one row per forward "
            f"({config.data.max_seq_len} tokens), and {ram / GIB:.1f} GiB are available; nothing was written.\n"
            "Try: a shorter data.max_seq_len; method.name=lora instead of full/freeze; "
            "train.gradient_checkpointing=on; or close other programs. "
            f"(set {SKIP_ENV}=1 to try anyway)")
    budget = min(HEADROOM * ram, max(CPU_FORWARD_BUDGET, need[0]))
    rows = batch
    while rows > 1 and cpu_need(cpu_plan_inputs(config, model, recompute, rows)) > budget:
        rows = math.ceil(rows / 2)
    return rows


# --- data classes ---------------------------------------------------------------------------------

@dataclass
class MemoryPlan:
    """A predicted peak, split into its parts (bytes), with a verdict and advice."""

    model: str
    method: str
    seq: int
    batch: int
    gradient_checkpointing: bool
    weights: int
    gradients: int
    optimizer: int
    activations: int
    overhead: int
    trainable_params: int
    total_params: int
    phase: str  # the moment of the step the peak falls on
    recompute: str = "off"  # off | on | offload
    gpu_mem: int | None = None
    advice: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def allocated(self) -> int:
        """The peak of tensor memory: what ``torch.cuda.max_memory_allocated`` measures."""
        return self.weights + self.gradients + self.optimizer + self.activations

    @property
    def peak(self) -> int:
        """The memory the process needs on the GPU: tensors plus overhead."""
        return self.allocated + self.overhead

    @property
    def fits(self) -> bool | None:
        """None when the GPU size is unknown."""
        return None if self.gpu_mem is None else self.peak <= self.gpu_mem

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(allocated=self.allocated, peak=self.peak, fits=self.fits)
        return d

    def table(self) -> str:
        """A printable table: the split in GiB, the verdict and the advice."""
        ckpt = "on" if self.gradient_checkpointing else "off"
        head = (f"{self.model}  method={self.method}  batch={self.batch}×seq={self.seq}  checkpointing={ckpt}  "
                f"trainable {self.trainable_params:,} of {self.total_params:,} params")
        rows = [("weights", self.weights), ("gradients", self.gradients), ("optimizer state", self.optimizer),
                (f"activations ({self.phase})", self.activations), ("CUDA/allocator overhead", self.overhead)]
        width = max(len(k) for k, _ in rows) + 2
        lines = [head, "-" * (width + 12)]
        lines += [f"{k:<{width}}{v / GIB:>9.2f} GiB" for k, v in rows]
        lines.append("-" * (width + 12))
        lines.append(f"{'predicted peak':<{width}}{self.peak / GIB:>9.2f} GiB")
        if self.gpu_mem is None:
            lines.append("fits: unknown (pass --gpu-mem GiB)")
        else:
            verdict = "yes" if self.fits else "NO"
            lines.append(f"fits on {self.gpu_mem / GIB:.1f} GiB: {verdict}")
        lines += [f"  - {a}" for a in self.advice]
        return "\n".join(lines)


@dataclass(frozen=True)
class _Run:
    """Everything the byte counting needs, resolved from plan_memory's arguments."""

    shape: ModelShape
    method: str
    batch: int
    seq: int
    ckpt: bool
    offload: bool
    rb: int  # bytes per value of the residual stream (the embeddings' dtype)
    cb: int  # compute (autocast) dtype bytes
    wb: int  # bytes per weight of non-quantized layers
    pb: int  # bytes per trainable parameter (and per gradient / Adam moment)
    lora: frozenset[str]
    r: int
    dropout: float
    trained_layers: int  # decoder layers whose weights train (full: all, freeze: top k)
    chunk: int
    mask: bool  # a dense block-causal mask: SDPA's masked kernel, k/v repeated to all heads
    grad_accum: int
    shards: int = 1  # FSDP processes: parameters, gradients and Adam states are split this many ways
    ob: int = 8  # optimizer-state bytes per trainable parameter (AdamW moments, Kahan compensation)
    fp8: bool = False  # the LoRA layers' frozen base weights are e4m3 codes (1 byte) with fp32 per-row scales
    grouped: bool = True  # sibling LoRA projections share one adapter input (method.lora.group_projections)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def quantized(self) -> bool:
        return self.method == "qlora"

    @property
    def graph_layers(self) -> int:
        """Decoder layers that take part in backward (frozen layers below all trainable ones do not)."""
        return self.trained_layers if self.method == "freeze" else self.shape.layers
