"""Partial fine-tuning: train chosen decoder blocks and/or parameters matched by patterns."""

from __future__ import annotations

import fnmatch
import re

from torch import nn

from tuneforge.errors import ConfigError
from tuneforge.methods.lora import format_trainable

# Where common causal-LM architectures keep their decoder blocks.
_LAYER_PATHS = ("model.layers", "model.decoder.layers", "model.language_model.layers",
                "transformer.h", "gpt_neox.layers", "transformer.blocks")


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, ModuleList) of the decoder blocks, e.g. ``("model.layers", ...)``."""
    for path in _LAYER_PATHS:
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList):
            return path, layers
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    # Another architecture: the list of transformers' decoder blocks (the classes it never splits across
    # devices), else the longest ModuleList.
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for name, layers in lists:
        if type(layers[0]).__name__ in blocks:
            return name, layers
    if not lists:
        raise ConfigError(
            "freeze: this model has no list of decoder layers; select parameters with patterns instead "
            "(e.g. patterns=['*.mlp.*'])"
        )
    return max(lists, key=lambda nm: len(nm[1]))


def pattern_matches(pattern: str, name: str) -> bool:
    """Glob on the name or a module prefix of it (``lm_head`` ⊇ ``lm_head.weight``), or a full regex."""
    if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, f"{pattern}.*"):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _resolve_layers(n_layers: int, top_k_layers: int | None, layers: list[int] | None) -> list[int]:
    chosen: set[int] = set()
    if top_k_layers is not None:
        if not isinstance(top_k_layers, int) or not 0 <= top_k_layers <= n_layers:
            raise ConfigError(
                f"freeze top_k_layers={top_k_layers!r}: must be an integer from 0 to {n_layers} "
                f"(the model has {n_layers} decoder layers)"
            )
        chosen.update(range(n_layers - top_k_layers, n_layers))
    for i in layers or []:
        if not isinstance(i, int) or not -n_layers <= i < n_layers:
            raise ConfigError(
                f"freeze layers: index {i!r} is out of range; the model has {n_layers} decoder layers "
                f"(use 0..{n_layers - 1}, or -{n_layers}..-1 from the top)"
            )
        chosen.add(i % n_layers)
    return sorted(chosen)


def apply_freeze(
    model: nn.Module,
    top_k_layers: int | None = None,
    layers: list[int] | None = None,
    patterns: list[str] | None = None,
) -> list[str]:
    """Train only the chosen decoder blocks and pattern-matched parameters; returns their names.

    ``layers`` may be negative (-1 = last block). Patterns are globs (``"*.mlp.*"``, ``"lm_head"``,
    ``"model.norm"``) or full-match regexes, applied to parameter names.
    """
    named = list(model.named_parameters(remove_duplicate=False))  # tied weights keep both names
    block_prefixes: list[str] = []
    if top_k_layers is not None or layers:
        path, blocks = find_decoder_layers(model)
        block_prefixes = [f"{path}.{i}." for i in _resolve_layers(len(blocks), top_k_layers, layers)]
    for pattern in patterns or []:
        if not any(pattern_matches(pattern, n) for n, _ in named):
            sample = sorted({n.rsplit(".", 1)[0] for n, _ in named})[:12]
            raise ConfigError(
                f"freeze patterns: {pattern!r} matches no parameter; names look like {sample} "
                "(globs such as '*.mlp.*' or regexes such as '.*mlp.*')"
            )
    selected = [
        n for n, _ in named
        if any(n.startswith(p) for p in block_prefixes) or any(pattern_matches(p, n) for p in patterns or [])
    ]
    if not selected:
        raise ConfigError(
            "freeze: nothing would train; set top_k_layers (e.g. 2), layers (e.g. [-1]) or patterns "
            "(e.g. ['*.mlp.*'])"
        )
    model.requires_grad_(False)
    keep = set(selected)
    for n, p in named:
        if n in keep:
            p.requires_grad_(True)
    return selected


def freeze_summary(model: nn.Module) -> str:
    """Which decoder blocks and which other modules train, plus the parameter counts."""
    trainable = [n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad]
    try:
        path, blocks = find_decoder_layers(model)
    except ConfigError:
        path, blocks = "", nn.ModuleList()
    in_blocks: dict[int, set[str]] = {}
    others: set[str] = set()
    for n in trainable:
        if path and n.startswith(f"{path}."):
            idx, _, rest = n[len(path) + 1:].partition(".")
            in_blocks.setdefault(int(idx), set()).add(rest.rsplit(".", 1)[0])
        else:
            others.add(n.rsplit(".", 1)[0])
    lines = []
    if path:
        full = [i for i in sorted(in_blocks) if all(p.requires_grad for p in blocks[i].parameters())]
        lines.append(f"trainable blocks ({path}, {len(blocks)} total): {full or 'none'}")
        for i in sorted(set(in_blocks) - set(full)):
            lines.append(f"partly trainable block {i}: {sorted(in_blocks[i])}")
    lines.append(f"trainable modules outside blocks: {sorted(others) or 'none'}")
    lines.append(format_trainable(model))
    return "\n".join(lines)
