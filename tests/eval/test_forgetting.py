import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tuneforge.config import ForgettingSettings, load_config
from tuneforge.errors import TuneforgeError
from tuneforge.eval.forgetting import (
    ForgettingCallback,
    ForgettingDelta,
    ForgettingMeasure,
    forgetting_callback,
    measure_forgetting,
)
from tuneforge.eval.probes import sample_probes
from tuneforge.train.loop import train


@pytest.fixture
def general(tmp_path, shared_data):
    return shared_data / "general" / "tinyshakespeare.txt"


def config(model_dir, data, out, *extra):
    return load_config(overrides=[f"model={model_dir}", f"data.train=[{data}]", f"output_dir={out}",
                                  "data.max_seq_len=64", "data.val_fraction=0", "train.batch_size=2",
                                  "train.threads=1", "train.eval_every=2", *extra])


def test_measure_on_the_shared_general_text(tiny_model, tiny_tokenizer, general):
    m = measure_forgetting(tiny_model, tiny_tokenizer, general, sample_probes(20), max_tokens=300)
    assert m.general_tokens > 250 and m.general_ppl > 1
    assert m.probe_n == 20 and 0 <= m.probe_accuracy <= 1 and m.probe_answer_nll > 0


def test_delta():
    d = ForgettingDelta(ForgettingMeasure(general_ppl=10.0, probe_accuracy=0.5),
                        ForgettingMeasure(general_ppl=12.0, probe_accuracy=0.4))
    assert d.ppl_increase_pct == pytest.approx(20.0) and d.probe_change_points == pytest.approx(-10.0)
    assert "+20.0%" in d.summary()


def test_callback_logs_and_warns_during_training(tiny_model_dir, alpaca_file, tmp_path, general, tiny_tokenizer,
                                                 capsys):
    cb = ForgettingCallback(tiny_tokenizer, general_text=general, n_probes=20, max_tokens=200,
                            threshold_pct=-100.0, action="warn")  # any perplexity exceeds it
    train(config(tiny_model_dir, alpaca_file, tmp_path / "run", "train.max_steps=4", "train.lr=3e-2"),
          callbacks=(cb,), quiet=True)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "forget/general_ppl" in r]
    assert [r["step"] for r in logged] == [2, 4]  # every eval_every steps and at the end
    assert {"forget/ppl_increase_pct", "forget/probe_acc", "forget/probe_answer_nll"} <= set(logged[0])
    # the baseline was measured before the first step: the base model's perplexity
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert cb.baseline.general_ppl == pytest.approx(
        measure_forgetting(base, tiny_tokenizer, general, max_tokens=200).general_ppl, rel=1e-4)
    assert len(cb.warnings) == 2 and "forgetting at step 2" in capsys.readouterr().err
    assert (tmp_path / "run" / "adapter").is_dir()


def test_callback_stops_training(tiny_model_dir, alpaca_file, tmp_path, tiny_tokenizer, general):
    cb = ForgettingCallback(tiny_tokenizer, general_text=general, probes=[], max_tokens=200, threshold_pct=-100.0,
                            action="stop")
    result = train(config(tiny_model_dir, alpaca_file, tmp_path / "run", "train.max_steps=6"), callbacks=(cb,),
                   quiet=True)
    assert len(cb.history) == 1 and result.steps == 2  # stopped at the first measurement (step 2)
    final = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "perplexity rose" in final["stopped_early"]
    assert (tmp_path / "run" / "adapter").is_dir()  # what was trained is saved


def test_the_baseline_is_the_model_at_the_start(tiny_model, tiny_tokenizer, general):
    cb = ForgettingCallback(tiny_tokenizer, general_text=general, probes=[], max_tokens=100)
    with pytest.raises(TuneforgeError, match="no baseline"):
        cb.on_eval(1, tiny_model)
    cb.on_start(tiny_model, Path("unused"), None)
    assert cb.on_eval(1, tiny_model)["forget/ppl_increase_pct"] == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        tiny_model.lm_head.weight.mul_(3.0)
    assert cb.on_eval(2, tiny_model)["forget/ppl_increase_pct"] > 0


def test_forgetting_callback_follows_the_run_settings(tiny_tokenizer, general):
    settings = ForgettingSettings(general_text=str(general), n_probes=7, max_tokens=64, threshold_pct=None,
                                  probe_drop_points=3.0, action="stop")
    cb = forgetting_callback(settings, tiny_tokenizer)
    assert len(cb.probes) == 7 and len(cb.text.ids) == 64
    assert (cb.threshold_pct, cb.probe_drop_points, cb.action) == (None, 3.0, "stop")
