"""What an evaluation produces: each model variant's values per column, and the report of all variants."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# result columns that are rates in [0, 1] (plotted on one axis), and the lower-is-better ones
RATE_COLUMNS = ("exact_match", "normalized_match", "contains", "regex", "json_valid", "json_equal",
                "json_schema", "mc", "mc_norm", "refusal_rate", "over_refusal", "preference_acc",
                "preference_acc_avg")
LOSS_COLUMNS = ("loss", "ppl")


@dataclass
class ModelEval:
    """One model variant's results: overall and per-task values per column, and its predictions."""

    name: str
    overall: dict[str, float] = field(default_factory=dict)
    per_task: dict[str, dict[str, float]] = field(default_factory=dict)  # column → task → value
    predictions: list[str | None] = field(default_factory=list)
    n: int = 0


@dataclass
class EvalReport:
    """Results of every variant on the same items, and the files written."""

    variants: list[ModelEval]
    metrics: list[str]
    data: str
    n: int
    files: dict[str, str] = field(default_factory=dict)

    @property
    def columns(self) -> list[str]:
        cols: list[str] = []
        for v in self.variants:
            cols += [c for c in v.overall if c not in cols]
        return cols

    def to_dict(self) -> dict[str, Any]:
        return {"data": self.data, "n": self.n, "metrics": self.metrics,
                "variants": [{"name": v.name, "overall": v.overall, "per_task": v.per_task} for v in self.variants]}
