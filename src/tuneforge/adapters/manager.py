"""One base model, many named LoRA adapters: load, activate, stack, switch, and one adapter per row.

Adapters are loaded once into the same base model (each a named entry in every LoRALinear);
switching only changes which entries run, so it costs no I/O and no weight copy.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from tuneforge.errors import ConfigError, ModelError
from tuneforge.methods.lora import (
    LoRALinear,
    activate_layers,
    lora_layers,
    merge_lora,
    remove_lora,
    row_adapters,
    unmerge_lora,
)
from tuneforge.methods.peft_format import CONFIG_NAME, WEIGHTS_NAME, inspect_adapter, load_adapter
from tuneforge.models.generate import generate
from tuneforge.models.load import load_model, load_tokenizer

RUN_ADAPTER = "adapter"  # where `tuneforge train` writes a run's adapter

# An adapter selection: a name, names (weight 1 each), {name: weight}, or (name, weight) pairs.
AdapterSpec = str | Sequence[str] | Mapping[str, float] | Sequence[tuple[str, float]]


@dataclass
class AdapterInfo:
    """What an adapter directory holds (read from its config and safetensors header only)."""

    name: str
    path: str
    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: list[str] | str
    n_modules: int
    n_params: int
    size_bytes: int  # of adapter_model.safetensors
    base_model_name_or_path: str
    rank_pattern: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def adapter_info(adapter_dir: str | os.PathLike, name: str | None = None) -> AdapterInfo:
    """Describe a PEFT LoRA directory without loading its tensors; ModelError if it is broken."""
    config, modules = inspect_adapter(adapter_dir)
    return AdapterInfo(
        name=name or Path(adapter_dir).name, path=str(Path(adapter_dir)), r=config["r"],
        lora_alpha=config["lora_alpha"], use_rslora=bool(config.get("use_rslora")),
        target_modules=config.get("target_modules") or [], n_modules=len(modules),
        n_params=sum(_numel(s) for pair in modules.values() for s in pair.values()),
        size_bytes=(Path(adapter_dir) / WEIGHTS_NAME).stat().st_size,
        base_model_name_or_path=config.get("base_model_name_or_path") or "",
        rank_pattern=dict(config.get("rank_pattern") or {}),
    )


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # e.g. a folder without read permission: not an adapter we can use
        return False


def adapter_in(folder: Path) -> Path | None:
    """The adapter folder ``folder`` holds: itself, or a run directory's ``adapter/`` (None: neither)."""
    for candidate in (folder, folder / RUN_ADAPTER):
        if _exists(candidate / CONFIG_NAME) or _exists(candidate / WEIGHTS_NAME):
            return candidate
    return None


def find_adapter_dirs(root: str | os.PathLike) -> dict[str, Path]:
    """{name: adapter folder} in ``root``: ``root`` itself when it is one (or a run directory), else each
    subfolder that is an adapter (named by the folder) or a run directory with an adapter (named by the run).

    Unreadable or vanished folders are left out (a server rescans this while folders change).
    """
    base = Path(root)
    own = adapter_in(base)
    if own is not None:
        return {base.name: own}
    try:
        entries = sorted(base.iterdir())
    except OSError:  # the directory went away: nothing to list
        return {}
    found = {}
    for entry in entries:
        try:
            is_dir = not entry.name.startswith(".") and entry.is_dir()
        except OSError:
            continue
        adapter = adapter_in(entry) if is_dir else None
        if adapter is not None:
            found[entry.name] = adapter
    return found


def scan_adapters(root: str | os.PathLike) -> tuple[list[AdapterInfo], dict[str, str]]:
    """The adapters in ``root`` (see ``find_adapter_dirs``), and {name: error} for broken ones."""
    if not Path(root).is_dir():
        raise ModelError(f"adapters directory {root} does not exist; pass a folder of adapter folders or of runs")
    infos, errors = [], {}
    for name, path in find_adapter_dirs(root).items():
        try:
            infos.append(adapter_info(path, name))
        except ModelError as e:
            errors[name] = str(e)
    return infos, errors


def format_info(info: AdapterInfo) -> str:
    """A multi-line human summary of one adapter."""
    targets = info.target_modules if isinstance(info.target_modules, str) else ", ".join(info.target_modules)
    lines = [f"name: {info.name}", f"path: {info.path}", f"rank: {info.r}", f"alpha: {info.lora_alpha}",
             f"rslora: {info.use_rslora}", f"targets: {targets}", f"modules: {info.n_modules}",
             f"params: {info.n_params:,}", f"size: {info.size_bytes:,} bytes",
             f"base model: {info.base_model_name_or_path or '(not recorded)'}"]
    if info.rank_pattern:
        lines.append(f"rank pattern: {info.rank_pattern}")
    return "\n".join(lines)


def format_table(infos: list[AdapterInfo], errors: Mapping[str, str] | None = None) -> str:
    """One line per adapter: name, rank, alpha, targets, size; then the broken ones."""
    rows = [("NAME", "RANK", "ALPHA", "TARGETS", "SIZE")]
    for i in infos:
        targets = i.target_modules if isinstance(i.target_modules, str) else ",".join(i.target_modules)
        rows.append((i.name, str(i.r), f"{i.lora_alpha:g}", targets, _human_bytes(i.size_bytes)))
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    out = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=False)) + "  " + r[4] for r in rows]
    out += [f"{name}: error: {msg}" for name, msg in (errors or {}).items()]
    return "\n".join(out)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def normalize_spec(spec: AdapterSpec) -> dict[str, float]:
    """``"a"`` / ``["a", "b"]`` / ``{"a": 0.5}`` / ``[("a", 0.5)]`` → ``{name: weight}``."""
    if isinstance(spec, str):
        return {spec: 1.0}
    items = spec.items() if isinstance(spec, Mapping) else [(s, 1.0) if isinstance(s, str) else s for s in spec]
    out: dict[str, float] = {}
    for item in items:
        if not (isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[0], str)):
            raise ConfigError(f"adapter selection {item!r}: use a name or a (name, weight) pair")
        name, weight = item
        if name in out:
            raise ConfigError(f"adapter {name!r} is selected twice")
        out[name] = float(weight)
    return out


def _module_key(name: str, taken: set[str]) -> str:
    # ModuleDict keys cannot hold "." nor shadow nn.Module attributes ("train", "forward"): the user's
    # name is mapped to a safe internal key.
    stem = re.sub(r"[^0-9A-Za-z_]", "_", name)[:48] or "adapter"
    i = 0
    while f"tf_{stem}_{i}" in taken:
        i += 1
    return f"tf_{stem}_{i}"


class AdapterSet:
    """A base model and tokenizer loaded once, plus any number of named adapters.

    Methods that touch the model hold ``self.lock`` (re-entrant), so a server may call them from
    several threads.
    """

    def __init__(self, model: nn.Module, tokenizer=None, base_ref: str = "") -> None:
        if lora_layers(model):
            raise ModelError("AdapterSet needs a base model without LoRA layers; load adapters through it")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.base_ref = base_ref
        self.lock = threading.RLock()
        self.last_switch_s: float | None = None
        self._keys: dict[str, str] = {}  # user name → LoRALinear adapter key
        self._infos: dict[str, AdapterInfo] = {}
        self._active: dict[str, float] = {}
        self._merged: str | None = None
        self._layers: list[LoRALinear] = []  # the LoRALinear layers, cached so a switch does not walk the model

    @classmethod
    def from_pretrained(cls, base_ref: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> AdapterSet:
        """Load the base model and tokenizer once (any reference ``load_model`` accepts)."""
        return cls(load_model(base_ref, dtype=dtype, device=device), load_tokenizer(base_ref), base_ref)

    @property
    def names(self) -> list[str]:
        return list(self._keys)

    @property
    def active(self) -> dict[str, float]:
        """The active adapters and their weights ({} when the base runs alone)."""
        return dict(self._active)

    def key(self, name: str) -> str:
        """The adapter's key inside the model's LoRA layers."""
        if name not in self._keys:
            raise ModelError(f"no adapter named {name!r} is loaded; loaded: {self.names or 'none'}")
        return self._keys[name]

    def info(self, name: str) -> AdapterInfo:
        self.key(name)
        return self._infos[name]

    def load(self, name: str, adapter_dir: str | os.PathLike) -> AdapterInfo:
        """Load a PEFT LoRA directory (ours or peft's) as ``name``; the active selection is unchanged."""
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"adapter name {name!r}: give a non-empty name")
        if name in self._keys:
            raise ModelError(f"an adapter named {name!r} is already loaded; unload it first or pick another name")
        info = adapter_info(adapter_dir, name)
        with self.lock:
            key = _module_key(name, set(self._keys.values()))
            try:
                load_adapter(self.model, adapter_dir, key)
            except BaseException:
                if lora_layers(self.model, key):  # a load that failed half-way leaves nothing behind
                    remove_lora(self.model, key)
                raise
            self._keys[name], self._infos[name] = key, info
            self._layers = list(lora_layers(self.model).values())
            self._apply()  # load_adapter made the new one active; restore the selection
        return info

    def unload(self, name: str) -> None:
        """Remove an adapter from the model (deactivating and unmerging it first)."""
        with self.lock:
            key = self.key(name)
            if self._merged == name:
                self._merged = None
            remove_lora(self.model, key)
            del self._keys[name], self._infos[name]
            self._layers = list(lora_layers(self.model).values())
            self._active.pop(name, None)
            self._apply()

    def activate(self, spec: AdapterSpec) -> float:
        """Run these adapters (weights multiply each one's scaling); returns the switch time in seconds."""
        selection = normalize_spec(spec)
        for name in selection:
            self.key(name)
        with self.lock:
            start = time.perf_counter()
            self._unmerge()
            self._active = selection
            self._apply()
            self.last_switch_s = time.perf_counter() - start
        return self.last_switch_s

    def switch(self, spec: AdapterSpec) -> float:
        """Same as ``activate``: replaces whatever was active; returns the switch time in seconds."""
        return self.activate(spec)

    def deactivate(self) -> float:
        """Run the base model alone; returns the switch time in seconds."""
        return self.activate({})

    def merge(self, name: str) -> None:
        """Fold one adapter into the base weights (fastest single-adapter inference).

        Activating anything else unmerges it first, so the base is never left modified by accident.
        """
        with self.lock:
            key = self.key(name)
            self._unmerge()
            merge_lora(self.model, key)
            self._merged, self._active = name, {name: 1.0}
            self._apply()

    def unmerge(self) -> None:
        """Subtract a merged adapter again; it stays active, now unmerged."""
        with self.lock:
            self._unmerge()

    def _unmerge(self) -> None:
        if self._merged is not None:
            unmerge_lora(self.model, self._keys[self._merged])
            self._merged = None

    def _apply(self) -> None:
        keys = [self._keys[n] for n in self._active]
        activate_layers(self._layers, keys, {self._keys[n]: w for n, w in self._active.items()})

    def generate(self, prompts, **kwargs) -> list[str]:
        """``models.generate.generate`` with the active adapters."""
        with self.lock:
            return generate(self.model, self._tokenizer(), prompts, **kwargs)

    def _tokenizer(self):
        if self.tokenizer is None:
            raise ModelError("this AdapterSet has no tokenizer; pass one to AdapterSet(model, tokenizer)")
        return self.tokenizer


def generate_multi(adapter_set: AdapterSet, prompts, adapter_names: Sequence[str | None],
                   batch_size: int = 16, **kwargs) -> list[str]:
    """Generate for a batch in which prompt ``i`` uses adapter ``adapter_names[i]`` (None: the base).

    Each step is one forward pass over the whole batch (left-padded HF generate); only the LoRA
    updates are computed per adapter, on that adapter's rows. ``kwargs`` go to ``generate``.
    """
    if len(prompts) != len(adapter_names):
        raise ConfigError(f"{len(prompts)} prompts but {len(adapter_names)} adapter names; give one per prompt")
    keys = [None if n is None else adapter_set.key(n) for n in adapter_names]
    outputs: list[str] = []
    with adapter_set.lock:
        adapter_set.unmerge()
        for start in range(0, len(prompts), batch_size):
            chunk = slice(start, start + batch_size)
            with row_adapters(adapter_set.model, keys[chunk]):
                outputs += generate(adapter_set.model, adapter_set._tokenizer(), prompts[chunk],
                                    batch_size=batch_size, **kwargs)
    return outputs
