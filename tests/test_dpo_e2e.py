"""Preference tuning end to end on a tiny model: the CLI trains DPO/ORPO/SimPO/IPO with each method and writes the
run directory; a SIGKILL-resumed DPO run ends where an uninterrupted one does; SFT → DPO starts from the SFT
adapter with that adapter as the reference; inspect and eval read pair files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tuneforge import cli
from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.train.loop import train

PREFERENCE_KEYS = {"loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"}


@pytest.fixture
def pair_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    words = ["apple", "pear", "dog", "cat", "sun", "moon", "tree", "car", "book", "lamp"]
    with path.open("w") as f:
        for i, w in enumerate(words * 2):
            f.write(json.dumps({"prompt": f"Upper-case the word: {w}", "chosen": w.upper(),
                                "rejected": f"Sure! Here it is: {w} {i}."}) + "\n")
    return path


def _args(model_dir, data, out, *extra):
    sets = ["data.max_seq_len=64", "data.val_fraction=0.25", "train.batch_size=2", "train.threads=1",
            "train.lr=1e-2", *extra]
    return ["train", "--quiet", "--model", str(model_dir), "--data", str(data), "-o", str(out),
            *[x for s in sets for x in ("--set", s)]]


def _records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(("objective", "method", "output"), [
    ("dpo", "lora", "adapter"), ("dpo", "full", "model"), ("ipo", "qlora", "adapter"), ("orpo", "lora", "adapter"),
    ("simpo", "freeze", "model")])
def test_cli_trains_each_objective_and_writes_the_run(tiny_model_dir, pair_file, tmp_path, objective, method, output):
    run = tmp_path / "run"
    assert cli.main(_args(tiny_model_dir, pair_file, run, f"train.objective={objective}", f"method.name={method}",
                          "train.max_steps=4", "train.eval_every=2")) == 0
    assert (run / output).is_dir() and (run / "plots" / "loss.png").is_file()
    records = _records(run)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert PREFERENCE_KEYS <= set(steps[0])
    assert {"val_loss", "val_rewards/accuracies", "val_rewards/margins"} <= set(records[-1])
    if objective == "dpo":  # the policy starts as its reference: rewards 0, loss ln 2
        assert steps[0]["loss"] == pytest.approx(0.693147, abs=1e-4)
        assert steps[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
        assert steps[-1]["rewards/margins"] > 0


def test_precomputed_reference_equals_the_frozen_copy(tiny_model_dir, pair_file, tmp_path):
    common = ("train.objective=dpo", "method.name=full", "train.max_steps=3", "train.lr=1e-3", "data.packing=false")
    for mode in ("model", "precomputed"):
        cli.main(_args(tiny_model_dir, pair_file, tmp_path / mode, *common, f"preference.reference={mode}"))
    a, b = (load_file(str(tmp_path / m / "model" / "model.safetensors")) for m in ("model", "precomputed"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)
    assert (tmp_path / "precomputed" / "reference_logps.json").is_file()


KILLER = """
import os, signal, sys
from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.train.callbacks import TrainCallback
from tuneforge.train.loop import train
class Kill(TrainCallback):
    def on_eval(self, step, model):
        os.kill(os.getpid(), signal.SIGKILL)
train(load_config(sys.argv[1]), quiet=True, callbacks=[Kill()])
"""


@pytest.mark.parametrize(("method", "weights"), [("lora", "adapter/adapter_model.safetensors"),
                                                  ("full", "model/model.safetensors")])
def test_dpo_resumed_after_sigkill_equals_an_uninterrupted_run(tiny_model_dir, pair_file, tmp_path, method, weights):
    def config(out, *extra):
        return load_config(overrides=[f"model={tiny_model_dir}", f"data.train=[{pair_file}]", f"output_dir={out}",
                                      "data.max_seq_len=64", "data.val_fraction=0.25", "train.batch_size=2",
                                      "train.threads=1", "train.objective=dpo", f"method.name={method}",
                                      "train.max_steps=8", "train.lr=5e-3", "method.lora.dropout=0.2",
                                      "train.save_every=3", *extra])

    train(config(tmp_path / "straight"), quiet=True)
    cfg = config(tmp_path / "killed", "train.eval_every=5")
    cfg_path = tmp_path / "killed.yaml"
    cfg_path.write_text(json.dumps(cfg.model_dump(mode="json")))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", KILLER, str(cfg_path)], env=env, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]  # killed at step 5, after the step-3 checkpoint
    assert (tmp_path / "killed" / "checkpoints" / "step-3").is_dir()
    train(cfg, resume=True, quiet=True)
    a = load_file(str(tmp_path / "straight" / weights))
    b = load_file(str(tmp_path / "killed" / weights))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_sft_then_dpo_from_the_sft_adapter(tiny_model_dir, alpaca_file, pair_file, tmp_path):
    no_dropout = "method.lora.dropout=0"  # the policy then starts exactly at the reference
    assert cli.main(_args(tiny_model_dir, alpaca_file, tmp_path / "sft", "train.max_steps=3", no_dropout)) == 0
    sft = tmp_path / "sft" / "adapter"
    assert cli.main(_args(tiny_model_dir, pair_file, tmp_path / "dpo", "train.objective=dpo", "train.max_steps=2",
                          no_dropout, f"method.lora.init_adapter={sft}")) == 0
    first = _records(tmp_path / "dpo")[0]
    # the reference is the SFT adapter (precomputed before step 1), not the bare base: the policy starts equal to it
    assert first["loss"] == pytest.approx(0.693147, abs=1e-4)
    assert (tmp_path / "dpo" / "reference_logps.json").is_file()
    before, after = load_file(str(sft / "adapter_model.safetensors")), load_file(
        str(tmp_path / "dpo" / "adapter" / "adapter_model.safetensors"))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_inspect_and_eval_read_pair_files(tiny_model_dir, pair_file, tmp_path, capsys):
    assert cli.main(_args(tiny_model_dir, pair_file, tmp_path / "dpo", "train.objective=dpo", "train.max_steps=6")) == 0
    capsys.readouterr()
    assert cli.main(["data", "inspect", str(pair_file), "--model", str(tiny_model_dir), "--show", "1",
                     "--out", str(tmp_path / "inspect")]) == 0
    shown = capsys.readouterr().out
    assert "prompt_chosen_rejected" in shown and "chosen: ⟦APPLE" in shown and "rejected: ⟦Sure!" in shown
    assert cli.main(["eval", "--model", str(tiny_model_dir), "--data", str(pair_file), "--adapter",
                     str(tmp_path / "dpo" / "adapter"), "-o", str(tmp_path / "eval")]) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    base, tuned = (v["overall"] for v in results["variants"])
    assert {"preference_acc", "preference_acc_avg"} <= set(base)
    assert tuned["preference_acc"] >= base["preference_acc"] and tuned["preference_acc"] > 0.5


def test_packed_pairs_on_a_model_that_cannot_keep_them_apart_are_refused_before_training(tiny_tokenizer, pair_file,
                                                                                         tmp_path):
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    model_dir = tmp_path / "bloom"
    BloomForCausalLM(BloomConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, n_layer=2, n_head=4)).save_pretrained(
        model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    run = tmp_path / "run"
    config = load_config(None, [f"model={model_dir}", f"data.train=[{pair_file}]", f"output_dir={run}",
                                "train.objective=dpo", "train.max_steps=2", "train.threads=1", "data.max_seq_len=64"])
    with pytest.raises(ConfigError, match="data.packing: bloom cannot keep packed pairs apart.*data.packing: false"):
        train(config, quiet=True)
    assert not (run / "metrics.jsonl").exists()
