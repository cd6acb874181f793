"""Checkpoints that a kill never leaves half-written, and exact resume.

A checkpoint is ``checkpoints/step-N/`` with the trainable weights (safetensors), the optimizer and
scheduler state and the RNG states (``torch.save``, read back with ``weights_only=True``), and
``trainer.json`` (step and data position). It is written under a temporary name and renamed
(:func:`tuneforge.files.replaced_atomically`), and ``manifest.json`` records each file's size and sha256: on
resume the newest checkpoint whose files still match is used, and the damaged ones after it are named.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tuneforge.errors import TuneforgeError
from tuneforge.files import replaced_atomically
from tuneforge.log import get_logger

logger = get_logger(__name__)

STEP_DIR = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"
FILES = ("trainable.safetensors", "state.pt", "trainer.json")


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by name, as contiguous CPU tensors."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, trainer: dict[str, Any]) -> Path:
    """Write ``checkpoints/step-<step>`` atomically and return its path."""
    return write_checkpoint(run_dir, step, trainable_state(model), optimizer.state_dict(), scheduler.state_dict(),
                            trainer)


def write_checkpoint(run_dir: Path, step: int, weights: dict[str, torch.Tensor], optimizer_state: dict[str, Any],
                     scheduler_state: dict[str, Any], trainer: dict[str, Any]) -> Path:
    """Write already collected state as ``checkpoints/step-<step>`` (temporary name, then renamed)."""
    final = run_dir / "checkpoints" / f"step-{step}"
    with replaced_atomically(final) as tmp:
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler_state, "rng": rng_state()},
                   tmp / "state.pt")
        (tmp / "trainer.json").write_text(json.dumps({"step": step, **trainer}, indent=1))
        manifest = {name: {"bytes": (tmp / name).stat().st_size, "sha256": sha256(tmp / name)} for name in FILES}
        (tmp / MANIFEST).write_text(json.dumps({"files": manifest}, indent=1))
    return final


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def damage(path: Path) -> str | None:
    """Why checkpoint ``path`` cannot be trusted (a file missing, truncated or changed), or None when intact."""
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"no readable {MANIFEST} (an interrupted or foreign checkpoint)"
    if not isinstance(files, dict):
        return f"{MANIFEST} is malformed"
    for name in FILES:
        entry, file = files.get(name), path / name
        if not isinstance(entry, dict) or not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != entry.get("bytes"):
            return f"{name} has {file.stat().st_size} bytes, {entry.get('bytes')} were written (truncated?)"
        if sha256(file) != entry.get("sha256"):
            return f"{name} does not match its checksum (changed after it was written)"
    return None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The intact checkpoint with the highest step, or None; each newer damaged one is logged with the reason."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return None
    steps = sorted(((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name))), reverse=True)
    for _, path in steps:
        why = damage(path)
        if why is None:
            return path
        logger.warning(f"skipping checkpoint {path}: {why}")
    return None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    place: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG from ``path``; return trainer.json.

    ``place(param, saved)`` turns a saved full tensor into what ``param`` holds (this process's shard under
    FSDP); by default the tensor as saved.
    """
    place = place or (lambda param, saved: saved)
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    unknown = [k for k in weights if k not in params]
    if unknown:
        raise TuneforgeError(f"checkpoint {path} does not match this model/method "
                             f"(e.g. {unknown[0]}); resume with the config the run started with")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(place(params[name], value))
    state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
    osd = state["optimizer"]
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    for i, moments in osd["state"].items():
        p = ordered[int(i)]
        made = optimizer.state.get(p, {})  # state allocated up front (train.optimizer's bf16 AdamW) has its own dtype
        for k, v in moments.items():
            if isinstance(v, torch.Tensor) and v.shape == p.shape and v.dim() > 0:  # moments, not ``step``
                moments[k] = place(made.get(k, p), v)
    optimizer.load_state_dict(osd)
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return json.loads((path / "trainer.json").read_text())
