"""What a caller can hook into a run: measurements at evaluation points and every logged record.

The loop knows nothing about forgetting probes or experiment trackers; the caller (CLI, lab, a user's
script) builds such objects and passes them to ``train(callbacks=...)``. Each hook has a no-op default,
so a callback implements only what it needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class TrainCallback:
    """Base class of a training callback; every hook is optional."""

    def on_start(self, model: torch.nn.Module, run_dir: Path, config: Any) -> None:
        """Before the first step (the model is prepared: LoRA's B is still zero, full weights untouched)."""

    def on_eval(self, step: int, model: torch.nn.Module) -> dict[str, float]:
        """At each evaluation point and at the end: metrics to add to that step's record.

        Raise :class:`tuneforge.errors.StopTraining` to end the run early; the run saves what it has.
        """
        return {}

    def on_record(self, record: dict[str, Any]) -> None:
        """Each record as it is written to ``metrics.jsonl`` (rank 0 only under torchrun)."""

    def on_end(self, run_dir: Path) -> None:
        """After the outputs, plots and summary are written (rank 0 only under torchrun)."""
