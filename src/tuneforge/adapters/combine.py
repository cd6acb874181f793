"""Combine LoRA adapters into a new PEFT-format adapter, without a base model.

The target is the weighted sum of deltas ``Σ wᵢ·sᵢ·Bᵢ·Aᵢ`` (sᵢ = each adapter's alpha/r) per module.

- ``cat`` (exact): ``A = [A₁; A₂; …]``, ``B = [w₁s₁B₁ | w₂s₂B₂ | …] / s``. The rank is Σ rᵢ; ranks
  and target modules may differ (a module missing from an adapter contributes nothing).
- ``linear`` (approximate, PEFT's "linear"): ``A = Σ √|cᵢ|·Aᵢ``, ``B = Σ sign(cᵢ)√|cᵢ|·Bᵢ`` with
  cᵢ = wᵢsᵢ. Keeps the rank but adds cross terms ``Bᵢ·Aⱼ``; exact only for one adapter or when
  the cross terms cancel. Needs equal ranks and targets.
- ``svd``: the exact delta truncated to ``rank`` by SVD (Eckart–Young optimal); exact when
  ``rank`` ≥ Σ rᵢ.

Every result reports the relative Frobenius error of the new deltas against the exact sum, so a
user sees what ``linear`` or a low ``rank`` costs. Computed in float64, saved in float32.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tuneforge.errors import ConfigError, ModelError
from tuneforge.methods.lora import lora_scaling
from tuneforge.methods.peft_format import (
    CONFIG_NAME,
    KEY_PREFIX,
    WEIGHTS_NAME,
    _check_dir,
    _pattern_value,
    _read_weights,
    _split_keys,
    read_adapter_config,
    write_adapter_files,
)

METHODS = ("cat", "linear", "svd")


@dataclass
class Factors:
    """One module's LoRA factors: delta = scaling · B @ A."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scaling: float


@dataclass
class CombineResult:
    path: Path
    method: str
    r: int  # the most common rank; rank_pattern holds the others
    rank_pattern: dict[str, int]
    relative_error: float  # ‖ΔΔ‖_F / ‖Δ‖_F over all modules together
    max_module_error: float  # the worst module's relative error
    module_errors: dict[str, float] = field(default_factory=dict)


def read_factors(adapter_dir: str | os.PathLike) -> tuple[dict, dict[str, Factors]]:
    """An adapter directory's config and its factors by module path (checked against the config)."""
    directory = _check_dir(adapter_dir)
    config = read_adapter_config(directory)
    if config.get("use_dora"):
        raise ModelError(f"{directory / CONFIG_NAME}: use_dora=true: a DoRA adapter rescales each row of the whole "
                         "weight, so its change is not a low-rank delta and cannot be combined; merge it into the "
                         "base model instead (`tuneforge adapters merge`)")
    if config.get("lora_bias"):
        raise ModelError(f"{directory / CONFIG_NAME}: lora_bias=true: its bias on lora_B is not a low-rank delta "
                         "and combine does not carry it; merge the adapter into the base model instead "
                         "(`tuneforge adapters merge`)")
    weights_path = directory / WEIGHTS_NAME
    factors = {}
    for path, pair in _split_keys(_read_weights(directory), weights_path).items():
        a, b = pair["lora_A"], pair["lora_B"]
        r = _pattern_value(config.get("rank_pattern"), path, config["r"])
        alpha = _pattern_value(config.get("alpha_pattern"), path, config["lora_alpha"])
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != r or b.shape[1] != r:
            raise ModelError(f"{weights_path}: {KEY_PREFIX}{path} has lora_A {list(a.shape)} and lora_B "
                             f"{list(b.shape)}, which do not fit rank {r} from {CONFIG_NAME}")
        factors[path] = Factors(a.double(), b.double(), lora_scaling(r, alpha, bool(config.get("use_rslora"))))
    return config, factors


def fro_norm(b: torch.Tensor, a: torch.Tensor) -> float:
    """‖B @ A‖_F without forming B @ A: with B = Q₁R₁ and Aᵀ = Q₂R₂ it equals ‖R₁R₂ᵀ‖_F."""
    if b.shape[1] == 0:
        return 0.0
    return torch.linalg.norm(torch.linalg.qr(b).R @ torch.linalg.qr(a.T).R.T).item()


def _exact(parts: list[tuple[float, Factors]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B @ A = Σ wᵢ·sᵢ·Bᵢ·Aᵢ: the concatenation."""
    b = torch.cat([w * f.scaling * f.b for w, f in parts], dim=1)
    a = torch.cat([f.a for _, f in parts], dim=0)
    return b, a


def _linear(parts: list[tuple[float, Factors]]) -> tuple[torch.Tensor, torch.Tensor]:
    b = sum(math.copysign(math.sqrt(abs(w * f.scaling)), w * f.scaling) * f.b for w, f in parts)
    a = sum(math.sqrt(abs(w * f.scaling)) * f.a for w, f in parts)
    return b, a


def _svd(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of B @ A through QR of the thin factors (no out×in matrix is formed)."""
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    k = min(rank, s.numel())
    root = s[:k].sqrt()  # balance the singular values between the factors
    return (qb @ u[:, :k]) * root, root[:, None] * (vh[:k] @ qa.T)


def _targets(configs: list[dict], modules: list[str], all_modules: list[set[str]]) -> list[str] | str:
    # Keep the inputs' own target_modules when they agree and cover the same modules (e.g. "all-linear"),
    # else name the exact module paths so the result loads exactly where it has weights.
    first = configs[0].get("target_modules")
    if first and all(c.get("target_modules") == first for c in configs) and all(
            m == all_modules[0] for m in all_modules):
        return first
    return modules


def combine_adapters(adapter_dirs: Sequence[str | os.PathLike], weights: Sequence[float] | None,
                     out_dir: str | os.PathLike, method: str = "cat", rank: int | None = None) -> CombineResult:
    """Write the weighted combination of adapters to ``out_dir`` (PEFT format) and report its error.

    ``weights`` default to 1 each. ``rank`` is for ``svd`` (default: the largest input rank).
    """
    if method not in METHODS:
        raise ConfigError(f"combine method {method!r}: use one of {', '.join(METHODS)}")
    if not adapter_dirs:
        raise ConfigError("combine needs at least one adapter")
    weights = [1.0] * len(adapter_dirs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(adapter_dirs):
        raise ConfigError(f"{len(weights)} weights for {len(adapter_dirs)} adapters; give one weight per adapter")
    if rank is not None and (method != "svd" or rank <= 0):
        raise ConfigError(f"rank={rank}: a target rank is for --method svd and must be positive")
    loaded = [read_factors(d) for d in adapter_dirs]
    configs = [c for c, _ in loaded]
    modules = sorted({m for _, fs in loaded for m in fs})
    _check_shapes(adapter_dirs, loaded, modules)
    if method == "linear":
        _check_linear(adapter_dirs, loaded)
    if method == "svd" and rank is None:
        rank = max(f.a.shape[0] for _, fs in loaded for f in fs.values())

    tensors, ranks, errors = {}, {}, {}
    total_err = total_ref = 0.0
    for path in modules:
        parts = [(w, fs[path]) for w, (_, fs) in zip(weights, loaded, strict=True) if path in fs]
        b_exact, a_exact = _exact(parts)
        if method == "cat":
            b, a = b_exact, a_exact
        elif method == "linear":
            b, a = _linear(parts)
        else:
            b, a = _svd(b_exact, a_exact, rank)
        err = fro_norm(torch.cat([b, -b_exact], dim=1), torch.cat([a, a_exact], dim=0))
        ref = fro_norm(b_exact, a_exact)
        errors[path] = err / ref if ref > 0 else err
        total_err, total_ref = total_err + err**2, total_ref + ref**2
        ranks[path] = a.shape[0]
        tensors[path] = (a, b)

    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = float(r)  # scaling 1 for rank r; other ranks fold alpha/r_m into B so every delta is B @ A
    out: dict[str, torch.Tensor] = {}
    for path, (a, b) in tensors.items():
        scale = lora_scaling(ranks[path], alpha)
        out[f"{KEY_PREFIX}{path}.lora_A.weight"] = a.float().contiguous()
        out[f"{KEY_PREFIX}{path}.lora_B.weight"] = (b / scale).float().contiguous()
    rank_pattern = {re.escape(p): v for p, v in ranks.items() if v != r}
    config = _config(configs, _targets(configs, modules, [set(fs) for _, fs in loaded]), r, alpha, rank_pattern)

    path = write_adapter_files(out_dir, out, config)
    rel = math.sqrt(total_err / total_ref) if total_ref > 0 else math.sqrt(total_err)
    return CombineResult(path, method, r, rank_pattern, rel, max(errors.values()), errors)


def _check_shapes(dirs, loaded, modules: list[str]) -> None:
    for path in modules:
        seen = {}
        for d, (_, fs) in zip(dirs, loaded, strict=True):
            if path in fs:
                seen[str(d)] = (fs[path].b.shape[0], fs[path].a.shape[1])
        if len(set(seen.values())) > 1:
            detail = "; ".join(f"{d}: [out={o}, in={i}]" for d, (o, i) in seen.items())
            raise ModelError(f"the adapters were trained on different base models: module {path} has "
                             f"different shapes ({detail})")


def _check_linear(dirs, loaded) -> None:
    ref_dir, (_, ref) = dirs[0], loaded[0]
    for d, (_, fs) in zip(dirs[1:], loaded[1:], strict=True):
        if set(fs) != set(ref):
            raise ConfigError(f"--method linear needs the same target modules: {ref_dir} and {d} differ; "
                              "use --method cat (exact) or svd")
        for path, f in fs.items():
            if f.a.shape[0] != ref[path].a.shape[0]:
                raise ConfigError(f"--method linear needs equal ranks: {path} has rank {ref[path].a.shape[0]} "
                                  f"in {ref_dir} and {f.a.shape[0]} in {d}; use --method cat (exact) or svd")


def _config(configs: list[dict], targets, r: int, alpha: float, rank_pattern: dict[str, int]) -> dict:
    bases = [c.get("base_model_name_or_path") for c in configs if c.get("base_model_name_or_path")]
    return {
        "peft_type": "LORA", "task_type": configs[0].get("task_type") or "CAUSAL_LM",
        "base_model_name_or_path": bases[0] if bases else "", "r": r, "lora_alpha": alpha,
        "lora_dropout": 0.0, "target_modules": targets, "rank_pattern": rank_pattern, "alpha_pattern": {},
        "bias": "none", "use_rslora": False, "fan_in_fan_out": False, "modules_to_save": None,
        "inference_mode": True, "init_lora_weights": True, "use_dora": False, "lora_bias": False,
        "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None, "revision": None,
    }
