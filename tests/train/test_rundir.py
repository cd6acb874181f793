"""The run directory's safety: the marker and its status, --overwrite only ever replaces a run that holds none of
its inputs, nothing is written before the config, data and model pass, the demo never deletes a folder it did not
make, and temporary folders of a killed save are cleaned on resume."""

import json
import shutil

import pytest
import torch

from tuneforge import demo
from tuneforge.config import load_config
from tuneforge.errors import StopTraining, TuneforgeError
from tuneforge.train.callbacks import TrainCallback
from tuneforge.train.loop import train
from tuneforge.train.rundir import MARKER, read_marker, remove_temp_dirs, run_inputs

torch.set_num_threads(1)


def config(model_dir, data, out, *extra):
    return load_config(overrides=[f"model={model_dir}", f"data.train=[{data}]", f"output_dir={out}",
                                  "data.max_seq_len=64", "data.val_fraction=0", "train.batch_size=2",
                                  "train.threads=1", "train.max_steps=2", *extra])


def test_a_finished_run_is_marked_with_its_inputs(tiny_model_dir, alpaca_file, tmp_path):
    train(config(tiny_model_dir, alpaca_file, tmp_path / "run"), quiet=True)
    marker = json.loads((tmp_path / "run" / MARKER).read_text())
    assert marker["status"] == "finished" and marker["error"] is None
    assert marker["started"] <= marker["ended"] and marker["tuneforge"]
    assert str(alpaca_file.resolve()) in marker["inputs"] and str(tiny_model_dir.resolve()) in marker["inputs"]


class Stop(TrainCallback):
    def on_eval(self, step, model):
        raise StopTraining("enough")


class Boom(TrainCallback):
    def on_eval(self, step, model):
        raise RuntimeError("disk on fire")


def test_early_stop_and_failure_are_marked(tiny_model_dir, alpaca_file, tmp_path):
    train(config(tiny_model_dir, alpaca_file, tmp_path / "a", "train.eval_every=1"), callbacks=[Stop()], quiet=True)
    assert read_marker(tmp_path / "a")["status"] == "stopped"
    with pytest.raises(RuntimeError, match="disk on fire"):
        train(config(tiny_model_dir, alpaca_file, tmp_path / "b", "train.eval_every=1"), callbacks=[Boom()],
              quiet=True)
    marker = read_marker(tmp_path / "b")
    assert marker["status"] == "failed" and "disk on fire" in marker["error"] and marker["ended"]


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(tiny_model_dir, alpaca_file, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.txt").write_text("years of work")
    with pytest.raises(TuneforgeError, match="not a tuneforge run") as e:
        train(config(tiny_model_dir, alpaca_file, out), overwrite=True, quiet=True)
    assert str(out) in str(e.value)
    assert (out / "thesis.txt").read_text() == "years of work" and sorted(p.name for p in out.iterdir()) == [
        "thesis.txt"]


def test_overwrite_never_deletes_a_run_holding_an_input(tiny_model_dir, alpaca_file, tmp_path):
    out = tmp_path / "run"
    train(config(tiny_model_dir, alpaca_file, out), quiet=True)
    inside = out / "data.jsonl"
    shutil.copy(alpaca_file, inside)
    with pytest.raises(TuneforgeError, match="holds an input of this run") as e:
        train(config(tiny_model_dir, inside, out), overwrite=True, quiet=True)
    assert str(inside.resolve()) in str(e.value) and inside.is_file()


def test_overwrite_replaces_a_run(tiny_model_dir, alpaca_file, tmp_path):
    out = tmp_path / "run"
    train(config(tiny_model_dir, alpaca_file, out), quiet=True)
    (out / "stale.txt").write_text("x")
    train(config(tiny_model_dir, alpaca_file, out), overwrite=True, quiet=True)
    assert not (out / "stale.txt").exists() and read_marker(out)["status"] == "finished"


def test_an_existing_run_needs_overwrite_or_resume(tiny_model_dir, alpaca_file, tmp_path):
    out = tmp_path / "run"
    train(config(tiny_model_dir, alpaca_file, out), quiet=True)
    with pytest.raises(TuneforgeError, match="--overwrite to replace it"):
        train(config(tiny_model_dir, alpaca_file, out), quiet=True)


def test_output_naming_a_file_is_refused(tiny_model_dir, alpaca_file, tmp_path):
    out = tmp_path / "file.txt"
    out.write_text("keep")
    with pytest.raises(TuneforgeError, match="is an existing file"):
        train(config(tiny_model_dir, alpaca_file, out), overwrite=True, quiet=True)
    assert out.read_text() == "keep"


@pytest.mark.parametrize("broken", ["data", "model", "config"])
def test_a_failed_start_leaves_no_folder_and_the_corrected_rerun_works(tiny_model_dir, alpaca_file, tmp_path,
                                                                          broken):
    out = tmp_path / "run"
    bad = {"data": ("data.train=[" + str(tmp_path / "missing.jsonl") + "]",),
           "model": (f"model={tmp_path / 'no-model'}",),
           "config": ("train.max_steps=2", "method.lora.target_modules=[no_such_module]")}[broken]
    with pytest.raises(TuneforgeError):
        train(config(tiny_model_dir, alpaca_file, out, *bad), quiet=True)
    assert not out.exists()
    train(config(tiny_model_dir, alpaca_file, out), quiet=True)
    assert read_marker(out)["status"] == "finished"


def test_run_inputs_are_every_existing_path_in_the_config(tiny_model_dir, alpaca_file, tmp_path):
    general = tmp_path / "general.txt"
    general.write_text("text")
    cfg = config(tiny_model_dir, alpaca_file, tmp_path / "run", f"data.replay.path={general}",
                 f"train.forgetting.general_text={general}")
    assert set(run_inputs(cfg)) == {p.resolve() for p in (tiny_model_dir, alpaca_file, general)}


def test_temp_folders_of_a_killed_save_are_removed_inside_the_run_only(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / ".step-4.ab12cd34.tmp").mkdir(parents=True)
    (run / ".adapter.x1y2z3w4.tmp").mkdir()
    (run / ".model.abcdefgh.old").mkdir()
    (run / ".hidden-user-folder").mkdir()
    (tmp_path / ".adapter.x1y2z3w4.tmp").mkdir()  # beside the run: not ours to touch
    removed = remove_temp_dirs(run)
    assert sorted(p.name for p in removed) == [".adapter.x1y2z3w4.tmp", ".model.abcdefgh.old", ".step-4.ab12cd34.tmp"]
    assert (run / ".hidden-user-folder").is_dir() and (tmp_path / ".adapter.x1y2z3w4.tmp").is_dir()


def test_demo_never_deletes_an_output_it_did_not_make(tmp_path, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the demo must refuse before loading anything")

    monkeypatch.setattr(demo, "load_model", no_model)
    monkeypatch.setattr(demo, "load_tokenizer", no_model)
    out = tmp_path / "photos"
    out.mkdir()
    (out / "cat.jpg").write_bytes(b"\xff")
    for overwrite in (False, True):
        with pytest.raises(TuneforgeError, match="photos"):
            demo.run_demo(str(out), steps=1, overwrite=overwrite)
    assert (out / "cat.jpg").read_bytes() == b"\xff"
    (out / MARKER).write_text(json.dumps({"status": "finished"}))  # a run: replaced only with overwrite
    with pytest.raises(TuneforgeError, match="--overwrite"):
        demo.run_demo(str(out), steps=1)

