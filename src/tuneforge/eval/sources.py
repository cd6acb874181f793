"""Where evaluation items come from: a data file in any training format, or a builtin source.

Builtin sources: ``builtin:tasks`` (test split + held-out task types), ``builtin:refusal``,
``builtin:probes`` (general-knowledge probes as short QA).
"""

from __future__ import annotations

from pathlib import Path

from tuneforge.data.builtin_tasks import builtin_tasks
from tuneforge.data.formats import map_fields
from tuneforge.data.readers import read_records
from tuneforge.errors import DataError
from tuneforge.eval.items import EvalItem, item_from_example, item_from_record, spread
from tuneforge.eval.probes import probe_items
from tuneforge.eval.refusal import refusal_items


def load_items(path: str, format: str = "auto", fields: dict[str, str] | None = None,
               task: str | None = None, limit: int | None = None) -> list[EvalItem]:
    """Evaluation items of a data file or a builtin source (``builtin:tasks|refusal|probes``)."""
    if path.startswith("builtin:"):
        items = builtin_items(path)
    else:
        items = [item_from_record(map_fields(rec, fields), loc, format, task) for loc, rec in read_records(path)]
        for it in items:
            it.task = it.task or Path(path).name.split(".")[0]  # records without a task: the file's name
    if not items:
        raise DataError(f"{path}: no records to evaluate")
    return spread(items, limit)


def builtin_items(name: str) -> list[EvalItem]:
    if name == "builtin:tasks":
        splits = builtin_tasks()
        return [item_from_example(e) for e in splits.test + splits.heldout]
    if name == "builtin:refusal":
        return refusal_items()
    if name == "builtin:probes":
        return probe_items()
    raise DataError(f"unknown builtin source '{name}'; use builtin:tasks, builtin:refusal or builtin:probes")
