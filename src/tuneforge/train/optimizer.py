"""AdamW for bf16 weights with no fp32 master copy, without losing the updates bf16 cannot hold.

A bf16 weight of magnitude 1 moves in steps of 2^-8 to 2^-7: an AdamW update of 1e-5 on it (a full fine-tune's
learning rate) rounds back to the old weight, every step, so plain bf16 AdamW (a bf16 model under
``torch.optim.AdamW``, what most peers run) quietly stops learning where updates are small. Both modes here compute
the update in fp32 and keep only bf16 tensors between steps:

- ``bf16_kahan``: a bf16 compensation buffer per parameter holds what the rounding of the weight dropped and adds
  it to the next update (Kahan summation); weight + compensation carry about 16 mantissa bits. 2 bytes/param.
- ``bf16_stochastic``: the new weight is rounded up or down at random, with the odds of its distance to each
  neighbour (stochastic rounding): exact in expectation, no extra memory, noisier than Kahan.

The moments are fp32, or bf16 (``state_dtype``); bf16 moments are stored with stochastic rounding, since v's
per-step change (1 - β2 = 0.001 relative) is below bf16's resolution and round-to-nearest would freeze it.

Where the update runs:

- CUDA tensors, with Triton installed: one fused kernel launch per parameter (:func:`_fused_update`) reads the
  weight, gradient, moments and compensation once, does the math in fp32 registers and writes them once (14 to 26
  bytes per parameter by mode). The step is memory-bound, and the same update as ~15 separate tensor ops with fp32
  temporaries moves about five times as many bytes.
- Everywhere else (the CPU, a GPU without Triton): ``torch._foreach`` ops over lists of tensors, on slices of at
  most :data:`CHUNK` values at a time so the fp32 temporaries stay small. This is the reference the kernel is
  tested against (on a GPU, or on CPU tensors under ``TRITON_INTERPRET=1``): same formula in the same order, so
  the two agree to fp32 rounding; stochastic rounding draws from Philox in the kernel (seeded from torch's CPU
  generator), from torch's generator here.

Under FSDP2 the parameters are DTensors: the update reads and writes each process's local shard, and the state
tensors are DTensors of the same layout, so checkpoints gather and re-shard them like torch's AdamW moments.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from tuneforge.errors import ConfigError

try:  # Triton is absent on CPU-only installs: the foreach update runs there.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

WEIGHT_MODES = ("fp32_master", "bf16_kahan", "bf16_stochastic")
CHUNK = 1 << 24  # values per batch of foreach work: ~6 fp32 temporaries of 64 MiB each at most
_HIGH_HALF = -(1 << 16)  # 0xFFFF0000 as an int32: keeps the bits an fp32 shares with its bf16
BLOCK = 1024  # values per program of the fused kernel: 8 per thread of 4 warps, one 16-byte bf16 load each


def bytes_per_param(weights: str, state_dtype: str = "fp32") -> dict[str, int]:
    """Bytes one trainable parameter costs in each mode: weight, gradient, AdamW moments, master copy or
    compensation (``fp32_master``: torch's AdamW over fp32 weights)."""
    if weights == "fp32_master":
        return {"weight": 4, "gradient": 4, "moments": 8, "compensation": 0}
    moments = 4 if state_dtype == "bf16" else 8
    return {"weight": 2, "gradient": 2, "moments": moments, "compensation": 2 if weights == "bf16_kahan" else 0}


def to_bf16_weights(model: torch.nn.Module, keep_residuals: bool = False) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Every floating-point parameter of ``model`` in bf16, in place; buffers (e.g. rotary frequencies, which
    need fp32) stay as they are.

    ``keep_residuals``: also return what the cast dropped from each parameter (``w - bf16(w)``, in bf16), the
    starting compensation of ``bf16_kahan``: weight + compensation is then the loaded weight, and the weights
    the forward sees are the nearest bf16 of the exact trajectory, as under fp32 master weights and bf16 autocast.
    Starting from zero instead, every weight sits on the bf16 grid and none moves until its updates add up to
    half an ulp, all in step (measured: SmolLM2 lags the fp32 run by 1-2 nats for the first steps).
    """
    residuals = {}
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != torch.bfloat16:
            low = p.data.to(torch.bfloat16)
            if keep_residuals:
                residuals[p] = (p.data - low.to(p.dtype)).to(torch.bfloat16)
            p.data = low
    return residuals


def build_optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float, weights: str,
                    state_dtype: str, device: torch.device,
                    residuals: dict[torch.nn.Parameter, torch.Tensor] | None = None) -> torch.optim.Optimizer:
    """The run's AdamW: torch's (fused on a GPU) over fp32 master weights, or :class:`BF16AdamW` for
    ``train.weights`` bf16_kahan / bf16_stochastic (``residuals``: from :func:`to_bf16_weights`, for Kahan)."""
    if weights == "fp32_master":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device.type == "cuda")
    return BF16AdamW(params, lr=lr, weight_decay=weight_decay, rounding=weights.removeprefix("bf16_"),
                     state_dtype=state_dtype, residuals=residuals)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (a view: writes reach the DTensor), or ``t`` itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _flat_slices(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``t`` as views of at most CHUNK values (``t`` must be contiguous: the update writes through them)."""
    return _local(t).view(-1).split(CHUNK)


def _as_fp32(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    out = [torch.empty_like(t, dtype=torch.float32) for t in tensors]
    torch._foreach_copy_(out, tensors)
    return out


if triton is not None:

    # fp32 -> bf16 in integer ops: add to the bit pattern, drop the low half (what is left converts exactly). The
    # same code rounds on the GPU and in Triton's CPU interpreter, whose own conversion truncates.
    @triton.jit
    def _keep_high_half(x, bits):
        """``bits`` (``x``'s, plus what rounds it) with the low 16 bits dropped, as bf16; a NaN stays NaN (adding to
        the GPU's 0x7FFFFFFF would carry into the sign bit)."""
        return tl.where(x == x, (bits & -65536).to(tl.float32, bitcast=True), x).to(tl.bfloat16)

    @triton.jit
    def _round_nearest(x):
        """fp32 ``x`` to the nearest bf16, ties to even (torch's conversion)."""
        bits = x.to(tl.int32, bitcast=True)
        return _keep_high_half(x, bits + 0x7FFF + ((bits >> 16) & 1))

    @triton.jit
    def _round_stochastic(x, r):
        """fp32 ``x`` to bf16 rounded up or down at random: ``r``'s low 16 bits, as in :func:`round_stochastic_`."""
        return _keep_high_half(x, x.to(tl.int32, bitcast=True) + (r & 0xFFFF).to(tl.int32, bitcast=True))

    # the per-step scalars are runtime arguments (floats are never specialized; the seed is kept from being
    # specialized on its divisibility), so one compiled kernel per dtype combination serves every step
    @triton.jit(do_not_specialize=["seed"])
    def _adamw_kernel(w_ptr, g_ptr, m_ptr, v_ptr, c_ptr, n, seed, one_minus_beta1, beta2, one_minus_beta2, eps,
                      step_size, sqrt_bc2, neg_lr_wd, decay, KAHAN: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        # the foreach path's operations in its order: lerp, mul + addcmul, sqrt / sqrt(bc2) + eps, addcdiv
        m = m + one_minus_beta1 * (g - m)
        v = v * beta2 + one_minus_beta2 * g * g
        denom = tl.div_rn(tl.sqrt_rn(v), sqrt_bc2) + eps
        update = step_size * tl.div_rn(m, denom)
        r_w, r_m, r_v, _ = tl.randint4x(seed, offs)  # three independent streams (unused ones are compiled out)
        if KAHAN:
            y = tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32) + neg_lr_wd * w + update
            new = _round_nearest(w + y)
            tl.store(c_ptr + offs, _round_nearest(y - (new.to(tl.float32) - w)), mask=mask)
        else:
            new = _round_stochastic(w * decay + update, r_w)
        tl.store(w_ptr + offs, new, mask=mask)
        if m_ptr.dtype.element_ty == tl.bfloat16:
            tl.store(m_ptr + offs, _round_stochastic(m, r_m), mask=mask)
            tl.store(v_ptr + offs, _round_stochastic(v, r_v), mask=mask)
        else:
            tl.store(m_ptr + offs, m, mask=mask)
            tl.store(v_ptr + offs, v, mask=mask)


def _fused_on(t: torch.Tensor) -> bool:
    """Whether ``t``'s update runs in the fused kernel (a CUDA tensor and Triton installed)."""
    return triton is not None and t.is_cuda


def _fused_update(group: dict[str, Any], state: dict[str, torch.Tensor], w: torch.Tensor, g: torch.Tensor,
                  rounding: str, bc1: float, bc2: float) -> None:
    """One parameter's AdamW update in one kernel launch: ``w`` (bf16) and its ``state`` updated in place from
    the gradient ``g``; ``bc1``, ``bc2``: the bias corrections of this parameter's step."""
    m, v = state["exp_avg"], state["exp_avg_sq"]
    kahan = rounding == "kahan"
    # a fresh Philox seed per launch from torch's (CPU) generator: reproducible under torch.manual_seed, saved in
    # checkpoints with the other RNG states, and drawn only when something is rounded at random (an empty shard
    # draws too, so every FSDP2 rank's generator stays in step)
    seed = int(torch.randint(1 << 31, ())) if not kahan or m.dtype == torch.bfloat16 else 0
    n = w.numel()
    if n == 0:  # an empty FSDP2 shard
        return
    beta1, beta2 = group["betas"]
    lr, wd = group["lr"], group["weight_decay"]
    c = _local(state["compensation"]).view(-1) if kahan else w  # an unused pointer without Kahan
    _adamw_kernel[(triton.cdiv(n, BLOCK),)](
        w, g, _local(m).view(-1), _local(v).view(-1), c, n, seed, 1 - beta1, beta2, 1 - beta2, group["eps"],
        -lr / bc1, math.sqrt(bc2), -lr * wd, 1 - lr * wd, KAHAN=kahan, BLOCK=BLOCK)


def round_stochastic_(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """Store fp32 ``src`` in bf16 ``dst``, each value rounded up or down at random with the odds of its distance
    to the two bf16 neighbours. ``src`` is overwritten."""
    for d, s in zip(dst, src, strict=True):
        bits = s.view(torch.int32)
        # adding 16 random low bits carries into the kept half with probability (dropped bits) / 2^16; sign and
        # magnitude are stored apart, so negative values round symmetrically
        bits.add_(torch.randint_like(bits, 0, 1 << 16)).bitwise_and_(_HIGH_HALF)
        d.copy_(s)  # exact: the low half is zero


class BF16AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected moments, torch's formula) on bf16 parameters.

    ``rounding``: ``kahan`` (a bf16 compensation buffer per parameter) or ``stochastic``. ``state_dtype``:
    ``fp32`` or ``bf16`` moments. ``residuals``: starting compensations by parameter (see
    :func:`to_bf16_weights`; zero for the others, e.g. parameters FSDP2 has replaced by their shards). The state is
    allocated here, not at the first step, so that a checkpoint can be loaded into it at its own dtypes and shards.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-5,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 rounding: str = "kahan", state_dtype: str = "fp32",
                 residuals: dict[torch.nn.Parameter, torch.Tensor] | None = None) -> None:
        if rounding not in ("kahan", "stochastic"):
            raise ValueError(f"rounding={rounding!r}: choose kahan or stochastic")
        if state_dtype not in ("fp32", "bf16"):
            raise ValueError(f"state_dtype={state_dtype!r}: choose fp32 or bf16")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.rounding = rounding
        self.state_dtype = torch.float32 if state_dtype == "fp32" else torch.bfloat16
        for p in self._params():
            if p.dtype != torch.bfloat16:
                raise ConfigError(f"bf16 AdamW got a {p.dtype} parameter of shape {tuple(p.shape)}: "
                                  "train.weights bf16_kahan/bf16_stochastic trains bf16 weights only")
            state = self.state[p]
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, dtype=self.state_dtype, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.state_dtype, memory_format=torch.contiguous_format)
            if rounding == "kahan":
                start = (residuals or {}).get(p)
                state["compensation"] = (start.contiguous() if start is not None
                                         else torch.zeros_like(p, memory_format=torch.contiguous_format))

    def _params(self) -> Iterator[torch.nn.Parameter]:
        return (p for group in self.param_groups for p in group["params"])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's, except that each state tensor keeps the dtype this optimizer gave it (torch's casts every
        one to its parameter's dtype, which would round fp32 moments to bf16)."""
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        for i, p in enumerate(self._params()):
            for key, value in saved.get(i, {}).items():
                if key != "step":
                    dtype = self.state_dtype if key.startswith("exp_avg") else torch.bfloat16
                    self.state[p][key] = value.to(device=p.device, dtype=dtype)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        """One AdamW update of every parameter that has a gradient."""
        if closure is not None:
            raise ValueError("BF16AdamW.step takes no closure")
        for group in self.param_groups:
            work: dict[str, list[torch.Tensor]] = {k: [] for k in ("w", "g", "m", "v", "c")}
            corrections: list[tuple[float, float]] = []
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                state["step"] += 1
                t = float(state["step"])
                if _fused_on(_local(p)):
                    _fused_update(group, state, _local(p).view(-1), _local(p.grad).reshape(-1), self.rounding,
                                  1 - beta1 ** t, 1 - beta2 ** t)
                    continue
                slices = _flat_slices(p)
                work["w"] += slices
                work["g"] += _local(p.grad).reshape(-1).split(CHUNK)
                work["m"] += _flat_slices(state["exp_avg"])
                work["v"] += _flat_slices(state["exp_avg_sq"])
                if self.rounding == "kahan":
                    work["c"] += _flat_slices(state["compensation"])
                corrections += [(1 - beta1 ** t, 1 - beta2 ** t)] * len(slices)
            for start, end in _batches([w.numel() for w in work["w"]]):
                self._update(group, {k: v[start:end] for k, v in work.items()}, corrections[start:end])

    def _update(self, group: dict[str, Any], work: dict[str, list[torch.Tensor]],
                corrections: list[tuple[float, float]]) -> None:
        """AdamW on one batch of flat slices: the weights ``w``, gradients ``g``, moments ``m``/``v`` and
        (Kahan) compensations ``c``, the math in fp32."""
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        g = _as_fp32(work["g"])
        fp32_state = self.state_dtype == torch.float32
        m, v = (work["m"], work["v"]) if fp32_state else (_as_fp32(work["m"]), _as_fp32(work["v"]))
        torch._foreach_lerp_(m, g, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, g, g, 1 - beta2)
        del g
        # torch's AdamW: w ← w·(1 - lr·wd) - lr · (m / bc1) / (sqrt(v / bc2) + eps)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, [math.sqrt(bc2) for _, bc2 in corrections])
        torch._foreach_add_(denom, eps)
        step_sizes = [-lr / bc1 for bc1, _ in corrections]
        w = _as_fp32(work["w"])
        if self.rounding == "stochastic":
            if wd:
                torch._foreach_mul_(w, 1 - lr * wd)
            torch._foreach_addcdiv_(w, m, denom, step_sizes)
            round_stochastic_(work["w"], w)
        else:
            y = _as_fp32(work["c"])  # what earlier roundings dropped, plus this step's change
            if wd:
                torch._foreach_add_(y, w, alpha=-lr * wd)
            torch._foreach_addcdiv_(y, m, denom, step_sizes)
            new = torch._foreach_add(w, y)
            torch._foreach_copy_(work["w"], new)  # round to nearest bf16
            torch._foreach_copy_(new, work["w"])
            torch._foreach_sub_(new, w)  # what the weight actually moved
            torch._foreach_sub_(y, new)  # ... short of what it should have: the new compensation
            torch._foreach_copy_(work["c"], y)
        if not fp32_state:
            round_stochastic_(work["m"], m)
            round_stochastic_(work["v"], v)


def _batches(sizes: list[int]) -> Iterator[tuple[int, int]]:
    """Consecutive index ranges of ``sizes`` each summing to at most CHUNK (a single slice is never larger)."""
    start, total = 0, 0
    for i, n in enumerate(sizes):
        if total + n > CHUNK and i > start:
            yield start, i
            start, total = i, 0
        total += n
    if start < len(sizes):
        yield start, len(sizes)
