"""Reading run directories for the dashboard: which runs exist, their status, records, config and outputs.

Read-only: nothing here writes, so the dashboard can watch a run while ``tuneforge train`` writes it.
A run directory is any folder under the runs root holding ``config.yaml``, ``metrics.jsonl`` or the run
marker ``tuneforge-run.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from tuneforge.train.tracking import eval_tables, flatten

MARKER = "tuneforge-run.json"
RUN_FILES = ("config.yaml", "metrics.jsonl", MARKER)
LIVE_SECONDS = 120  # metrics written this recently, and no marker: the run counts as running
OUTPUT_DIRS = {"checkpoints", "adapter", "model", "tensorboard", "wandb", "mlartifacts"}  # weights, tracker files
SHOWN_SUFFIXES = {".png", ".md", ".json", ".jsonl", ".yaml", ".txt", ".html"}


def find_runs(root: Path, depth: int = 3) -> list[Path]:
    """Run directories at most ``depth`` levels under ``root`` (``root`` itself may be one)."""
    if any((root / f).is_file() for f in RUN_FILES):
        return [root]
    if depth == 0 or not root.is_dir():
        return []
    found = []
    for child in sorted(root.iterdir()):
        if child.is_dir() and child.name not in OUTPUT_DIRS | {"plots"} and not child.name.startswith("."):
            found += find_runs(child, depth - 1)
    return found


def run_dir_of(root: Path, name: str) -> Path | None:
    """The run called ``name`` (its path relative to the root), never a path outside the root."""
    path = (root / name).resolve()
    if not path.is_relative_to(root.resolve()) or not any((path / f).is_file() for f in RUN_FILES):
        return None
    return path


def run_name(root: Path, run_dir: Path) -> str:
    name = run_dir.resolve().relative_to(root.resolve()).as_posix()
    return root.resolve().name if name == "." else name


def read_records(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """The complete JSON lines of ``metrics.jsonl`` from byte ``offset``, and the offset after them.

    A line still being written (no newline yet) is left for the next read.
    """
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    records = []
    for line in data[:end].splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a torn line from a killed run: skip it, keep the rest
        if isinstance(record, dict):
            records.append(record)
    return records, offset + end


def read_config(run_dir: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return config if isinstance(config, dict) else {}


def run_status(run_dir: Path, records: list[dict[str, Any]], now: float | None = None) -> dict[str, Any]:
    """``status`` (running / finished / stopped / failed / unknown), with ``started``, ``ended`` and ``error``.

    The run marker says it when present; otherwise the records do: a final record means the run ended
    (stopped when it stopped early), recent writes mean it is running, anything else stopped.
    """
    try:
        marker = json.loads((run_dir / MARKER).read_text(encoding="utf-8"))
        if isinstance(marker, dict) and marker.get("status"):
            return {"status": marker["status"], "started": marker.get("started"), "ended": marker.get("ended"),
                    "error": marker.get("error")}
    except (OSError, ValueError):
        pass
    metrics = run_dir / "metrics.jsonl"
    config = run_dir / "config.yaml"
    started = config.stat().st_mtime if config.is_file() else None
    updated = metrics.stat().st_mtime if metrics.is_file() else None
    final = next((r for r in reversed(records) if r.get("final")), None)
    if final is not None:
        status = "stopped" if final.get("stopped_early") else "finished"
    elif updated is None:
        status = "unknown"
    else:
        status = "running" if (now or time.time()) - updated < LIVE_SECONDS else "stopped"
    return {"status": status, "started": started, "ended": None if status == "running" else updated,
            "error": final.get("stopped_early") if final else None}


def summarize(root: Path, run_dir: Path) -> dict[str, Any]:
    """One row of the runs list."""
    records, _ = read_records(run_dir / "metrics.jsonl")
    config = read_config(run_dir)
    data = config.get("data", {}).get("train", []) if isinstance(config.get("data"), dict) else []
    steps = [r for r in records if "loss" in r]
    val = [r["val_loss"] for r in records if isinstance(r.get("val_loss"), (int, float))]
    return {"name": run_name(root, run_dir), **run_status(run_dir, records),
            "method": config.get("method", {}).get("name") if isinstance(config.get("method"), dict) else None,
            "model": config.get("model"),
            "data": ", ".join(str(d.get("path", d)) if isinstance(d, dict) else str(d) for d in data),
            "step": max((r.get("step", 0) for r in records), default=0),
            "max_steps": config.get("train", {}).get("max_steps") if isinstance(config.get("train"), dict) else None,
            "loss": steps[-1]["loss"] if steps else None,
            "trained_tokens": sum(r.get("trained_tokens", 0) for r in records),
            "best_val_loss": min(val) if val else None}


def run_detail(root: Path, run_dir: Path) -> dict[str, Any]:
    """Everything the run view shows but the curves (those stream from ``metrics.jsonl``)."""
    config = read_config(run_dir)
    return {"summary": summarize(root, run_dir), "config": config,
            "config_text": _text(run_dir / "config.yaml"),
            "data": _data_summary(run_dir, config),
            "plots": [p.relative_to(run_dir).as_posix() for p in _images(run_dir)],
            "evals": [vars(t) for t in eval_tables(run_dir)],
            "reports": [p.relative_to(run_dir).as_posix() for p in _reports(run_dir)]}


def config_diff(configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The keys whose values differ between runs: ``{"key", "values": [one per run]}``, in key order."""
    flat = [flatten(c) for c in configs]
    keys = sorted(set().union(*flat)) if flat else []
    rows = [{"key": k, "values": [f.get(k) for f in flat]} for k in keys]
    return [r for r in rows if len({json.dumps(v) for v in r["values"]}) > 1]


def shown_file(run_dir: Path, rel: str) -> Path | None:
    """A file of the run the page may fetch (images, reports, JSON): inside the run, a known kind."""
    path = (run_dir / rel).resolve()
    if not path.is_relative_to(run_dir.resolve()) or not path.is_file() or path.suffix not in SHOWN_SUFFIXES:
        return None
    return path


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return ""


def _walk(run_dir: Path, pattern: str) -> list[Path]:
    """Files matching ``pattern`` anywhere in the run, outside weights and tracker folders."""
    return sorted(p for p in run_dir.rglob(pattern) if not OUTPUT_DIRS.intersection(p.relative_to(run_dir).parts))


def _images(run_dir: Path) -> list[Path]:
    return _walk(run_dir, "*.png")


def _reports(run_dir: Path) -> list[Path]:
    return _walk(run_dir, "*.md")


def _data_summary(run_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The data section of the config and a length histogram (``tuneforge data inspect``) if the run has one."""
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    histograms = [p.relative_to(run_dir).as_posix() for p in _images(run_dir) if "hist" in p.name]
    return {"config": data, "histograms": histograms}
