"""Save and load LoRA adapters as PEFT directories (adapter_config.json + adapter_model.safetensors).

``base_model_name_or_path`` is what peft's auto-loaders can open (the converted folder of a builtin model or
a .gguf, a local folder as an absolute path, else the hub id); the reference the user gave tuneforge
(``smollm2-135m``) is kept in ``tuneforge.json`` beside it, since peft warns about keys it does not know.

PEFT's keys are ``base_model.model.<module path>.lora_A.weight`` ([r, in]) and ``.lora_B.weight``
([out, r]), without the adapter name; a DoRA adapter adds ``.lora_magnitude_vector`` ([out]), a
``lora_bias`` adapter ``.lora_B.bias`` ([out]). Never
unpickles: ``adapter_model.bin`` is refused.

Every LoraConfig field is either reproduced or refused by name (``_REFUSED``, ``_WEIGHT_REWRITING_INITS``),
so no peft adapter loads with outputs different from peft's; docs/adapters-and-serving.md has the table.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from tuneforge.errors import ModelError
from tuneforge.files import replaced_atomically
from tuneforge.methods.lora import (
    ALL_LINEAR,
    LoRALinear,
    add_lora,
    fan_in_fan_out,
    find_target_modules,
    layer_features,
    linear_modules,
    lora_layers,
    lora_state_dict,
    matches_target,
)
from tuneforge.methods.lora_params import (
    add_lora_params,
    is_param_key,
    pattern_key,
    per_expert_key_fix,
    plan_param_adapter,
    target_parameter_names,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
TUNEFORGE_NAME = "tuneforge.json"
KEY_PREFIX = "base_model.model."
# Files an adapter directory may hold; anything else makes save_adapter refuse to replace it.
_OWN_FILES = {CONFIG_NAME, WEIGHTS_NAME, TUNEFORGE_NAME, "README.md"}
MAGNITUDE = "lora_magnitude_vector"  # DoRA's per-row magnitude, keyed without ".weight" by peft
# Per-output-row vectors some adapters add: part name → (key suffix, the config flag that says they are there).
_VECTORS = {"magnitude": (f".{MAGNITUDE}", "use_dora"), "bias": (".lora_B.bias", "lora_bias")}
_MERGE_FIX = ("load it with peft, merge it there (`model.merge_and_unload()`), save the merged model and use that "
              "as the base model")
# LoraConfig fields whose non-default value tuneforge does not reproduce: loading would change the outputs.
_REFUSED = {
    "modules_to_save": "full copies of other modules (e.g. lm_head) replace the base model's own",
    "trainable_token_indices": "trained rows of the embedding matrix replace the base model's own",
    "layer_replication": "the model's layers are repeated, which changes its architecture",
    "alora_invocation_tokens": "Activated LoRA switches on only after its invocation tokens",
    "use_qalora": "QA-LoRA pools the input features before lora_A",
    "use_bdlora": "block-diagonal LoRA factors are not implemented",
    "arrow_config": "Arrow routing between several LoRA experts is not implemented",
    "kasa_config": "KaSA truncates the base weights' singular values and adds a learned diagonal",
    "velora_config": "the VeLoRA variant is not implemented",
    "monteclora_config": "the MonteCLoRA variant is not implemented",
    "megatron_config": "Megatron's tensor-parallel layers are not implemented",
}
# init_lora_weights values that rewrite the base weights (W - B·A at init): the adapter fits only that rewritten
# base. peft converts them to a plain LoRA adapter at save time.
_WEIGHT_REWRITING_INITS = ("olora", "pissa", "corda", "loftq", "lora_ga")
# init_lora_weights values that leave the base weights alone: the saved A and B are all there is.
_PLAIN_INITS = (True, False, "gaussian", "orthogonal", "mica", "eva")


def _pattern_regex(key: str) -> re.Pattern:
    # PEFT's rule (utils.other.get_pattern_key): the key is a regex matching a trailing part of the path.
    return re.compile(rf"(.*\.)?({key})$")


def _pattern_value(pattern: dict | None, path: str, default):
    """The value of the first rank_pattern/alpha_pattern key matching ``path`` (keys checked on read)."""
    for key, value in (pattern or {}).items():
        if _pattern_regex(key).match(path):
            return value
    return default


def _most_common(values: dict[str, object]):
    return Counter(values.values()).most_common(1)[0][0]


def _adapter_config(model: nn.Module, layers: dict[str, LoRALinear], name: str, base: str) -> dict:
    """The PEFT LoraConfig dict describing adapter ``name`` as it sits in the model."""
    rslora = {layer.use_rslora[name] for layer in layers.values()}
    if len(rslora) > 1:
        raise ModelError(f"adapter {name!r} mixes rsLoRA and plain LoRA layers; PEFT cannot describe that")
    use_dora = {name in layer.lora_magnitude_vector for layer in layers.values()}
    if len(use_dora) > 1:
        raise ModelError(f"adapter {name!r} mixes DoRA and plain LoRA layers; PEFT cannot describe that")
    lora_bias = {layer.lora_B[name].bias is not None for layer in layers.values()}
    if len(lora_bias) > 1:
        raise ModelError(f"adapter {name!r} mixes layers with and without a lora_B bias; PEFT cannot describe that")
    r = _most_common({p: layer.r[name] for p, layer in layers.items()})
    alpha = _most_common({p: layer.lora_alpha[name] for p, layer in layers.items()})
    parameters = target_parameter_names(model, layers)  # MoE experts/routers (lora_params)
    ranks = {pattern_key(p, layer): layer.r[name] for p, layer in layers.items()}
    alphas = {pattern_key(p, layer): layer.lora_alpha[name] for p, layer in layers.items()}
    layers = {p: layer for p, layer in layers.items() if layer.parameter_name is None}
    # Suffix names when they select exactly our layers (the usual case), else the exact paths.
    suffixes = sorted({p.rsplit(".", 1)[-1] for p in layers})
    selected = {n for n in linear_modules(model) if matches_target(n, suffixes)}
    targets = (suffixes if selected == set(layers) else sorted(layers)) if layers else None
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": r,
        "lora_alpha": alpha,
        # peft refuses dropout with target_parameters; it acts in training only, so 0 is exact for the outputs
        "lora_dropout": 0.0 if parameters or not layers else max(layer.dropout[name] for layer in layers.values()),
        "target_modules": targets,
        "target_parameters": parameters,
        "rank_pattern": {re.escape(p): v for p, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(p): v for p, v in alphas.items() if v != alpha},
        "bias": "none",
        "use_rslora": rslora.pop(),
        # PEFT's flag for Conv1D bases (GPT-2): peft itself ignores it on nn.Linear layers, so one value is exact.
        "fan_in_fan_out": any(fan_in_fan_out(layer.base_layer) for layer in layers.values()),
        "modules_to_save": None,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_dora": use_dora.pop(),
        "lora_bias": lora_bias.pop(),
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
    _refuse_unsupported(config, path)
    config.setdefault("r", 8)  # PEFT's LoraConfig defaults
    config.setdefault("lora_alpha", 8)
    _check_values(config, path)
    return config


def _refuse_unsupported(config: dict, path: Path) -> None:
    """ModelError naming the first field whose meaning tuneforge does not reproduce, and the fix."""
    for key, why in _REFUSED.items():
        if config.get(key):
            raise ModelError(f"{path}: {key}={config[key]!r} is not supported by tuneforge ({why}); {_MERGE_FIX}")
    if config.get("bias", "none") != "none":
        raise ModelError(f"{path}: bias={config['bias']!r} is not supported (the adapter trained the base model's "
                         f"biases); only bias \"none\" is: {_MERGE_FIX}")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.startswith(_WEIGHT_REWRITING_INITS):
        raise ModelError(
            f"{path}: init_lora_weights={init!r} rewrote the base model's weights when the adapter was made, so "
            "this adapter is only right on top of that rewritten base and tuneforge refuses to load it onto the "
            "original one. Fix: have peft convert it to a plain LoRA adapter when saving, "
            "`model.save_pretrained(out, path_initial_model_for_weight_conversion=<the adapter saved right after "
            "initialization>)` (peft's PiSSA/OLoRA/CorDA docs); LoftQ has no conversion: " + _MERGE_FIX)
    if init not in _PLAIN_INITS:
        raise ModelError(f"{path}: init_lora_weights={init!r} is not a LoRA initialization tuneforge knows; "
                         f"known: {', '.join(map(repr, _PLAIN_INITS + _WEIGHT_REWRITING_INITS))}")
    for flag in ("use_dora", "lora_bias"):
        if config.get(flag) and config.get("target_parameters"):
            raise ModelError(f"{path}: {flag} with target_parameters is not supported (peft has none for bare "
                             f"parameters either); {_MERGE_FIX}")
    if config.get("use_dora") and config.get("lora_bias"):
        raise ModelError(f"{path}: use_dora with lora_bias is not a peft configuration (peft refuses it); re-save "
                         "or re-download the adapter")


def _is_rank(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_alpha(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _check_values(config: dict, path: Path) -> None:
    """The types and ranges of every key tuneforge reads, so a malformed file fails here with its key named."""
    def bad(key: str, fix: str) -> ModelError:
        value = config[key] if key in config else None
        return ModelError(f"{path}: {key}={value!r}; {fix} (edit the file, or re-save or re-download the adapter)")

    if not _is_rank(config["r"]):
        raise bad("r", "the rank must be a positive integer, e.g. 8")
    if not _is_alpha(config["lora_alpha"]):
        raise bad("lora_alpha", "alpha must be a number > 0, e.g. 16")
    dropout = config.get("lora_dropout") or 0.0
    if not (isinstance(dropout, int | float) and not isinstance(dropout, bool) and 0 <= dropout < 1):
        raise bad("lora_dropout", "dropout must be a number in [0, 1), e.g. 0.05")
    for key in ("use_rslora", "use_dora", "lora_bias", "inference_mode"):
        if config.get(key) is not None and not isinstance(config[key], bool):
            raise bad(key, "give true or false")
    if not isinstance(config.get("base_model_name_or_path") or "", str):
        raise bad("base_model_name_or_path", "give the base model's path or hub id as a string")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        if targets != ALL_LINEAR:
            try:
                re.compile(targets)
            except re.error as e:
                raise bad("target_modules", f"a string is a regex and this one is invalid ({e})") from e
    elif not (targets is None or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise bad("target_modules", 'give a list of module names, a regex string or "all-linear"')
    # peft's own LoraConfig checks: it refuses these files too
    if isinstance(targets, str) and config.get("layers_to_transform") is not None:
        raise bad("layers_to_transform", "it works with a list of target_modules only, not a regex or all-linear "
                  "(peft refuses it too)")
    if config.get("layers_pattern") and config.get("layers_to_transform") is None:
        raise bad("layers_pattern", "it needs layers_to_transform as well (peft refuses it alone)")
    params = config.get("target_parameters")
    if not (params is None or (isinstance(params, list) and all(isinstance(t, str) for t in params))):
        raise bad("target_parameters", "give a list of <module>.<parameter> names, e.g. [experts.gate_up_proj]")
    for key, valid, what in (("rank_pattern", _is_rank, "positive integer ranks"),
                             ("alpha_pattern", _is_alpha, "alphas > 0")):
        pattern = config.get(key)
        if pattern is None:
            continue
        if not isinstance(pattern, dict):
            raise bad(key, f"give an object mapping module-name regexes to {what}, e.g. {{\"q_proj\": 16}}")
        for name, value in pattern.items():
            try:
                _pattern_regex(name)
            except re.error as e:
                raise bad(key, f"the key {name!r} is not a valid regex ({e})") from e
            if not valid(value):
                raise bad(key, f"the value of {name!r} is {value!r}; give {what}")


def _weights_file(adapter_dir: Path) -> Path:
    """The adapter's safetensors file; a pickle file is refused."""
    path = adapter_dir / WEIGHTS_NAME
    if not path.is_file():
        if (adapter_dir / PICKLE_NAME).is_file():
            raise ModelError(
                f"{adapter_dir / PICKLE_NAME} is a pickle file and tuneforge never unpickles; convert it "
                "to safetensors where you trust it: `from safetensors.torch import save_file; "
                "save_file(torch.load('adapter_model.bin', weights_only=True), 'adapter_model.safetensors')`"
            )
        raise ModelError(f"{path} is missing: the adapter directory has no weights")
    return path


def _read_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    path = _weights_file(adapter_dir)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelError(f"{path} is not a valid safetensors file ({e}); re-save or re-download it") from e


def _read_shapes(adapter_dir: Path) -> dict[str, list[int]]:
    """The tensors' shapes from the safetensors header (no tensor is read)."""
    path = _weights_file(adapter_dir)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelError(f"{path} is not a valid safetensors file ({e}); re-save or re-download it") from e


def _split_keys(weights: Mapping, path: Path) -> dict[str, dict]:
    """module path → {"lora_A": value, "lora_B": value[, "magnitude": value][, "bias": value]} (tensors or
    shapes)."""
    parts = {f".{p}.weight": p for p in ("lora_A", "lora_B")} | {suffix: p for p, (suffix, _) in _VECTORS.items()}
    pairs: dict[str, dict] = {}
    for key, tensor in weights.items():
        name = key.removeprefix(KEY_PREFIX)
        for suffix, part in parts.items():
            if name.endswith(suffix):
                pairs.setdefault(name[: -len(suffix)], {})[part] = tensor
                break
        else:
            raise ModelError(
                f"{path}: unexpected key {key!r}; tuneforge loads LoRA and DoRA weights of Linear layers only "
                f"(keys ending in .lora_A.weight / .lora_B.weight / .lora_B.bias / .{MAGNITUDE})"
            )
    for module, pair in pairs.items():
        for part in ("lora_A", "lora_B"):
            if part not in pair:
                key = f"{KEY_PREFIX}{module}.{part}.weight"
                raise ModelError(f"{path}: {key} is missing; the file is incomplete")
    if not pairs:
        raise ModelError(f"{path} holds no LoRA weights")
    return pairs


def _layer_index(path: str, layers_pattern) -> int | None:
    # peft's rule: the first numbered segment after a ``layers_pattern`` name (any name when none is given)
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = next((m for p in patterns if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", path))), None)
    return int(match["idx"]) if match else None


def selects(config: dict, path: str, targets: str | Sequence[str] | None = None) -> bool:
    """Whether peft puts this adapter on module ``path``: ``target_modules`` (or ``targets``, e.g. the
    resolved "all-linear" paths), ``exclude_modules``, ``layers_to_transform`` and ``layers_pattern``."""
    targets = config.get("target_modules") if targets is None else targets
    exclude = config.get("exclude_modules")
    if exclude and (re.fullmatch(exclude, path) if isinstance(exclude, str) else matches_target(path, exclude)):
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    if path in targets:
        return True
    if not matches_target(path, targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    index = _layer_index(path, config.get("layers_pattern"))
    return index is not None and (index == layers if isinstance(layers, int) else index in layers)


def check_weights(shapes: Mapping[str, Sequence[int]], config: dict, weights_path: Path) -> dict[str, dict]:
    """Check the weights' keys and shapes against the adapter's config (no model needed).

    Returns module path → {"lora_A": shape, "lora_B": shape[, "magnitude": shape][, "bias": shape]};
    ModelError naming the file and key otherwise.
    """
    pairs = _split_keys(shapes, weights_path)
    targets = config.get("target_modules")
    for module, pair in pairs.items():
        key = KEY_PREFIX + module
        for part in ("lora_A", "lora_B"):
            if len(pair[part]) != 2:
                raise ModelError(f"{weights_path}: {key}.{part}.weight has shape {list(pair[part])}; LoRA weights "
                                 "are matrices (2 dims): re-save or re-download the adapter")
        _check_vectors(pair, config, weights_path, key)
        r = _pattern_value(config.get("rank_pattern"), module, config["r"])
        a_rank, b_rank = pair["lora_A"][0], pair["lora_B"][1]
        param = is_param_key(module, config.get("target_parameters"))  # experts: r·E; checked with the model
        if param and b_rank != a_rank:
            raise ModelError(f"{weights_path}: {key}: lora_A has rank {a_rank} but lora_B has rank {b_rank}; the "
                             "file is damaged: re-save or re-download the adapter")
        if not param and (a_rank != r or b_rank != r):
            raise ModelError(
                f"{weights_path}: {key}: {CONFIG_NAME} gives rank {r} but the weights have rank "
                f"{a_rank if a_rank != r else b_rank}; the config and the weights do not belong together"
                + (" (rank_pattern keys are tried in the file's order and the first match wins, as in peft)"
                   if config.get("rank_pattern") else "")
            )
        if targets and targets != ALL_LINEAR and not param and not selects(config, module):
            raise ModelError(f"{weights_path}: {key} is not selected by target_modules={targets!r} in "
                             f"{CONFIG_NAME}{_selection_detail(config)}; the config and the weights do not belong "
                             "together")
    return {module: {part: list(shape) for part, shape in pair.items()} for module, pair in pairs.items()}


def _check_vectors(pair: dict, config: dict, weights_path: Path, key: str) -> None:
    """DoRA magnitudes and lora_B biases: there exactly when the config says so, one value per output row."""
    for part, (suffix, flag) in _VECTORS.items():
        wanted = bool(config.get(flag))
        if wanted != (part in pair):
            what = f"{key}{suffix} is missing" if wanted else f"{key}{suffix} is there"
            raise ModelError(f"{weights_path}: {CONFIG_NAME} gives {flag}={wanted} but {what}; the config and "
                             "the weights do not belong together")
        if wanted and list(pair[part]) != [pair["lora_B"][0]]:
            raise ModelError(f"{weights_path}: {key}{suffix} has shape {list(pair[part])}; it needs one value per "
                             f"output row, [{pair['lora_B'][0]}]: re-save or re-download the adapter")


def _selection_detail(config: dict) -> str:
    keys = ("exclude_modules", "layers_to_transform", "layers_pattern")
    return "".join(f", {k}={config[k]!r}" for k in keys if config.get(k) not in (None, []))


def inspect_adapter(adapter_dir: str | os.PathLike) -> tuple[dict, dict[str, dict]]:
    """An adapter directory's checked config and module path → {"lora_A": shape, "lora_B": shape}.

    Reads the safetensors header only; the same checks ``load_adapter`` makes before it needs a model.
    """
    directory = _check_dir(adapter_dir)
    config = read_adapter_config(directory)
    return config, check_weights(_read_shapes(directory), config, directory / WEIGHTS_NAME)


def _check_shapes(module: nn.Module, weights_path: Path, key: str, a: list[int], b: list[int]) -> None:
    in_f, out_f = layer_features(module)
    for part, shape, expected in (("lora_A", a, [a[0], in_f]), ("lora_B", b, [out_f, b[1]])):
        if shape != expected:
            raise ModelError(
                f"{weights_path}: adapter was trained on a different base model: {key}.{part}.weight has shape "
                f"{shape}, the model's module has weight [{out_f}, {in_f}] (needs {expected}); load the adapter "
                "onto the base model it was trained on"
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
    weights = _read_weights(directory)
    shapes = check_weights({k: list(t.shape) for k, t in weights.items()}, config, weights_path)
    pairs = _split_keys(weights, weights_path)
    param_pairs = {p: v for p, v in pairs.items() if is_param_key(p, config.get("target_parameters"))}
    pairs = {p: v for p, v in pairs.items() if p not in param_pairs}
    param_targets = plan_param_adapter(
        model, {p: shapes[p] for p in param_pairs}, config, adapter_name, str(weights_path),
        lambda key: _pattern_value(config.get("rank_pattern"), key, config["r"])) if param_pairs else []
    linears = linear_modules(model)
    targets = config.get("target_modules")
    if targets == ALL_LINEAR:
        targets = find_target_modules(model, ALL_LINEAR)
    ranks, alphas = {}, {}
    for path, pair in pairs.items():
        for part, tensor in pair.items():
            if not tensor.is_floating_point():
                key = path + (_VECTORS[part][0] if part in _VECTORS else f".{part}.weight")
                raise ModelError(f"{weights_path}: {KEY_PREFIX}{key} has dtype {tensor.dtype}; LoRA weights are "
                                 "floating point: re-save or re-download the adapter")
    for path in pairs:
        where = f"{weights_path}: {KEY_PREFIX}{path}"
        module = linears.get(path)
        if module is None:
            if (fix := per_expert_key_fix(model, path)) is not None:
                raise ModelError(f"{where}: {fix}")
            raise ModelError(
                f"{where}: adapter was trained on a different base model: {path} is not a Linear layer of this "
                "model; load the adapter onto the base model it was trained on"
            )
        if targets and not selects(config, path, targets):  # "all-linear" is only known with the model
            raise ModelError(f"{where} is not selected by target_modules in {CONFIG_NAME} (all-linear leaves "
                             "out the output head); the config and the weights do not belong together")
        if isinstance(module, LoRALinear) and adapter_name in module.lora_A:
            raise ModelError(
                f"{path} already has an adapter named {adapter_name!r}; pass another adapter_name"
            )
        ranks[path] = _pattern_value(config.get("rank_pattern"), path, config["r"])
        alphas[path] = _pattern_value(config.get("alpha_pattern"), path, config["lora_alpha"])
        _check_shapes(module, weights_path, KEY_PREFIX + path, shapes[path]["lora_A"], shapes[path]["lora_B"])
    if targets:
        missing = sorted(n for n in linears if selects(config, n, targets) and n not in pairs)
        if missing:
            raise ModelError(
                f"{weights_path} has no weights for {missing[:3]}{' ...' if len(missing) > 3 else ''}, "
                f"which target_modules selects: the adapter was trained on a different base model"
            )
    if param_targets:  # first: add_lora then activates the adapter on every layer holding it
        add_lora_params(model, param_targets, adapter_name,
                        {t: _pattern_value(config.get("rank_pattern"), ".".join(t), config["r"])
                         for t in param_targets},
                        {t: _pattern_value(config.get("alpha_pattern"), ".".join(t), config["lora_alpha"])
                         for t in param_targets}, bool(config.get("use_rslora")))
    names = add_lora(model, pairs, adapter_name, ranks, alphas, config.get("lora_dropout") or 0.0,
                     bool(config.get("use_rslora")), bool(config.get("use_dora")), bool(config.get("lora_bias")))
    pairs |= param_pairs
    with torch.no_grad():
        for path, pair in pairs.items():
            layer = model.get_submodule(path)
            params = {"lora_A": layer.lora_A[adapter_name].weight, "lora_B": layer.lora_B[adapter_name].weight}
            if "magnitude" in pair:
                params["magnitude"] = layer.lora_magnitude_vector[adapter_name]
            if "bias" in pair:
                params["bias"] = layer.lora_B[adapter_name].bias
            for part, param in params.items():
                param.copy_(pair[part])
                param.requires_grad_(trainable)
    # new LoRA modules start in training mode (dropout on); follow the model's current mode
    model.train(model.training)
    return names + list(param_pairs)

