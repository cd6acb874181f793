"""Optional Triton kernels for the layers around the matmuls: Liger's RMSNorm and SwiGLU; or each decoder layer
compiled by ``torch.compile`` (``train.compile``), which fuses the same elementwise work itself (H200, 8B LoRA:
14.1k tokens/s with Liger, 15.6k compiled; the first steps wait 15-19 s for the compiler).

``train.kernels: liger`` swaps them into a loaded model (GPU only; ``pip install liger-kernel``); ``auto`` (the
default) does so on a GPU when the package is installed and has kernels for the architecture. They fuse the
elementwise work of each layer and save its activations (on an H200, 8B LoRA: 12.5k -> 15.3k tokens/s). The
loss stays tuneforge's fused linear + cross-entropy, and LoRA layers are untouched (Liger's MLP calls whatever
the projections are).
"""

from __future__ import annotations

import sys

import torch

from tuneforge.errors import ConfigError


def apply_kernels(model: torch.nn.Module, kernels: str, device: torch.device) -> str:
    """Install the configured kernels into ``model``; returns what is in use (``torch`` or ``liger``)."""
    if kernels == "torch" or kernels == "auto" and (device.type != "cuda" or not liger_available()):
        return "torch"
    if device.type != "cuda":
        raise ConfigError("train.kernels=liger needs a CUDA GPU (Liger's kernels are Triton); set "
                          "train.kernels=torch on this machine")
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance  # optional dependency
    except ImportError as e:
        raise ConfigError("train.kernels=liger needs the liger-kernel package: pip install liger-kernel "
                          f"(or set train.kernels=torch) [{e}]") from e
    model_type = getattr(model.config, "model_type", None)
    before = {id(m): type(m).forward for m in model.modules()}
    # Liger also swaps classes and functions in the transformers module itself, which would reach every
    # model built later in this process (CPU ones included): patch this instance only, then put them back.
    module = sys.modules.get(type(model).__module__)
    saved = dict(vars(module)) if module is not None else {}
    _apply_liger_kernel_to_instance(model, rope=False, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    for name, value in saved.items():
        if vars(module).get(name) is not value:
            setattr(module, name, value)
    if all(before.get(id(m)) is type(m).forward and "forward" not in vars(m) for m in model.modules()):
        if kernels == "auto":
            return "torch"
        raise ConfigError(f"Liger has no kernels for model type {model_type!r}; set train.kernels=torch")
    return "liger"


def liger_available() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401  (optional dependency)
    except ImportError:
        return False
    return True


def compile_layers(model: torch.nn.Module, device: torch.device, backend: str = "inductor",
                   mode: str | None = None) -> int:
    """``torch.compile`` every decoder layer in place (regional compilation: one layer's graph, compiled once and
    reused by all layers of the same shape); returns how many were wrapped.

    Compilation happens in the first steps, which therefore take longer (the benchmark reports that time apart).
    ``mode``: torch.compile's (None: its default).
    Raises ConfigError on the CPU (``backend="eager"`` is allowed there: it checks the wiring, not the speed).
    """
    if device.type != "cuda" and backend == "inductor":
        raise ConfigError("train.compile=true needs a CUDA GPU (on the CPU the compiler costs more than it saves); "
                          "set train.compile=false")
    layers = getattr(getattr(model, "base_model", model), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise ConfigError(f"train.compile=true: found no decoder layers (model.layers) in "
                          f"{type(model).__name__}; set train.compile=false")
    for layer in layers:
        layer.compile(backend=backend, dynamic=None, mode=mode)
    return len(layers)
