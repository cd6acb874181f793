"""Resume refuses what would change the run (naming the keys, old -> new), takes only the length and measurement
settings with resume_with_changes, writes nothing into a folder that is not a run, never duplicates metrics, and
falls back to the newest intact checkpoint, saying which newer ones were skipped and why."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tuneforge.config import load_config
from tuneforge.errors import TuneforgeError
from tuneforge.train.loop import train
from tuneforge.train.rundir import MARKER, read_marker

torch.set_num_threads(1)


def config(model_dir, data, out, *extra):
    return load_config(overrides=[f"model={model_dir}", f"data.train=[{data}]", f"output_dir={out}",
                                  "data.max_seq_len=64", "data.val_fraction=0", "train.batch_size=2",
                                  "train.threads=1", "train.max_steps=6", "train.save_every=2", "train.lr=5e-3",
                                  *extra])


@pytest.fixture
def run(tiny_model_dir, alpaca_file, tmp_path):
    out = tmp_path / "run"
    train(config(tiny_model_dir, alpaca_file, out), quiet=True)
    return out


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("override", "key", "old", "new"), [
    ("train.lr=1e-3", "train.lr", "0.005", "0.001"),
    ("train.batch_size=4", "train.batch_size", "2", "4"),
    ("train.seed=7", "train.seed", "0", "7"),
    ("method.lora.r=4", "method.lora.r", "16", "4"),
    ("method.lora.target_modules=[q_proj]", "method.lora.target_modules", "'all-linear'", "['q_proj']"),
    ("data.max_seq_len=32", "data.max_seq_len", "64", "32"),
    ("train.schedule=linear", "train.schedule", "'cosine'", "'linear'"),
])
def test_a_changed_config_is_refused_naming_the_key(run, tiny_model_dir, alpaca_file, override, key, old, new):
    before = snapshot(run)
    with pytest.raises(TuneforgeError, match="with a different config") as e:
        train(config(tiny_model_dir, alpaca_file, run, override), resume=True, quiet=True)
    assert f"{key}: {old} -> {new}" in str(e.value)
    assert snapshot(run) == before  # config.yaml, the marker, metrics: all as they were


def test_changed_data_is_refused(run, tiny_model_dir, alpaca_file, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text(alpaca_file.read_text())
    with pytest.raises(TuneforgeError, match="data.train"):
        train(config(tiny_model_dir, other, run), resume=True, quiet=True)


def test_extending_needs_resume_with_changes_and_then_continues(run, tiny_model_dir, alpaca_file):
    longer = config(tiny_model_dir, alpaca_file, run, "train.max_steps=8")
    with pytest.raises(TuneforgeError, match="--resume-with-changes") as e:
        train(longer, resume=True, quiet=True)
    assert "train.max_steps: 6 -> 8" in str(e.value)
    (run / ".adapter.k1ll3d0n.tmp").mkdir()  # what a kill during the final save leaves
    result = train(longer, resume=True, resume_with_changes=True, quiet=True)
    assert not (run / ".adapter.k1ll3d0n.tmp").exists()
    assert result.steps == 8 and "max_steps: 8" in (run / "config.yaml").read_text()
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8, 8]  # resumed at the step-4 checkpoint; no line twice (bar the final)
    assert read_marker(run)["status"] == "finished"


def test_logging_keys_may_change_silently(run, tiny_model_dir, alpaca_file):
    train(config(tiny_model_dir, alpaca_file, run, "train.log_every=2"), resume=True, quiet=True)


def test_resume_into_a_folder_that_is_not_a_run_writes_nothing(tiny_model_dir, alpaca_file, tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "config.yaml").write_text("mine: true\n")
    with pytest.raises(TuneforgeError, match=f"not a tuneforge run \\(no {MARKER}\\)"):
        train(config(tiny_model_dir, alpaca_file, folder), resume=True, quiet=True)
    assert [p.name for p in folder.iterdir()] == ["config.yaml"]
    assert (folder / "config.yaml").read_text() == "mine: true\n"


def test_resume_without_a_checkpoint_is_refused_after_logged_steps(tiny_model_dir, alpaca_file, tmp_path):
    out = tmp_path / "run"
    cfg = config(tiny_model_dir, alpaca_file, out, "train.save_every=null")
    train(cfg, quiet=True)
    metrics = (out / "metrics.jsonl").read_text()
    with pytest.raises(TuneforgeError, match="no intact checkpoint"):
        train(cfg, resume=True, quiet=True)
    assert (out / "metrics.jsonl").read_text() == metrics


def test_a_run_killed_before_its_first_step_resumes_from_the_start(run, tiny_model_dir, alpaca_file):
    for p in (run / "checkpoints").iterdir():
        for f in p.iterdir():
            f.unlink()
        p.rmdir()
    (run / "metrics.jsonl").write_text("")
    result = train(config(tiny_model_dir, alpaca_file, run), resume=True, quiet=True)
    assert result.steps == 6 and len((run / "metrics.jsonl").read_text().splitlines()) == 7


@pytest.mark.parametrize("damage", ["truncated weights", "missing state", "edited trainer", "empty folder"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(run, tiny_model_dir, alpaca_file,
                                                                          tmp_path, capsys, damage):
    newest = run / "checkpoints" / "step-4"
    if damage == "truncated weights":
        data = (newest / "trainable.safetensors").read_bytes()
        (newest / "trainable.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "missing state":
        (newest / "state.pt").unlink()
    elif damage == "edited trainer":
        (newest / "trainer.json").write_text((newest / "trainer.json").read_text().replace("4", "5"))
    else:
        (run / "checkpoints" / "step-5").mkdir()
    capsys.readouterr()
    train(config(tiny_model_dir, alpaca_file, run), resume=True, quiet=True)
    warning = capsys.readouterr().err
    skipped = "step-5" if damage == "empty folder" else "step-4"
    assert f"skipping checkpoint {run / 'checkpoints' / skipped}" in warning
    why = {"truncated weights": "truncated", "missing state": "state.pt is missing", "edited trainer": "checksum",
           "empty folder": "manifest"}[damage]
    assert why in warning
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[:-1] == [1, 2, 3, 4, 5, 6]
    straight = tmp_path / "straight"
    train(config(tiny_model_dir, alpaca_file, straight), quiet=True)
    a = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
