"""Experiment trackers: a run's records, resolved config, plots and eval tables sent to TensorBoard,
Weights & Biases, MLflow or trackio (``train.report_to``).

Each backend is an optional dependency imported when its tracker is built, so a missing one fails before
the first step with the extra to install. All of them write locally (TensorBoard event files, W&B offline
mode and MLflow's file store inside the run directory, trackio's own local store): no account, no network.
Only rank 0 tracks under torchrun.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from tuneforge.errors import TuneforgeError
from tuneforge.train import distributed
from tuneforge.train.callbacks import TrainCallback

PROJECT = "tuneforge"


@dataclass
class EvalTable:
    """One ``results.json`` of ``tuneforge eval`` as a table: a row per variant, a column per metric."""

    name: str  # the results file's folder, relative to the run directory
    columns: list[str]
    rows: list[list[Any]]


def trackers_for(config: Any) -> list[TrainCallback]:
    """The trackers named in ``config.train.report_to`` (none on ranks other than 0)."""
    # built on every rank: a missing package fails everywhere at once
    trackers = [TRACKERS[n]() for n in dict.fromkeys(config.train.report_to)]
    return trackers if distributed.is_main() else []


def require(module: str, extra: str) -> Any:
    """Import an optional backend or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise TuneforgeError(f"train.report_to lists {extra}, which needs a package that is not installed "
                             f"({e}): pip install 'tuneforge[{extra}]'") from e


def resolved_config(run_dir: Path, config: Any) -> dict[str, Any]:
    """The run's resolved config as written to its ``config.yaml`` (defaults filled in)."""
    path = run_dir / "config.yaml"
    return yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else config.model_dump(mode="json")


def hyperparameters(run_dir: Path, config: Any) -> dict[str, Any]:
    """The resolved config as flat ``section.key`` → scalar pairs."""
    return flatten(resolved_config(run_dir, config))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys; lists and None become JSON text (trackers take scalars only)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return out


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """Every numeric value of a metrics record but the step (``final`` and other flags are not numbers)."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def plot_files(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "plots").glob("*.png"))


def eval_tables(run_dir: Path) -> list[EvalTable]:
    """The eval results written inside the run directory (``tuneforge eval --output RUN/eval``)."""
    tables = []
    for path in sorted(run_dir.rglob("results.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            metrics, variants = list(data["metrics"]), data["variants"]
            rows = [[v["name"], *(v["overall"].get(m) for m in metrics)] for v in variants]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # not an eval results file (or one being written): nothing to show
        name = path.parent.relative_to(run_dir).as_posix()
        tables.append(EvalTable(name="eval" if name == "." else name, columns=["variant", *metrics], rows=rows))
    return tables


def markdown_table(table: EvalTable) -> str:
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in table.rows]
    return "\n".join(lines)


class TensorBoardTracker(TrainCallback):
    """Event files in ``RUN/tensorboard`` (``tensorboard --logdir RUN/tensorboard``)."""

    def __init__(self) -> None:
        self.tb = require("torch.utils.tensorboard", "tensorboard")  # optional dependency
        self.writer: Any = None

    def on_start(self, model: torch.nn.Module, run_dir: Path, config: Any) -> None:
        from torch.utils.tensorboard.summary import hparams  # optional dependency (tensorboard)

        self.writer = self.tb.SummaryWriter(log_dir=str(run_dir / "tensorboard"), flush_secs=10)
        for summary in hparams(hyperparameters(run_dir, config), {}):  # the HParams tab of this same run
            self.writer.file_writer.add_summary(summary)

    def on_record(self, record: dict[str, Any]) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, record["step"])

    def on_end(self, run_dir: Path) -> None:
        from matplotlib.image import imread  # start-up time

        for png in plot_files(run_dir):
            self.writer.add_image(f"plots/{png.stem}", imread(png)[..., :3], dataformats="HWC")
        for table in eval_tables(run_dir):
            self.writer.add_text(table.name, markdown_table(table))
        self.writer.close()


class WandbTracker(TrainCallback):
    """A W&B run in ``RUN/wandb``, offline unless WANDB_MODE says otherwise (``wandb sync`` uploads it)."""

    def __init__(self) -> None:
        self.wandb = require("wandb", "wandb")  # optional dependency
        self.run: Any = None

    def on_start(self, model: torch.nn.Module, run_dir: Path, config: Any) -> None:
        self.run = self.wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=run_dir.name,
                                   dir=str(run_dir), mode=os.environ.get("WANDB_MODE", "offline"),
                                   config=resolved_config(run_dir, config))  # W&B shows nested configs

    def on_record(self, record: dict[str, Any]) -> None:
        self.run.log(scalars(record), step=record["step"])

    def on_end(self, run_dir: Path) -> None:
        media: dict[str, Any] = {f"plots/{p.stem}": self.wandb.Image(str(p)) for p in plot_files(run_dir)}
        media.update({t.name: self.wandb.Table(columns=t.columns, data=t.rows) for t in eval_tables(run_dir)})
        if media:
            self.run.log(media)
        self.run.finish()


class MlflowTracker(TrainCallback):
    """An MLflow run in ``RUN/mlflow.db`` with artifacts in ``RUN/mlartifacts`` (or MLFLOW_TRACKING_URI when set).

    A SQLite store, not ``./mlruns``: MLflow 3 refuses new file stores (the database is its local default).
    """

    def __init__(self) -> None:
        self.mlflow = require("mlflow", "mlflow")  # optional dependency
        self.client: Any = None
        self.run_id = ""

    def on_start(self, model: torch.nn.Module, run_dir: Path, config: Any) -> None:
        from mlflow.entities import Param  # optional dependency

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        self.client = self.mlflow.MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(PROJECT)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            PROJECT, artifact_location=(run_dir / "mlartifacts").resolve().as_uri())
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
        params = [Param(k, str(v)) for k, v in hyperparameters(run_dir, config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def on_record(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric  # optional dependency

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, record["step"])
                                                    for k, v in scalars(record).items()])

    def on_end(self, run_dir: Path) -> None:
        for png in plot_files(run_dir):
            self.client.log_artifact(self.run_id, str(png), artifact_path="plots")
        for table in eval_tables(run_dir):  # the JSON layout MLflow's artifact viewer shows as a table
            self.client.log_dict(self.run_id, {"columns": table.columns, "data": table.rows}, f"{table.name}.json")
        self.client.set_terminated(self.run_id)


class TrackioTracker(TrainCallback):
    """A trackio run in its local store (``trackio show`` opens it)."""

    def __init__(self) -> None:
        self.trackio = require("trackio", "trackio")  # optional dependency
        self.run: Any = None

    def on_start(self, model: torch.nn.Module, run_dir: Path, config: Any) -> None:
        self.run = self.trackio.init(project=PROJECT, name=run_dir.name, config=hyperparameters(run_dir, config))

    def on_record(self, record: dict[str, Any]) -> None:
        self.run.log(scalars(record), step=record["step"])

    def on_end(self, run_dir: Path) -> None:
        media: dict[str, Any] = {f"plots/{p.stem}": self.trackio.Image(str(p)) for p in plot_files(run_dir)}
        media.update({t.name: self.trackio.Table(data=t.rows, columns=t.columns) for t in eval_tables(run_dir)})
        if media:
            self.run.log(media)
        self.run.finish()


TRACKERS: dict[str, type[TrainCallback]] = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker,
                                            "mlflow": MlflowTracker, "trackio": TrackioTracker}
