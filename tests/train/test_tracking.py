"""Each tracker gets a real tiny run's records, config, plots and eval table; each library's own reader reads
them back, offline."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tuneforge.config import load_config
from tuneforge.errors import TuneforgeError
from tuneforge.train import distributed
from tuneforge.train.callbacks import TrainCallback
from tuneforge.train.loop import train
from tuneforge.train.tracking import scalars, trackers_for

EVAL = {"data": "test.jsonl", "n": 4, "metrics": ["exact"],
        "variants": [{"name": "base", "overall": {"exact": 0.25}, "per_task": {}},
                     {"name": "run", "overall": {"exact": 0.75}, "per_task": {}}]}


class WritesEvalResults(TrainCallback):
    """Puts an eval table in the run before the trackers' on_end (user callbacks run first)."""

    def on_end(self, run_dir: Path) -> None:
        (run_dir / "eval").mkdir()
        (run_dir / "eval" / "results.json").write_text(json.dumps(EVAL))


def config(model_dir, data, out, tracker):
    return load_config(overrides=[f"model={model_dir}", f"data.train=[{data}]", f"output_dir={out}",
                                  "data.max_seq_len=64", "data.val_fraction=0.25", "train.batch_size=2",
                                  "train.threads=1", "train.max_steps=6", "train.eval_every=3", "train.lr=1e-2",
                                  f"train.report_to=[{tracker}]"])


def tracked_run(tracker, tiny_model_dir, alpaca_file, tmp_path) -> tuple[Path, dict[str, list[tuple[int, float]]]]:
    """Train with one tracker; the run directory and what metrics.jsonl holds, per key: [(step, value)]."""
    run = tmp_path / "run"
    train(config(tiny_model_dir, alpaca_file, run, tracker), quiet=True, callbacks=[WritesEvalResults()])
    expected: dict[str, list[tuple[int, float]]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in scalars(record).items():
            expected.setdefault(key, []).append((record["step"], value))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "val_loss"} <= set(expected)
    return run, expected


def test_tensorboard_event_files_hold_the_records_plots_config_and_eval(tiny_model_dir, alpaca_file, tmp_path):
    pytest.importorskip("tensorboard", reason="pip install 'tuneforge[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    run, expected = tracked_run("tensorboard", tiny_model_dir, alpaca_file, tmp_path)
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    for key, points in expected.items():
        assert [(e.step, e.value) for e in acc.Scalars(key)] == [(s, pytest.approx(v, rel=1e-6)) for s, v in points]
    tags = acc.Tags()
    assert "plots/loss" in tags["images"]
    assert "eval/text_summary" in tags["tensors"]
    start = HParamsPluginData.FromString(acc.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["train.lr"].number_value == 0.01


def test_mlflow_store_in_the_run_holds_the_records_params_and_artifacts(tiny_model_dir, alpaca_file, tmp_path,
                                                                        monkeypatch):
    pytest.importorskip("mlflow", reason="pip install 'tuneforge[mlflow]'")
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run, expected = tracked_run("mlflow", tiny_model_dir, alpaca_file, tmp_path)
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    [mlrun] = client.search_runs([client.get_experiment_by_name("tuneforge").experiment_id])
    assert mlrun.info.status == "FINISHED" and mlrun.info.run_name == "run"
    assert mlrun.data.params["train.lr"] == "0.01" and mlrun.data.params["method.name"] == "lora"
    for key, points in expected.items():
        history = client.get_metric_history(mlrun.info.run_id, key)
        assert sorted((m.step, m.value) for m in history) == sorted(points)
    assert [a.path for a in client.list_artifacts(mlrun.info.run_id, "plots")] == ["plots/loss.png"]
    assert "eval.json" in [a.path for a in client.list_artifacts(mlrun.info.run_id)]


def wandb_records(path: Path):
    """The protobuf records of a W&B run file (a LevelDB-style log: 32 KiB blocks of checksummed chunks)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, buf = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if left < 7 or (length == 0 and kind == 0):  # block padding
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            yield record
            buf = b""


def test_wandb_offline_run_in_the_run_dir_holds_the_records_config_and_media(tiny_model_dir, alpaca_file,
                                                                              tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="pip install 'tuneforge[wandb]'")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run, expected = tracked_run("wandb", tiny_model_dir, alpaca_file, tmp_path)
    [run_file] = (run / "wandb").glob("offline-run-*/run-*.wandb")
    logged: dict[str, list[tuple[int, float]]] = {}
    config: dict[str, dict] = {}
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            for key, value in items.items():
                logged.setdefault(key, []).append((items["_step"], value))
        elif record.WhichOneof("record_type") == "run":
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
    for key, points in expected.items():
        assert logged[key] == points, key
    assert "plots/loss/_type" in logged and "eval/_type" in logged
    assert config["train"]["lr"] == 0.01


TRACKIO_SCRIPT = """
import json, sys
from train.test_tracking import WritesEvalResults, config
from tuneforge.train.loop import train
from trackio.sqlite_storage import SQLiteStorage
model_dir, data, out = sys.argv[1:]
train(config(model_dir, data, out, "trackio"), quiet=True, callbacks=[WritesEvalResults()])
print("RESULT", json.dumps({"logs": SQLiteStorage.get_logs("tuneforge", "run"),
                  "config": SQLiteStorage.get_run_config("tuneforge", "run")}, default=str))
"""


def test_trackio_local_store_holds_the_records_and_config(tiny_model_dir, alpaca_file, tmp_path):
    pytest.importorskip("trackio", reason="pip install 'tuneforge[trackio]'")
    run = tmp_path / "run"
    # trackio fixes its store's folder at import: a fresh process gets its own TRACKIO_DIR
    env = os.environ | {"TRACKIO_DIR": str(tmp_path / "trackio"), "OMP_NUM_THREADS": "1"}
    tests = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(TRACKIO_SCRIPT), str(tiny_model_dir),
                          str(alpaca_file), str(run)], env=env | {"PYTHONPATH": str(tests)}, cwd=tests,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    [line] = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]  # trackio prints too
    result = json.loads(line.removeprefix("RESULT "))
    expected = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in scalars(record).items():
            expected.setdefault(key, []).append((record["step"], value))
    for key, points in expected.items():
        assert [(row["step"], row[key]) for row in result["logs"] if key in row] == points, key
    assert result["config"]["train.lr"] == 0.01


def test_a_missing_backend_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    with pytest.raises(TuneforgeError, match=r"pip install 'tuneforge\[wandb\]'"):
        trackers_for(load_config(overrides=["train.report_to=[wandb]"]))


def test_only_rank_0_tracks(monkeypatch):
    pytest.importorskip("tensorboard", reason="pip install 'tuneforge[tensorboard]'")
    cfg = load_config(overrides=["train.report_to=[tensorboard]"])
    assert [type(t).__name__ for t in trackers_for(cfg)] == ["TensorBoardTracker"]
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    assert trackers_for(cfg) == []
