"""Save and load LoRA adapters as PEFT directories (adapter_config.json + adapter_model.safetensors).

``base_model_name_or_path`` is what peft's auto-loaders can open (the converted folder of a builtin model or
a .gguf, a local folder as an absolute path, else the hub id); the reference the user gave tuneforge
(``smollm2-135m``) is kept in ``tuneforge.json`` beside it, since peft warns about keys it does not know.

PEFT's keys are ``base_model.model.<module path>.lora_A.weight`` ([r, in]) and ``.lora_B.weight``
([out, r]), without the adapter name. Never unpickles: ``adapter_model.bin`` is refused.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from tuneforge.errors import ConfigError, ModelError
from tuneforge.files import replaced_atomically
from tuneforge.methods.lora import (
    ALL_LINEAR,
    LoRALinear,
    add_lora,
    find_target_modules,
    linear_modules,
    lora_layers,
    lora_state_dict,
    matches_target,
    validate_lora_args,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
TUNEFORGE_NAME = "tuneforge.json"
KEY_PREFIX = "base_model.model."
# Files an adapter directory may hold; anything else makes save_adapter refuse to replace it.
_OWN_FILES = {CONFIG_NAME, WEIGHTS_NAME, TUNEFORGE_NAME, "README.md"}
# PEFT LoRA features our LoRALinear does not implement: loading would silently change the outputs.
_UNSUPPORTED = ("use_dora", "lora_bias", "fan_in_fan_out", "modules_to_save", "trainable_token_indices",
                "target_parameters", "layer_replication", "alora_invocation_tokens", "use_qalora",
                "use_bdlora")


def _pattern_value(pattern: dict | None, path: str, default):
    # PEFT's rule (utils.other.get_pattern_key): the key is a regex matching a trailing part of the path.
    for key, value in (pattern or {}).items():
        try:
            if re.match(rf"(.*\.)?({key})$", path):
                return value
        except re.error as e:
            raise ModelError(f"{CONFIG_NAME}: pattern key {key!r} is not a valid regex ({e})") from e
    return default


def _most_common(values: dict[str, object]):
    return Counter(values.values()).most_common(1)[0][0]


def _adapter_config(model: nn.Module, layers: dict[str, LoRALinear], name: str, base: str) -> dict:
    """The PEFT LoraConfig dict describing adapter ``name`` as it sits in the model."""
    rslora = {layer.use_rslora[name] for layer in layers.values()}
    if len(rslora) > 1:
        raise ModelError(f"adapter {name!r} mixes rsLoRA and plain LoRA layers; PEFT cannot describe that")
    ranks = {p: layer.r[name] for p, layer in layers.items()}
    alphas = {p: layer.lora_alpha[name] for p, layer in layers.items()}
    r, alpha = _most_common(ranks), _most_common(alphas)
    # Suffix names when they select exactly our layers (the usual case), else the exact paths.
    suffixes = sorted({p.rsplit(".", 1)[-1] for p in layers})
    selected = {n for n in linear_modules(model) if matches_target(n, suffixes)}
    targets = suffixes if selected == set(layers) else sorted(layers)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": max(layer.dropout[name] for layer in layers.values()),
        "target_modules": targets,
        "rank_pattern": {re.escape(p): v for p, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(p): v for p, v in alphas.items() if v != alpha},
        "bias": "none",
        "use_rslora": rslora.pop(),
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_dora": False,
        "lora_bias": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
        "revision": None,
    }


def _check_out_dir(out_dir: Path) -> None:
    """Refuse to replace a file, or a directory holding anything but an adapter."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ModelError(f"{out_dir} exists and is not a directory; choose another adapter output path")
    foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in _OWN_FILES)
    if foreign:
        raise ModelError(
            f"{out_dir} already holds other files ({', '.join(foreign[:5])}); save the adapter into an "
            "empty directory or an existing adapter directory"
        )


def save_adapter(
    model: nn.Module,
    out_dir: str | os.PathLike,
    adapter_name: str = "default",
    base_model_name_or_path: str = "",
) -> Path:
    """Write adapter ``adapter_name`` as a PEFT LoRA directory (atomically); returns its path."""
    layers = lora_layers(model, adapter_name)
    if not layers:
        raise ModelError(
            f"cannot save adapter {adapter_name!r}: the model has no LoRA layers with that name "
            "(apply_lora or load_adapter first)"
        )
    config = _adapter_config(model, layers, adapter_name, peft_base_reference(base_model_name_or_path))
    tensors = {KEY_PREFIX + k: v.detach().to("cpu").contiguous().clone()
               for k, v in lora_state_dict(model, adapter_name).items()}
    ours = {"base_model": base_model_name_or_path} if base_model_name_or_path else None
    return write_adapter_files(out_dir, tensors, config, ours)


def peft_base_reference(ref: str) -> str:
    """``ref`` as peft's loaders can resolve it: a local folder (absolute) or a hub id; ``ref`` if unresolvable."""
    from tuneforge.models.resolve import resolve_model  # start-up time: resolve imports transformers

    if not ref:
        return ref
    try:
        resolved = resolve_model(ref)  # a builtin name or .gguf: the converted folder (made once, cached)
    except ModelError:  # a path that is gone: keep what the user gave
        return ref
    return str(Path(resolved).resolve()) if Path(resolved).is_dir() else resolved


def write_adapter_files(out_dir: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict,
                        ours: dict | None = None) -> Path:
    """Write PEFT-keyed weights and an adapter config (+ ``ours`` as tuneforge.json) as an adapter directory,
    atomically; returns its path."""
    out = Path(out_dir)
    _check_out_dir(out)
    with replaced_atomically(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if ours:
            (tmp / TUNEFORGE_NAME).write_text(json.dumps(ours, indent=2) + "\n", encoding="utf-8")
    return out


def _check_dir(adapter_dir: str | os.PathLike) -> Path:
    path = Path(adapter_dir)
    if not path.exists():
        raise ModelError(f"adapter directory {path} does not exist; pass the folder that holds {CONFIG_NAME}")
    if not path.is_dir():
        raise ModelError(f"{path} is not a directory; pass the folder that holds {CONFIG_NAME}")
    return path


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict:
    """Read and check a PEFT LoRA adapter_config.json; refuses features tuneforge cannot reproduce."""
    path = _check_dir(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise ModelError(f"{path} is missing: {path.parent} is not a PEFT adapter directory")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{path} is not valid JSON ({e}); re-save or re-download the adapter") from e
    if not isinstance(config, dict):
        raise ModelError(f"{path} must hold a JSON object, not {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise ModelError(f"{path}: peft_type={config.get('peft_type')!r}; tuneforge loads LoRA adapters only")
    for key in _UNSUPPORTED:
        if config.get(key):
            raise ModelError(f"{path}: {key}={config[key]!r} is not supported by tuneforge's LoRA")
    if config.get("bias", "none") != "none":
        raise ModelError(f"{path}: bias={config['bias']!r} is not supported; only bias \"none\" is")
    config.setdefault("r", 8)  # PEFT's LoraConfig defaults
    config.setdefault("lora_alpha", 8)
    try:
        validate_lora_args(config["r"], config["lora_alpha"], config.get("lora_dropout") or 0.0)
        for value in {**(config.get("rank_pattern") or {})}.values():
            validate_lora_args(value, config["lora_alpha"], 0.0)
        for value in {**(config.get("alpha_pattern") or {})}.values():
            validate_lora_args(config["r"], value, 0.0)
    except ConfigError as e:
        raise ModelError(f"{path}: {e}") from e
    return config


def _read_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    path = adapter_dir / WEIGHTS_NAME
    if not path.is_file():
        if (adapter_dir / PICKLE_NAME).is_file():
            raise ModelError(
                f"{adapter_dir / PICKLE_NAME} is a pickle file and tuneforge never unpickles; convert it "
                "to safetensors where you trust it: `from safetensors.torch import save_file; "
                "save_file(torch.load('adapter_model.bin', weights_only=True), 'adapter_model.safetensors')`"
            )
        raise ModelError(f"{path} is missing: the adapter directory has no weights")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelError(f"{path} is not a valid safetensors file ({e}); re-save or re-download it") from e


def _split_keys(weights: dict[str, torch.Tensor], path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """module path → {"lora_A": tensor, "lora_B": tensor}."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        name = key.removeprefix(KEY_PREFIX)
        for part in ("lora_A", "lora_B"):
            if name.endswith(f".{part}.weight"):
                pairs.setdefault(name[: -len(f".{part}.weight")], {})[part] = tensor
                break
        else:
            raise ModelError(
                f"{path}: unexpected key {key!r}; tuneforge loads LoRA weights of Linear layers only "
                "(keys ending in .lora_A.weight / .lora_B.weight)"
            )
    for module, pair in pairs.items():
        for part in ("lora_A", "lora_B"):
            if part not in pair:
                key = f"{KEY_PREFIX}{module}.{part}.weight"
                raise ModelError(f"{path}: {key} is missing; the file is incomplete")
    if not pairs:
        raise ModelError(f"{path} holds no LoRA weights")
    return pairs


def _check_shapes(module: nn.Module, key: str, a: torch.Tensor, b: torch.Tensor, r: int) -> None:
    out_f, in_f = module.out_features, module.in_features
    for part, tensor, expected in (("lora_A", a, [a.shape[0], in_f]), ("lora_B", b, [out_f, b.shape[-1]])):
        if tensor.ndim != 2 or list(tensor.shape) != expected:
            raise ModelError(
                f"adapter was trained on a different base model: {key}.{part}.weight has shape "
                f"{list(tensor.shape)}, the model's module has weight [{out_f}, {in_f}] (needs {expected})"
            )
    if a.shape[0] != r or b.shape[1] != r:
        raise ModelError(
            f"{key}: adapter_config.json gives rank {r} but the weights have rank {a.shape[0]}; "
            "the config and the weights do not belong together"
        )


def load_adapter(
    model: nn.Module,
    adapter_dir: str | os.PathLike,
    adapter_name: str = "default",
    *,
    trainable: bool = False,
) -> list[str]:
    """Load a PEFT LoRA directory into ``model`` as adapter ``adapter_name``; returns the module paths.

    Everything is checked before the model is touched. The loaded adapter becomes the only active one;
    its weights train only with ``trainable=True``.
    """
    directory = _check_dir(adapter_dir)
    config = read_adapter_config(directory)
    weights_path = directory / WEIGHTS_NAME
    pairs = _split_keys(_read_weights(directory), weights_path)
    linears = linear_modules(model)
    targets = config.get("target_modules")
    if targets == ALL_LINEAR:
        targets = find_target_modules(model, ALL_LINEAR)
    ranks, alphas = {}, {}
    for path, pair in pairs.items():
        key = KEY_PREFIX + path
        module = linears.get(path)
        if module is None:
            raise ModelError(
                f"adapter was trained on a different base model: {key}.lora_A.weight refers to {path}, "
                "which is not a Linear layer of this model"
            )
        if targets and not _targets(path, targets):
            raise ModelError(f"{weights_path}: {key} is not selected by target_modules in {CONFIG_NAME}")
        if isinstance(module, LoRALinear) and adapter_name in module.lora_A:
            raise ModelError(
                f"{path} already has an adapter named {adapter_name!r}; pass another adapter_name"
            )
        ranks[path] = _pattern_value(config.get("rank_pattern"), path, config["r"])
        alphas[path] = _pattern_value(config.get("alpha_pattern"), path, config["lora_alpha"])
        _check_shapes(module, key, pair["lora_A"], pair["lora_B"], ranks[path])
    if targets and not config.get("layers_to_transform") and not config.get("exclude_modules"):
        missing = sorted(n for n in linears if _targets(n, targets) and n not in pairs)
        if missing:
            raise ModelError(
                f"{weights_path} has no weights for {missing[:3]}{' ...' if len(missing) > 3 else ''}, "
                f"which target_modules selects: the adapter was trained on a different base model"
            )
    names = add_lora(model, pairs, adapter_name, ranks, alphas, config.get("lora_dropout") or 0.0,
                     bool(config.get("use_rslora")))
    with torch.no_grad():
        for path, pair in pairs.items():
            layer = model.get_submodule(path)
            for part in ("lora_A", "lora_B"):
                param = getattr(layer, part)[adapter_name].weight
                param.copy_(pair[part])
                param.requires_grad_(trainable)
    # new LoRA modules start in training mode (dropout on); follow the model's current mode
    model.train(model.training)
    return names


def _targets(path: str, targets: str | list[str]) -> bool:
    try:
        return matches_target(path, targets)
    except re.error as e:
        raise ModelError(f"{CONFIG_NAME}: target_modules {targets!r} is not a valid regex ({e})") from e
