"""LoRA on parameters that are not Linear layers: MoE expert stacks and routers (PEFT's ``target_parameters``).

In transformers 5 the experts of Mixtral, Qwen2/3-MoE, OLMoE and GPT-OSS are one module holding 3D
parameters (``experts.gate_up_proj`` ``[E, out, in]``, or ``[E, in, out]`` where the module says
``is_transposed``), and routers are 2D ``weight`` parameters of a non-Linear module. ``LoRAParam`` wraps
such a module and adds ``scaling · B_e @ A_e`` to expert ``e``'s weight during the forward, exactly as
PEFT's ``ParamWrapper``:

- ``lora_A`` is ``[r·E, in]`` (rows expert-major: expert ``e`` owns rows ``e·r … e·r+r-1``) and ``lora_B``
  is ``[out, r·E]`` (columns rank-major: expert ``e`` owns columns ``e, E+e, 2E+e …``);
- a 2D parameter is one "expert": ``A`` ``[r, in]``, ``B`` ``[out, r]``, the delta ``[out, in]``;
- two parameters of one module nest: the parameter registered first is wrapped first (innermost), so
  its adapter keys read ``…experts.base_layer.lora_A.weight`` and the other's ``…experts.lora_A.weight``;
- no dropout (the input of the expert matmuls is not reachable from outside the module).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.func import functional_call

from tuneforge.errors import ConfigError, ModelError
from tuneforge.methods.lora import (
    ALL_LINEAR,
    LoRALinear,
    lora_scaling,
    mark_only_lora_trainable,
    set_active_adapters,
)
from tuneforge.quant.experts4bit import Experts4bit
from tuneforge.quant.linear4bit import set_submodule


def _wrappers(module: nn.Module) -> Iterator[LoRAParam]:
    """The LoRAParam wrappers around a module, outermost first."""
    while isinstance(module, LoRAParam):
        yield module
        module = module.base_layer


def unwrap_params(module: nn.Module) -> nn.Module:
    """The module a chain of LoRAParam wrappers adapts (an ``Experts4bit`` stands for its experts module)."""
    for wrapper in _wrappers(module):
        module = wrapper.base_layer
    return module


def _raw(module: nn.Module) -> nn.Module:
    """The transformers module itself: LoRAParam wrappers and 4-bit storage taken off."""
    module = unwrap_params(module)
    return module.base_layer if isinstance(module, Experts4bit) else module


def owned_parameters(module: nn.Module) -> list[tuple[str, torch.Size]]:
    """(name, shape) of the parameters a module holds itself, in registration order (4-bit stacks included)."""
    module = unwrap_params(module)
    own = [(n, p.shape) for n, p in _raw(module).named_parameters(recurse=False)]
    if isinstance(module, Experts4bit):  # its stacks were registered before the module's remaining parameters
        return [(n, s[0]) for n, s in module.stacks.items()] + own
    return own


def dense_parameter(module: nn.Module, name: str) -> torch.Tensor:
    """Parameter ``name`` of the wrapped module as a dense tensor (a 4-bit stack dequantized)."""
    module = unwrap_params(module)
    if isinstance(module, Experts4bit) and name in module.stacks:
        return module.dense(name)
    return getattr(_raw(module), name)


def param_features(module: nn.Module, name: str) -> tuple[int, int, int, bool]:
    """(experts, in, out, stored [in, out]) of parameter ``name``: 2D is ``[out, in]``; 3D is ``[E, out, in]``
    unless the module declares ``is_transposed`` (GPT-OSS: ``[E, in, out]``), PEFT's rule."""
    shape = dict(owned_parameters(module))[name]
    if len(shape) == 2:
        return 1, shape[1], shape[0], False
    if getattr(_raw(module), "is_transposed", False):
        return shape[0], shape[1], shape[2], True
    return shape[0], shape[2], shape[1], False


def _parameter_owners(model: nn.Module):
    """(path, module) of every module outside LoRA wrappers; a wrapper stands for the module it adapts."""
    for path, module in model.named_modules():
        if "base_layer" not in path.split("."):
            yield path, unwrap_params(module)


def expert_parameters(model: nn.Module) -> list[tuple[str, str]]:
    """(module path, parameter name) of every 3D parameter: the stacked expert weights of an MoE model."""
    return [(path, name) for path, module in _parameter_owners(model)
            for name, shape in owned_parameters(module) if len(shape) == 3]


def router_parameters(model: nn.Module) -> list[tuple[str, str]]:
    """(module path, ``weight``) of every MoE router that is not an nn.Linear (transformers 5's ``*Router``)."""
    return [(path, "weight") for path, module in _parameter_owners(model)
            if type(module).__name__.endswith("Router") and getattr(module, "weight", None) is not None
            and module.weight.dim() == 2]


def find_target_parameters(model: nn.Module, targets: Iterable[str]) -> list[tuple[str, str]]:
    """PEFT's matching: ``<module path>.<parameter>`` equals a target or ends with ``.<target>``.

    In model order, and within a module in the order its parameters were registered (PEFT's nesting order).
    """
    targets = list(targets)
    return [(path, name) for path, module in _parameter_owners(model)
            for name, shape in owned_parameters(module)
            if len(shape) in (2, 3) and any(f"{path}.{name}" == t or f"{path}.{name}".endswith(f".{t}")
                                            for t in targets)]


def parameter_targets(model: nn.Module, target_modules: list[str] | str,
                      target_parameters: list[str] | None) -> list[tuple[str, str]]:
    """What ``method.lora.target_parameters`` selects: null means the expert weights under ``all-linear`` (routers
    left out: they decide which experts run, and PEFT leaves them out too) and nothing otherwise."""
    if target_parameters is None:
        return expert_parameters(model) if target_modules == ALL_LINEAR else []
    found = find_target_parameters(model, target_parameters)
    if target_parameters and not found:
        candidates = [f"{p.rsplit('.', 1)[-1]}.{n}" for p, n in expert_parameters(model) + router_parameters(model)]
        raise ConfigError(f"method.lora.target_parameters={target_parameters!r} matches no parameter of the model; "
                          f"this model has {sorted(set(candidates)) or 'no expert or router parameters'}")
    return found


def per_expert_key_fix(model: nn.Module, path: str) -> str | None:
    """The fix for an adapter key of one expert's Linear (``…experts.3.w1``, transformers 4's layout) on a model
    whose experts are 3D stacks; None for any other key."""
    if not re.search(r"\.experts\.\d+\.", path) or not expert_parameters(model):
        return None
    return ("this adapter was made on transformers 4, where each expert was its own Linear; here the experts are "
            "3D stacks. peft converts such adapters when it loads them: load it with peft on transformers 5 and "
            "save_pretrained it again, then load that")


def describe_targets(model: nn.Module) -> str | None:
    """For an MoE model, what LoRA adapts: Linear layers, expert/router parameters, and how to add the routers."""
    experts, routers = expert_parameters(model), router_parameters(model)
    if not experts and not routers:
        return None
    wrapped = {(_owner_path(p), m.parameter_name) for p, m in model.named_modules() if isinstance(m, LoRAParam)}
    linear = sorted({p.rsplit(".", 1)[-1] for p, m in model.named_modules()
                     if isinstance(m, LoRALinear) and m.parameter_name is None})
    adapted = [t for t in experts + routers if t in wrapped]
    left = [t for t in routers if t not in wrapped]
    text = f"LoRA targets: Linear {', '.join(linear) or 'none'}; parameters {describe_parameters(adapted) or 'none'}"
    if left:
        name = f"{left[0][0].rsplit('.', 2)[-2]}.{left[0][0].rsplit('.', 1)[-1]}.{left[0][1]}"
        text += f"; routers left out (add {name} to method.lora.target_parameters to adapt them)"
    return text


def add_lora_params(model: nn.Module, targets: Iterable[tuple[str, str]], adapter_name: str,
                    r: int | dict[tuple[str, str], int], alpha: float | dict[tuple[str, str], float],
                    use_rslora: bool = False) -> list[str]:
    """Add adapter ``adapter_name`` to each (module path, parameter); returns the wrappers' paths.

    ``r``/``alpha`` may be per-target dicts (peft's rank_pattern/alpha_pattern, resolved). A parameter already
    wrapped (by another adapter) gets the new adapter in its wrapper; otherwise the module is wrapped once more
    (the new wrapper outermost), as PEFT nests them.
    """
    for target in targets:
        path, name = target
        wrapper = _wrapper_of(model.get_submodule(path), name)
        if wrapper is None:
            wrapper = LoRAParam(model.get_submodule(path), name)
            set_submodule(model, path, wrapper)
        wrapper.add_adapter(adapter_name, r[target] if isinstance(r, dict) else r,
                            alpha[target] if isinstance(alpha, dict) else alpha, 0.0, use_rslora)
    return param_layer_paths(model, adapter_name)


def param_layer_paths(model: nn.Module, adapter_name: str | None = None) -> list[str]:
    """Paths of the LoRAParam wrappers (the PEFT key prefixes), those holding ``adapter_name`` if given."""
    return [p for p, m in model.named_modules()
            if isinstance(m, LoRAParam) and (adapter_name is None or adapter_name in m.lora_A)]


def _wrapper_of(module: nn.Module, name: str) -> LoRAParam | None:
    return next((w for w in _wrappers(module) if w.parameter_name == name), None)


def describe_parameters(targets: list[tuple[str, str]]) -> str:
    """``experts.gate_up_proj, experts.down_proj (x4 layers)``: the distinct module-suffix.parameter names."""
    names = [f"{path.rsplit('.', 1)[-1]}.{name}" for path, name in targets]
    distinct = list(dict.fromkeys(names))
    return ", ".join(distinct) + (f" (in {len(names) // max(len(distinct), 1)} layers)" if targets else "")


def apply_lora_params(model: nn.Module, targets: list[tuple[str, str]], r: int, alpha: float,
                      use_rslora: bool = False, adapter_name: str = "default") -> list[str]:
    """``add_lora_params`` then make adapter ``adapter_name`` (Linear layers included) the one that trains."""
    paths = add_lora_params(model, targets, adapter_name, r, alpha, use_rslora)
    set_active_adapters(model, [adapter_name])
    mark_only_lora_trainable(model, adapter_name)
    return paths


class LoRAParam(LoRALinear):
    """LoRA on one 2D/3D parameter of a module (PEFT's ParamWrapper); see the module docstring for the layout."""

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        shape = dict(owned_parameters(base_layer)).get(parameter_name)
        if shape is None or len(shape) not in (2, 3):
            raise ModelError(f"LoRA on parameter {parameter_name!r} of {type(base_layer).__name__}: only 2D and 3D "
                             "parameters (expert stacks, router weights) can be adapted")
        self.parameter_name = parameter_name
        super().__init__(base_layer, adapter_name=None)

    def _base_features(self, base_layer: nn.Module) -> tuple[int, int]:
        self.num_experts, in_f, out_f, self.stored_in_out = param_features(base_layer, self.parameter_name)
        return in_f, out_f

    @property
    def weight(self) -> torch.Tensor:
        """The parameter, or for a 4-bit stack its packed codes (uint8: the adapters then train in fp32)."""
        module = unwrap_params(self.base_layer)
        if isinstance(module, Experts4bit) and self.parameter_name in module.stacks:
            return module.quantized(self.parameter_name).packed
        return getattr(_raw(module), self.parameter_name)

    @property
    def bias(self) -> torch.Tensor | None:
        return None

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False) -> None:
        """A ``[r·E, in]``, B ``[out, r·E]`` (kaiming-uniform A, zero B); dropout is not possible here."""
        if dropout:
            raise ConfigError(f"LoRA on {self.parameter_name} cannot use dropout (as in PEFT's target_parameters): "
                              "set method.lora.dropout: 0")
        super().add_adapter(name, r * self.num_experts, alpha, 0.0, use_rslora)
        self.r[name], self.scaling[name] = r, lora_scaling(r, alpha, use_rslora)

    def delta_weight(self, name: str) -> torch.Tensor:
        """``scaling · B_e @ A_e`` per expert in fp32, in the parameter's own layout."""
        self._check(name)
        a = self.lora_A[name].weight.float()
        b = self.lora_B[name].weight.float()
        if self.num_experts == 1 and len(dict(owned_parameters(self.base_layer))[self.parameter_name]) == 2:
            return (b @ a) * self.scaling[name]
        e = self.num_experts
        a = a.reshape(e, -1, a.shape[-1])  # [E, r, in]
        b = b.reshape(b.shape[0], -1, e).permute(2, 0, 1)  # [E, out, r]
        delta = torch.bmm(b, a) * self.scaling[name]  # [E, out, in]
        return delta.transpose(1, 2) if self.stored_in_out else delta

    def _delta_as_stored(self, name: str) -> torch.Tensor:
        if not self.weight.is_floating_point():
            raise ModelError("cannot merge an adapter into 4-bit expert weights: load the base model in 16/32-bit "
                             "and merge there (`tuneforge adapters merge` does)")
        return self.delta_weight(name)

    def _running(self) -> list[str]:
        """The adapters this forward adds: the active ones, or under ``row_adapters`` the one every row runs."""
        if self.disabled:
            return []
        if self.row_groups is None:
            return [a for a in self.active_adapters if a not in self.merged_adapters]
        # The experts see tokens routed across rows, so the rows cannot run different adapters here.
        if len(self.row_groups) == 1 and self.row_groups[0][1].numel() == self.batch_rows:
            return [self.row_groups[0][0]]
        if not self.row_groups:
            return []
        raise ModelError(f"adapter(s) {[n for n, _ in self.row_groups]} put LoRA on {self.parameter_name} (MoE "
                         "experts/routers), whose tokens are routed across batch rows: a batch can run only one such "
                         "adapter for all its rows (peft has no per-row adapters here either); send one adapter per "
                         "request batch")

    def forward(self, *args, **kwargs):
        active = self._running()
        if not active:
            return self.base_layer(*args, **kwargs)
        weight = dense_parameter(self.base_layer, self.parameter_name)
        delta = sum(self.delta_weight(a) * self.adapter_weights.get(a, 1.0) for a in active)
        # The base runs with W + delta in place of W (autograd reaches A and B through delta), as PEFT's
        # parametrization does; a nested wrapper adds its own parameter's delta inside, and an Experts4bit
        # dequantizes only the stacks not given here.
        stored = isinstance(unwrap_params(self.base_layer), Experts4bit)
        path = ".".join(["base_layer"] * (len(_chain(self.base_layer)) + stored) + [self.parameter_name])
        return functional_call(self.base_layer, {path: weight + delta.to(weight.dtype)}, args, kwargs,
                               strict=False)

    def extra_repr(self) -> str:
        return f"parameter={self.parameter_name}, experts={self.num_experts}, {super().extra_repr()}"


def is_param_key(path: str, target_parameters: list[str] | None) -> bool:
    """Whether adapter key prefix ``path`` (``…experts.base_layer``) is a LoRAParam's, by ``target_parameters``."""
    module = _owner_path(path)
    owners = [t.rpartition(".")[0] for t in target_parameters or []]
    return any(module == o or module.endswith(f".{o}") for o in owners if o)


def target_parameter_names(model: nn.Module, layers: dict[str, LoRALinear]) -> list[str] | None:
    """PEFT's ``target_parameters`` for the LoRAParam layers among ``layers`` (None when there are none).

    ``<module>.<parameter>`` names (``experts.gate_up_proj``) when they select exactly these parameters, else
    full paths.
    """
    params = {p: layer for p, layer in layers.items() if isinstance(layer, LoRAParam)}
    if not params:
        return None
    owned = {(_owner_path(p), layer.parameter_name) for p, layer in params.items()}
    short = sorted({f"{path.rsplit('.', 1)[-1]}.{pname}" for path, pname in owned})
    if set(find_target_parameters(model, short)) == owned:
        return short
    return sorted(f"{path}.{pname}" for path, pname in owned)


def pattern_key(path: str, layer: LoRALinear) -> str:
    """The name peft matches rank_pattern/alpha_pattern keys against: the module path, or for a LoRAParam
    ``<unwrapped module path>.<parameter>`` (``…mlp.experts.gate_up_proj``)."""
    return path if layer.parameter_name is None else f"{_owner_path(path)}.{layer.parameter_name}"


def _owner_path(path: str) -> str:
    while path.endswith(".base_layer"):
        path = path.removesuffix(".base_layer")
    return path


def plan_param_adapter(model: nn.Module, keys: dict[str, dict], config: dict, adapter_name: str, where: str,
                       rank: Callable[[str], int]) -> list[tuple[str, str]]:
    """Check an adapter's parameter keys (path → {"lora_A": shape, "lora_B": shape}) against the model, without
    touching it; returns the (module path, parameter) targets to pass to ``add_lora_params``. ``rank`` gives the
    rank of ``<module path>.<parameter>`` (peft's rank_pattern resolved).

    The key of the k-th of n targeted parameters of a module is ``<module>`` + ``.base_layer`` × (n-1-k).
    """
    targets = find_target_parameters(model, config.get("target_parameters") or [])
    by_module: dict[str, list[str]] = {}
    for path, pname in targets:
        by_module.setdefault(path, []).append(pname)
    expected: dict[str, tuple[str, str]] = {}
    for path, names in by_module.items():
        chain = _chain(model.get_submodule(path))
        if chain and set(chain) != set(names):
            raise ModelError(f"{where}: {path} already has LoRA on {chain}, this adapter targets {names}; every "
                             "adapter on a model must target the same parameters (as in PEFT)")
        order = list(reversed(chain)) or names
        for k, pname in enumerate(order):
            expected[path + ".base_layer" * (len(order) - 1 - k)] = (path, pname)
    if set(expected) != set(keys):
        extra, missing = sorted(set(keys) - set(expected)), sorted(set(expected) - set(keys))
        raise ModelError(f"{where}: target_parameters={config.get('target_parameters')!r} selects "
                         f"{sorted(expected)[:3]} in this model but the weights hold {sorted(keys)[:3]} "
                         f"(extra: {extra[:3]}, missing: {missing[:3]}); load the adapter onto the base model it "
                         "was trained on")
    for key, (path, pname) in expected.items():
        r = rank(f"{path}.{pname}")
        layer = _wrapper_of(model.get_submodule(path), pname)
        if layer is not None and adapter_name in layer.lora_A:
            raise ModelError(f"{path}.{pname} already has an adapter named {adapter_name!r}; pass another "
                             "adapter_name")
        experts, in_f, out_f, _ = param_features(model.get_submodule(path), pname)
        want = {"lora_A": [r * experts, in_f], "lora_B": [out_f, r * experts]}
        for part, shape in want.items():
            if list(keys[key][part]) != shape:
                raise ModelError(f"{where}: {key}.{part}.weight has shape {list(keys[key][part])}, but {path}."
                                 f"{pname} ({experts} experts) needs {shape} at r={r}; load the adapter onto the "
                                 "base model it was trained on")
    return [expected[k] for k in sorted(expected, key=lambda k: -k.count(".base_layer"))]


def _chain(module: nn.Module) -> list[str]:
    """Parameter names of the LoRAParam wrappers around ``module``, outermost first."""
    return [w.parameter_name for w in _wrappers(module)]

