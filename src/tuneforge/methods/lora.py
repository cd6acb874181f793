"""LoRA: low-rank adapters on Linear layers, ``y = W x + scaling · B(A(dropout(x)))``.

A wrapped layer keeps its module path (``...q_proj``); its adapter weights live at
``...q_proj.lora_A.<adapter>.weight`` / ``...q_proj.lora_B.<adapter>.weight`` like PEFT's.
One layer can hold several named adapters; ``active_adapters`` says which ones run (summed, each
with an optional weight). ``row_adapters`` routes each batch row to its own adapter instead.
``disable_adapters`` runs the base weights alone for a block (the DPO reference), touching nothing else.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.errors import ConfigError, ModelError
from tuneforge.methods import dora, lora_ops
from tuneforge.quant.fp8 import Linear8
from tuneforge.quant.linear4bit import Linear4bit, is_conv1d, quantized_numel, set_submodule

ALL_LINEAR = "all-linear"


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """alpha/r, or alpha/sqrt(r) for rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def validate_lora_args(r: int, alpha: float, dropout: float) -> None:
    """Raise ConfigError for an impossible rank, alpha or dropout."""
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ConfigError(f"lora r={r!r}: the rank must be a positive integer (e.g. r=8)")
    if not alpha > 0:
        raise ConfigError(f"lora alpha={alpha!r}: alpha must be > 0 (commonly 2*r, e.g. alpha=16)")
    if not 0 <= dropout < 1:
        raise ConfigError(f"lora dropout={dropout!r}: dropout must be in [0, 1) (e.g. dropout=0.05)")


def matches_target(name: str, targets: str | Iterable[str]) -> bool:
    """PEFT's rule: a string is a full-match regex; a list matches exact names or ``.suffix``."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in targets)


def layer_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, Linear4bit, Conv1D or LoRA layer."""
    if is_conv1d(module):
        return module.nx, module.nf
    return module.in_features, module.out_features


def fan_in_fan_out(module: nn.Module) -> bool:
    """Whether the layer's checkpoint weight is ``[in, out]`` (a Conv1D, or a 4-bit layer quantized from one)."""
    return is_conv1d(module) or bool(getattr(module, "fan_in_fan_out", False))


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every nn.Linear, Conv1D, Linear4bit or LoRALinear by path; the layers inside a LoRALinear are not listed."""
    found: dict[str, nn.Module] = {}
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in inside):
            continue
        if isinstance(module, LoRALinear):
            if module.parameter_name is None:  # a LoRAParam adapts one parameter of a module, not a Linear
                found[name] = module
            inside.append(f"{name}.")
        elif isinstance(module, (nn.Linear, Linear4bit)) or is_conv1d(module):
            found[name] = module
    return found


def _output_head_names(model: nn.Module, linears: dict[str, nn.Module]) -> set[str]:
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return {n for n, m in linears.items() if m is head or n == "lm_head" or n.endswith(".lm_head")}


def find_target_modules(model: nn.Module, target_modules: list[str] | str = ALL_LINEAR) -> list[str]:
    """Paths of the Linear layers to adapt.

    ``"all-linear"``: every Linear except the output head. Otherwise names are matched as a suffix
    (``"q_proj"``), an exact path, or (for a single string) a full-match regex.
    """
    linears = linear_modules(model)
    if target_modules == ALL_LINEAR:
        heads = _output_head_names(model, linears)
        names = [n for n in linears if n not in heads]
    else:
        targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        names = [n for n in linears if matches_target(n, targets) or _regex_match(n, targets)]
    if not names:
        available = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ConfigError(
            f"lora target_modules={target_modules!r} matches no Linear layer of the model; "
            f"available names: {available} (or use 'all-linear')"
        )
    return names


def _regex_match(name: str, targets: list[str]) -> bool:
    # A single user string may be a regex too (PEFT accepts one); a bad regex is just a name.
    if len(targets) != 1:
        return False
    try:
        return re.fullmatch(targets[0], name) is not None
    except re.error:
        return False


def lora_layers(model: nn.Module, adapter_name: str | None = None) -> dict[str, LoRALinear]:
    """The LoRALinear layers by path; with ``adapter_name``, only those holding that adapter."""
    return {
        n: m for n, m in model.named_modules()
        if isinstance(m, LoRALinear) and (adapter_name is None or adapter_name in m.lora_A)
    }


def _layers_with(model: nn.Module, adapter_name: str) -> dict[str, LoRALinear]:
    layers = lora_layers(model, adapter_name)
    if not layers:
        known = sorted({a for m in lora_layers(model).values() for a in m.lora_A})
        raise ModelError(f"the model has no LoRA adapter named {adapter_name!r}; adapters: {known or 'none'}")
    return layers


def add_lora(
    model: nn.Module,
    module_names: Iterable[str],
    adapter_name: str,
    r: int | dict[str, int],
    alpha: float | dict[str, float],
    dropout: float = 0.0,
    use_rslora: bool = False,
    use_dora: bool = False,
    lora_bias: bool = False,
) -> list[str]:
    """Add adapter ``adapter_name`` to the named Linear layers (wrapping them when needed).

    ``r``/``alpha`` may be per-module dicts (PEFT's rank_pattern/alpha_pattern, resolved); ``use_dora``
    adds a DoRA magnitude vector per layer, ``lora_bias`` a bias to B (PEFT's). The new adapter becomes the
    only active one.
    """
    names = list(module_names)
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear) and adapter_name in module.lora_A:
            raise ModelError(
                f"{name} already has a LoRA adapter named {adapter_name!r}; pass another adapter_name"
            )
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, LoRALinear):
            module = LoRALinear(module, adapter_name=None)
            set_submodule(model, name, module)
        r_m = r[name] if isinstance(r, dict) else r
        alpha_m = alpha[name] if isinstance(alpha, dict) else alpha
        module.add_adapter(adapter_name, r_m, alpha_m, dropout, use_rslora, use_dora, lora_bias)
    set_active_adapters(model, [adapter_name])
    return names


def apply_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    target_modules: list[str] | str = ALL_LINEAR,
    use_rslora: bool = False,
    adapter_name: str = "default",
    use_dora: bool = False,
) -> list[str]:
    """Wrap the target Linears with LoRA (DoRA with ``use_dora``) and make only this adapter trainable;
    returns the paths."""
    validate_lora_args(r, alpha, dropout)
    names = add_lora(model, find_target_modules(model, target_modules), adapter_name, r, alpha,
                     dropout, use_rslora, use_dora)
    mark_only_lora_trainable(model, adapter_name)
    return names


def set_active_adapters(model: nn.Module, adapter_names: list[str],
                        weights: Mapping[str, float] | Sequence[float] | None = None) -> None:
    """Run exactly these adapters (summed) in every LoRA layer that holds them.

    ``weights`` (by name or in order; default 1) multiply each adapter's scaling in forward; the
    base weights are never touched.
    """
    if weights is None:
        weights = {}
    elif not isinstance(weights, Mapping):
        weights = list(weights)
        if len(weights) != len(adapter_names):
            raise ConfigError(f"{len(weights)} adapter weights for {len(adapter_names)} adapters; "
                              "give one weight per adapter")
        weights = dict(zip(adapter_names, weights, strict=True))
    for name in adapter_names:
        _layers_with(model, name)
    activate_layers(lora_layers(model).values(), adapter_names, weights)


def activate_layers(layers: Iterable[LoRALinear], adapter_names: list[str], weights: Mapping[str, float]) -> None:
    """``set_active_adapters`` on given layers, unchecked: for callers that cache the layer list."""
    for layer in layers:
        layer.active_adapters = [a for a in adapter_names if a in layer.lora_A]
        layer.adapter_weights = {a: float(weights.get(a, 1.0)) for a in layer.active_adapters}


@contextmanager
def row_adapters(model: nn.Module, adapter_names: Sequence[str | None]) -> Iterator[None]:
    """Within the block, batch row ``i`` runs adapter ``adapter_names[i]`` (None: the base alone).

    Every forward inside must have ``len(adapter_names)`` rows. The base matmul runs once for the
    whole batch; each adapter's low-rank update runs only on its own rows. Active adapters and their
    weights are ignored meanwhile (and untouched). Merged adapters would leak into every row, so
    they are refused.
    """
    for name in {n for n in adapter_names if n is not None}:
        _layers_with(model, name)
    layers = lora_layers(model)
    merged = sorted({a for m in layers.values() for a in m.merged_adapters})
    if merged:
        raise ModelError(f"adapters {merged} are merged into the base weights; unmerge them before "
                         "running a batch with one adapter per row")
    for layer in layers.values():
        if layer.row_groups is not None:
            raise ModelError("row_adapters is already in effect on this model; nested use is not supported")
    device = next(iter(layers.values())).weight.device if layers else torch.device("cpu")
    rows: dict[str, list[int]] = {}
    for i, name in enumerate(adapter_names):
        if name is not None:
            rows.setdefault(name, []).append(i)
    # Index tensors are built once here, not at every forward of every layer.
    index = {n: torch.tensor(r, dtype=torch.long, device=device) for n, r in rows.items()}
    try:
        for layer in layers.values():
            layer.batch_rows = len(adapter_names)
            layer.row_groups = [(n, idx) for n, idx in index.items() if n in layer.lora_A]
        yield
    finally:
        for layer in layers.values():
            layer.row_groups = None


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Within the block every LoRA layer runs its base weights alone; active adapters and weights are untouched.

    Raises ConfigError when the model has no LoRA layer, ModelError when an adapter is merged (the base
    weights then hold it, so switching adapters off would not give the base model).
    """
    layers = list(lora_layers(model).values())
    if not layers:
        raise ConfigError("the model has no LoRA adapters to switch off (full fine-tuning has none); "
                          "use preference.reference: model or precomputed")
    merged = sorted({a for m in layers for a in m.merged_adapters})
    if merged:
        raise ModelError(f"adapters {merged} are merged into the base weights, so switching adapters off does "
                         "not give the base model; unmerge them first")
    before = [m.disabled for m in layers]
    try:
        for m in layers:
            m.disabled = True
        yield
    finally:
        for m, was in zip(layers, before, strict=True):
            m.disabled = was


def mark_only_lora_trainable(model: nn.Module, adapter_name: str = "default") -> None:
    """Freeze everything except adapter ``adapter_name``'s A and B matrices (and DoRA magnitudes)."""
    model.requires_grad_(False)
    for layer in _layers_with(model, adapter_name).values():
        layer.lora_A[adapter_name].requires_grad_(True)
        layer.lora_B[adapter_name].requires_grad_(True)
        if adapter_name in layer.lora_magnitude_vector:
            layer.lora_magnitude_vector[adapter_name].requires_grad_(True)


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """``<path>.lora_A.weight`` / ``<path>.lora_B.weight`` (and DoRA's ``<path>.lora_magnitude_vector``)
    tensors, adapter name stripped (as PEFT)."""
    out: dict[str, torch.Tensor] = {}
    for path, layer in _layers_with(model, adapter_name).items():
        out[f"{path}.lora_A.weight"] = layer.lora_A[adapter_name].weight.detach()
        out[f"{path}.lora_B.weight"] = layer.lora_B[adapter_name].weight.detach()
        if layer.lora_B[adapter_name].bias is not None:
            out[f"{path}.lora_B.bias"] = layer.lora_B[adapter_name].bias.detach()
        if adapter_name in layer.lora_magnitude_vector:
            out[f"{path}.lora_magnitude_vector"] = layer.lora_magnitude_vector[adapter_name].detach()
    return out


def merge_lora(model: nn.Module, adapter_name: str = "default") -> list[str]:
    """Add the adapter's delta into the base weights; returns the merged layer paths."""
    layers = _layers_with(model, adapter_name)
    get_in = getattr(model, "get_input_embeddings", None)
    embed = get_in() if callable(get_in) else None
    for path, layer in layers.items():
        # A tied output head shares its weight with the input embeddings: merging would change both.
        if embed is not None and layer.weight is getattr(embed, "weight", None):
            raise ModelError(
                f"cannot merge LoRA into {path}: its weight is tied to the input embeddings; "
                "untie them (tie_word_embeddings=False) or do not target the output head"
            )
    for layer in layers.values():
        layer.merge(adapter_name)
    return list(layers)


def unmerge_lora(model: nn.Module, adapter_name: str = "default") -> list[str]:
    """Subtract a merged adapter's delta from the base weights; returns the layer paths."""
    layers = _layers_with(model, adapter_name)
    for layer in layers.values():
        layer.unmerge(adapter_name)
    return list(layers)


def unwrap_lora(model: nn.Module) -> list[str]:
    """Replace every LoRALinear by its base Linear (merge first to keep an adapter's effect)."""
    layers = lora_layers(model)
    for path, layer in reversed(layers.items()):  # nested wrappers (LoRAParam): the inner one first
        set_submodule(model, path, layer.base_layer)
    return list(layers)


def remove_lora(model: nn.Module, adapter_name: str) -> list[str]:
    """Drop adapter ``adapter_name`` everywhere (unmerging it first); layers left empty are unwrapped."""
    layers = _layers_with(model, adapter_name)
    for path, layer in reversed(layers.items()):  # nested wrappers (LoRAParam): the inner one first
        layer.remove_adapter(adapter_name)
        if not layer.lora_A:
            set_submodule(model, path, layer.base_layer)
    return list(layers)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights count once, 4-bit and FP8 weights as their full shape."""
    params = list(model.parameters())
    quantized = quantized_numel(model) + sum(m.weight.numel() for m in model.modules() if isinstance(m, Linear8))
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params) + quantized


def format_trainable(model: nn.Module) -> str:
    """``trainable params: 1,234 || all params: 135,000,000 || trainable%: 0.0009``."""
    trainable, total = count_parameters(model)
    pct = 100 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {pct:.4f}"


class LoRALinear(nn.Module):
    """A frozen Linear (or Conv1D) plus named low-rank adapters.

    Hyper-parameters are kept per adapter (``r``, ``lora_alpha``, ``use_rslora``, ``scaling``,
    ``dropout``) so an adapter can be saved in PEFT format from the model alone.
    """

    parameter_name: str | None = None  # set by LoRAParam, which adapts one parameter of a module

    def __init__(
        self,
        base_layer: nn.Linear,
        adapter_name: str | None = "default",
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        self.in_features, self.out_features = self._base_features(base_layer)
        self.fan_in_fan_out = fan_in_fan_out(base_layer)  # merges add the delta transposed
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA adapters only: m, one per output row
        self.dora_norms: dict[str, torch.Tensor] = {}  # a merged DoRA adapter's row norms, to unmerge exactly
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.dropout: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.adapter_weights: dict[str, float] = {}  # multiplies the scaling of an active adapter
        self.merged_adapters: list[str] = []
        self.disabled = False  # set by disable_adapters(): the base weights alone
        # Set by row_adapters(): (adapter, row indices) pairs for a batch of ``batch_rows`` rows.
        self.row_groups: list[tuple[str, torch.Tensor]] | None = None
        self.batch_rows = 0
        # (input, output) handed over by the group's hook for this call only (lora_groups.py); cleared when taken
        self.group_output: tuple[torch.Tensor, int | None, torch.Tensor] | None = None
        if adapter_name is not None:
            self.add_adapter(adapter_name, r, alpha, dropout, use_rslora)
            self.active_adapters = [adapter_name]

    def _base_features(self, base_layer: nn.Module) -> tuple[int, int]:
        return layer_features(base_layer)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0,
                    use_rslora: bool = False, use_dora: bool = False, lora_bias: bool = False) -> None:
        """Add adapter ``name``: A kaiming-uniform(a=√5), B (and its bias) zeros, so the output is unchanged
        (DoRA's magnitude starts as the base weight's row norms)."""
        validate_lora_args(r, alpha, dropout)
        if use_dora and lora_bias:
            raise ConfigError("DoRA with a bias on lora_B is not supported (peft refuses it too); drop one")
        if name in self.lora_A:
            raise ModelError(f"LoRA adapter {name!r} already exists on this layer; pass another adapter_name")
        weight = self.weight
        # Adapters train in at least fp32 even when the base is bf16/fp16 or quantized.
        dtype = torch.float32
        if weight.is_floating_point():
            dtype = torch.promote_types(weight.dtype, dtype)
        kw = {"device": weight.device, "dtype": dtype}
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, **kw)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=lora_bias, **kw)
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)
        if lora_bias:
            nn.init.zeros_(self.lora_B[name].bias)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r[name], self.lora_alpha[name], self.use_rslora[name] = r, alpha, use_rslora
        self.dropout[name] = dropout
        self.scaling[name] = lora_scaling(r, alpha, use_rslora)
        if use_dora:
            with torch.no_grad():
                norm = torch.linalg.norm(self.dense_weight().to(dtype), dim=1)
            self.lora_magnitude_vector[name] = nn.Parameter(norm)

    def dense_weight(self) -> torch.Tensor:
        """The base weight as a dense ``[out, in]`` tensor (dequantized for a 4-bit or FP8 base, transposed for
        Conv1D)."""
        if isinstance(self.base_layer, Linear4bit):
            return self.base_layer.dequantize(self.base_layer.compute_dtype)
        if isinstance(self.base_layer, Linear8):
            return self.base_layer.dequantized().to(self.base_layer.out_dtype)
        w = self.base_layer.weight
        return w.t() if self.fan_in_fan_out else w

    def remove_adapter(self, name: str) -> None:
        """Drop adapter ``name`` (unmerging it first if merged)."""
        self._check(name)
        self.unmerge(name)
        for d in (self.lora_A, self.lora_B, self.lora_dropout):
            del d[name]
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
        for d in (self.r, self.lora_alpha, self.use_rslora, self.dropout, self.scaling):
            del d[name]
        self.adapter_weights.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def _check(self, name: str) -> None:
        if name not in self.lora_A:
            raise ModelError(f"no LoRA adapter named {name!r} on this layer; adapters: {list(self.lora_A)}")

    def delta_weight(self, name: str) -> torch.Tensor:
        """``scaling · B @ A`` in fp32 (out × in)."""
        self._check(name)
        a = self.lora_A[name].weight.float()
        b = self.lora_B[name].weight.float()
        return (b @ a) * self.scaling[name]

    def merge(self, name: str) -> None:
        """Add the adapter's delta into the base weight (no-op when already merged)."""
        self._check(name)
        if name in self.merged_adapters:
            return
        if isinstance(self.base_layer, Linear4bit | Linear8):
            raise ModelError("cannot merge an adapter into a 4-bit base layer (or an FP8 one): load the base model in "
                             "16/32-bit and merge there (`tuneforge adapters merge` does)")
        if name in self.lora_magnitude_vector:
            self._merge_dora(name)
            return
        if any(a in self.lora_magnitude_vector for a in self.merged_adapters):
            raise ModelError(f"cannot merge adapter {name!r} while DoRA adapter {self.merged_adapters} is merged into "
                             "the same layer: a DoRA adapter merges exactly only alone; unmerge it first")
        bias = self.lora_B[name].bias
        if bias is not None and self.bias is None:
            raise ModelError(f"cannot merge adapter {name!r}: it has a bias on lora_B but the base layer has no bias")
        w = self.weight  # the Linear's weight, or a LoRAParam's expert stack
        with torch.no_grad():
            w.copy_((w.float() + self._delta_as_stored(name)).to(w.dtype))
            if bias is not None:
                self.bias.add_((bias * self.scaling[name]).to(self.bias.dtype))
        self.merged_adapters.append(name)

    def _merge_dora(self, name: str) -> None:
        # DoRA rescales the whole weight, so it merges (and unmerges) exactly only alone.
        if self.merged_adapters:
            raise ModelError(f"cannot merge DoRA adapter {name!r} while {self.merged_adapters} is merged into the "
                             "same layer: a DoRA adapter merges exactly only alone; unmerge the other first")
        w = self.base_layer.weight
        with torch.no_grad():
            new, self.dora_norms[name] = dora.merged_weight(self.dense_weight(), self.delta_weight(name),
                                                            self.lora_magnitude_vector[name])
            w.copy_((new.t() if self.fan_in_fan_out else new).to(w.dtype))
        self.merged_adapters.append(name)

    def unmerge(self, name: str) -> None:
        """Subtract a merged adapter's delta from the base weight (no-op when not merged)."""
        self._check(name)
        if name not in self.merged_adapters:
            return
        w = self.weight
        with torch.no_grad():
            if name in self.lora_magnitude_vector:
                old = dora.unmerged_weight(self.dense_weight(), self.delta_weight(name),
                                           self.lora_magnitude_vector[name], self.dora_norms.pop(name))
                w.copy_((old.t() if self.fan_in_fan_out else old).to(w.dtype))
            else:
                w.copy_((w.float() - self._delta_as_stored(name)).to(w.dtype))
                if self.lora_B[name].bias is not None:
                    self.bias.sub_((self.lora_B[name].bias * self.scaling[name]).to(self.bias.dtype))
        self.merged_adapters.remove(name)

    def _delta_as_stored(self, name: str) -> torch.Tensor:
        delta = self.delta_weight(name)
        return delta.t() if self.fan_in_fan_out else delta

    def _lora(self, name: str, x: torch.Tensor, scale: float) -> torch.Tensor:
        a = self.lora_A[name].weight.to(x.dtype)
        b = self.lora_B[name].weight.to(x.dtype)
        bias = self.lora_B[name].bias
        return F.linear(F.linear(self.lora_dropout[name](x), a), b, None if bias is None else bias.to(x.dtype)) * scale

    def _add_lora(self, y: torch.Tensor, name: str, x: torch.Tensor, scale: float,
                  xa: torch.Tensor | None = None) -> torch.Tensor:
        """``y + scale · B(A(x))`` with the scale folded into B and the sum done by the second GEMM (addmm),
        so no elementwise pass over the full-width output is needed. ``xa``: ``A(dropout(x))`` when already
        computed (this layer's columns of its group's stacked GEMM, lora_groups.py)."""
        if xa is None:
            xa = F.linear(self.lora_dropout[name](x), self.lora_A[name].weight.to(x.dtype))
        b = self.lora_B[name].weight * scale
        xa = xa.reshape(-1, xa.shape[-1]).to(y.dtype)
        out = torch.addmm(y.reshape(-1, y.shape[-1]), xa, b.to(y.dtype).t())
        if self.lora_B[name].bias is not None:  # PEFT's lora_bias: scaled like B
            out = out + (self.lora_B[name].bias * scale).to(y.dtype)
        return out.view(y.shape)

    def _dora_update(self, y: torch.Tensor, name: str, x: torch.Tensor) -> torch.Tensor:
        """What DoRA adapter ``name`` adds to the output ``y`` of input ``x`` (peft's forward, dropout included)."""
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        x = x.to(a.dtype)  # in the adapter's dtype (fp32 over a bf16 base), as peft: the norm needs it
        w = self.dense_weight().to(a.dtype)
        scale = self.scaling[name]
        factor = dora.output_factor(self.lora_magnitude_vector[name], w, b @ a, scale)
        dropout = self.lora_dropout[name]
        if self.training and not isinstance(dropout, nn.Identity):
            x = dropout(x)  # peft: the base term is then recomputed on the dropped-out input
            base_out = F.linear(x, w)
        else:
            base_out = y if self.bias is None else y - self.bias.to(y.dtype)
        lora_out = F.linear(F.linear(x, a), b)
        return dora.update(factor, base_out, lora_out, scale).to(y.dtype)

    def plain_adapter(self) -> str | None:
        """The adapter a training forward runs through the grouped or fused paths: the only active one, plain LoRA
        (no DoRA, no lora_bias), not merged, adapters on, no per-row routing, gradients on; else None."""
        if self.disabled or self.row_groups is not None or len(self.active_adapters) != 1 \
                or not torch.is_grad_enabled():
            return None
        name = self.active_adapters[0]
        if name in self.merged_adapters or name in self.lora_magnitude_vector or self.lora_B[name].bias is not None:
            return None
        return name

    def _fused_adapter(self, x: torch.Tensor) -> str | None:
        """The :meth:`plain_adapter` when its training forward runs as one op with the base
        (:func:`lora_ops.lora_forward`: a base the ops take); else None."""
        name = self.plain_adapter()
        return name if name is not None and lora_ops.fusable(self.base_layer, x) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # computed with its group (lora_groups.py), unless x changed in place since
        if (given := self.group_output) is not None and given[0] is x and (given[1] is None or given[1] == x._version):
            self.group_output = None
            return given[2]
        if (name := self._fused_adapter(x)) is not None:
            scale = self.scaling[name] * self.adapter_weights.get(name, 1.0)
            return lora_ops.lora_forward(x, [self.base_layer], self.lora_dropout[name], [self.lora_A[name].weight],
                                         [self.lora_B[name].weight], [scale])[0]
        y = self.base_layer(x)
        if self.disabled:
            return y
        if self.row_groups is not None:
            return self._forward_rows(x, y)
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue
            if name in self.lora_magnitude_vector:
                y = y + self.adapter_weights.get(name, 1.0) * self._dora_update(y, name, x)
            else:
                y = self._add_lora(y, name, x, self.scaling[name] * self.adapter_weights.get(name, 1.0))
        return y

    def _forward_rows(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != self.batch_rows:
            raise ModelError(
                f"row_adapters was given {self.batch_rows} rows but the forward has {x.shape[0]}; "
                "beam search and several samples per prompt are not supported with one adapter per row"
            )
        for name, rows in self.row_groups:
            if name in self.lora_magnitude_vector:  # DoRA rescales each row's own output: same rows in and out
                if rows.numel() == x.shape[0]:
                    y = y + self._dora_update(y, name, x)
                else:
                    y = y.index_add(0, rows, self._dora_update(y.index_select(0, rows), name, x.index_select(0, rows)))
            elif rows.numel() == x.shape[0]:  # every row: no gather/scatter needed
                y = self._add_lora(y, name, x, self.scaling[name])
            else:
                delta = self._lora(name, x.index_select(0, rows), self.scaling[name])
                y = y.index_add(0, rows, delta.to(y.dtype))
        return y

    def extra_repr(self) -> str:
        parts = [f"{n}: r={self.r[n]}, alpha={self.lora_alpha[n]}{', dora' * (n in self.lora_magnitude_vector)}"
                 for n in self.lora_A]
        return f"in={self.in_features}, out={self.out_features}, adapters=[{'; '.join(parts)}]"
