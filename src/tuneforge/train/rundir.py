"""The run directory's safety rules: a marker says a folder is a tuneforge run, and only a run is ever replaced.

``tuneforge-run.json`` at a run's root records its status (running, finished, stopped, failed), when it
started and ended, the error that ended it and the run's inputs. ``--overwrite`` removes a folder only when
it carries the marker and holds none of the run's inputs; ``--resume`` continues only a folder that carries
it. Nothing is written before these checks pass, so a refused command leaves the folder as it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from tuneforge import __version__
from tuneforge.errors import TuneforgeError
from tuneforge.log import get_logger

logger = get_logger(__name__)

MARKER = "tuneforge-run.json"
# the temporary names tuneforge.files.replaced_atomically gives (".<name>.<mkdtemp's 8 chars>.tmp" and the
# ".old" it swaps out) and the checkpoint writer's: what a kill can leave behind
TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.(tmp|old)$")
# What a resumed run may change. Logging only: silently. How long it runs, what it measures on the way and where
# it runs: with --resume-with-changes. Anything else (data, model, method, batch, lr, seed, schedule, sequence
# length, ...) makes a different run from the one the checkpoints belong to, and is refused.
LOGGING_KEYS = ("output_dir", "train.log_every", "train.report_to")
EXTENDING_KEYS = ("train.max_steps", "train.epochs", "train.eval_every", "train.save_every", "train.threads",
                  "train.device", "train.forgetting")


class RunDirError(TuneforgeError):
    """A run directory that cannot be created, replaced or resumed as asked."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_marker(run_dir: Path) -> dict[str, Any] | None:
    """The run's marker, or None when ``run_dir`` is not a tuneforge run (no marker, or not readable)."""
    try:
        marker = json.loads((Path(run_dir) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def write_marker(run_dir: Path, marker: dict[str, Any]) -> None:
    """Write the marker by rename, so a reader never sees half of it."""
    path = Path(run_dir) / MARKER
    tmp = path.with_name(f".{MARKER}.tmp")
    tmp.write_text(json.dumps(marker, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def mark(run_dir: Path, status: str, error: str | None = None) -> None:
    """Set the run's status; any status but running also records when it ended."""
    marker = read_marker(run_dir) or {}
    marker.update(status=status, ended=None if status == "running" else now(), error=error)
    write_marker(run_dir, marker)


def config_strings(value: Any) -> Iterator[str]:
    """Every string inside a (dumped) config, keys excluded."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from config_strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from config_strings(v)


def run_inputs(config: Any) -> list[Path]:
    """The files and folders a run reads: every string in its config that names one (data, model, general text,
    adapters, ...), resolved. Reading the whole config means a key added later is covered too."""
    dumped = config.model_dump(mode="json")
    dumped.pop("output_dir", None)
    found = {Path(s).resolve() for s in config_strings(dumped) if s and len(s) < 4096 and _exists(s)}
    return sorted(found)


def _exists(s: str) -> bool:
    try:
        return Path(s).exists()
    except (OSError, ValueError):  # a name the file system cannot hold is no input
        return False


def inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_run_dir(run_dir: Path, inputs: list[Path], resume: bool, overwrite: bool) -> None:
    """Refuse, before anything is read or written, what would lose a user's files or mix two runs."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"output directory '{run_dir}' is an existing file; set output_dir to a folder path")
    occupied = run_dir.is_dir() and any(run_dir.iterdir())
    is_run = read_marker(run_dir) is not None
    if resume:
        if not is_run:
            raise RunDirError(f"cannot resume '{run_dir}': it is not a tuneforge run (no {MARKER}); nothing was "
                              "written there. Check output_dir, or start a new run without --resume.")
        return
    if not occupied:
        return
    if not overwrite:
        raise RunDirError(f"run directory '{run_dir}' already exists; pass --resume to continue it, --overwrite "
                          "to replace it, or set output_dir to a new path")
    if not is_run:
        raise RunDirError(f"--overwrite refused: '{run_dir}' is not a tuneforge run (no {MARKER}), so it is never "
                          "deleted. Set output_dir to a new path, or move that folder away yourself.")
    resolved = run_dir.resolve()
    held = [p for p in inputs if inside(p, resolved)]
    if held:
        raise RunDirError(f"--overwrite refused: '{run_dir}' holds an input of this run ({held[0]}); replacing "
                          "the folder would delete it. Move the input out of the run directory, or set output_dir "
                          "to a new path.")


def create_run_dir(run_dir: Path, inputs: list[Path], resume: bool, overwrite: bool) -> Path:
    """Make (or, with ``overwrite``, replace) the run directory, clean a resumed one, and mark it running.

    Call :func:`check_run_dir` first; this repeats it, so no caller can skip the checks.
    """
    run_dir = Path(run_dir)
    check_run_dir(run_dir, inputs, resume, overwrite)
    if resume:
        remove_temp_dirs(run_dir)
        mark(run_dir, "running")
        return run_dir
    if overwrite and run_dir.is_dir() and any(run_dir.iterdir()):
        logger.info(f"--overwrite: replacing the run in {run_dir}")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_marker(run_dir, {"status": "running", "started": now(), "ended": None, "error": None,
                           "tuneforge": __version__, "inputs": [str(p) for p in inputs]})
    return run_dir


def remove_temp_dirs(run_dir: Path) -> list[Path]:
    """Delete the temporary folders a killed save left in the run directory and its checkpoints folder.

    Only names tuneforge's own writers make are touched, and only inside ``run_dir``.
    """
    removed = []
    for folder in (run_dir, run_dir / "checkpoints"):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if TEMP_NAME.match(p.name) and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
                removed.append(p)
    if removed:
        logger.info(f"removed {len(removed)} temporary folder(s) left by an interrupted save: "
                    + ", ".join(p.name for p in removed))
    return removed


# --- resume ---------------------------------------------------------------------------------------

def resolved_config(config: Any) -> dict[str, Any]:
    """The config as ``config.yaml`` holds it (the learning rate resolved)."""
    data = config.model_dump(mode="json")
    data["train"]["lr"] = config.lr
    return data


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}``; lists stay values."""
    if not isinstance(value, dict):
        return {prefix: value}
    out: dict[str, Any] = {}
    for k, v in value.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_changes(saved: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, old, new) for every key whose value differs, by dotted key."""
    old, now_ = flatten(saved), flatten(new)
    return [(k, old.get(k), now_.get(k)) for k in sorted(old.keys() | now_.keys()) if old.get(k) != now_.get(k)]


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def check_resume(run_dir: Path, config: Any, with_changes: bool) -> list[tuple[str, Any, Any]]:
    """Compare ``config`` with the run's saved ``config.yaml``; refuse what would change the run.

    Returns the changes that will apply (logging keys, and with ``with_changes`` the extending ones).
    """
    path = Path(run_dir) / "config.yaml"
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []  # killed before its config was written: there is nothing it could differ from
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise RunDirError(f"cannot resume '{run_dir}': its config.yaml is unreadable ({e}); nothing was "
                          "written. Start again with --overwrite.") from e
    changes = [c for c in config_changes(saved if isinstance(saved, dict) else {}, resolved_config(config))
               if not _under(c[0], LOGGING_KEYS)]
    refused = [c for c in changes if not _under(c[0], EXTENDING_KEYS)]
    if refused:
        raise RunDirError(f"cannot resume '{run_dir}' with a different config; nothing was written. These keys "
                          "would change the run its checkpoints belong to:\n" + _listing(refused)
                          + f"\nResume with the saved config ({path}), or start a new run (a new output_dir, or "
                          "--overwrite).")
    if changes and not with_changes:
        raise RunDirError(f"cannot resume '{run_dir}': the config changes how long the run goes or what it "
                          "measures:\n" + _listing(changes) + "\nPass --resume-with-changes to apply them (a new "
                          "length recomputes the learning-rate schedule from the checkpoint on), or resume with the "
                          f"saved config ({path}).")
    return changes


def _listing(changes: list[tuple[str, Any, Any]]) -> str:
    return "\n".join(f"  {k}: {old!r} -> {new!r}" for k, old, new in changes)


def resume_point(run_dir: Path) -> Path | None:
    """The checkpoint a resumed run starts from. With none intact, a run that has logged steps is refused (they
    would be trained and logged twice); one that never logged a step starts from the beginning."""
    from tuneforge.train.checkpoint import latest_checkpoint  # start-up time: MARKER is read without torch

    ckpt = latest_checkpoint(Path(run_dir))
    metrics = Path(run_dir) / "metrics.jsonl"
    if ckpt is None and metrics.is_file() and metrics.stat().st_size > 0:
        raise RunDirError(f"cannot resume '{run_dir}': it has no intact checkpoint in checkpoints/ (train.save_every "
                          "writes them); nothing was written. Start again with --overwrite.")
    if ckpt is None:
        logger.info(f"{run_dir} has no checkpoint and no logged step: starting from the beginning")
    return ckpt


# --- a run's status -------------------------------------------------------------------------------

class RunStatus:
    """The marker of the run ``train`` is making: nothing is written until :meth:`create` (which the caller runs on
    rank 0 only); after it the run ends marked finished, stopped (early) or failed, with the error."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir, self.created = Path(run_dir), False

    def create(self, inputs: list[Path], resume: bool, overwrite: bool) -> None:
        create_run_dir(self.run_dir, inputs, resume, overwrite)
        self.created = True

    def end(self, stopped: bool) -> None:
        if self.created:
            mark(self.run_dir, "stopped" if stopped else "finished")

    def fail(self, error: BaseException) -> None:
        if self.created:
            text = str(error) if isinstance(error, TuneforgeError) else f"{type(error).__name__}: {error}"
            mark(self.run_dir, "failed", error=text if str(error) else type(error).__name__)


def check_run(run_dir: Path, inputs: list[Path], config: Any, resume: bool, overwrite: bool,
              with_changes: bool) -> Path | None:
    """Every refusal a run directory can cause, before anything is read or written; a resumed run's checkpoint."""
    check_run_dir(run_dir, inputs, resume, overwrite)
    if not resume:
        return None
    changes = check_resume(run_dir, config, with_changes)
    if changes:
        logger.info("resuming with changes:\n" + _listing(changes))
    return resume_point(run_dir)
