import json
import warnings

import pytest
import torch

from tuneforge.config import load_config
from tuneforge.errors import TuneforgeError
from tuneforge.eval.forgetting import (
    ForgettingCallback,
    ForgettingDelta,
    ForgettingMeasure,
    lora_disabled,
    measure_forgetting,
)
from tuneforge.eval.probes import sample_probes
from tuneforge.methods.lora import apply_lora
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


def test_lora_disabled_gives_the_base_model(tiny_model, tiny_tokenizer):
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        base = tiny_model(x).logits
        apply_lora(tiny_model, r=4, alpha=8)
        for n, p in tiny_model.named_parameters():
            if "lora_B" in n:
                p.normal_()
        tuned = tiny_model(x).logits
        with lora_disabled(tiny_model) as ok:
            off = tiny_model(x).logits
        again = tiny_model(x).logits
    assert ok and torch.allclose(off, base, atol=1e-6)
    assert not torch.allclose(tuned, base) and torch.equal(again, tuned)


def test_callback_logs_and_warns_during_training(tiny_model_dir, alpaca_file, tmp_path, general, tiny_tokenizer):
    cb = ForgettingCallback(tiny_tokenizer, general_text=general, n_probes=20, max_tokens=200,
                            threshold_pct=-100.0, action="warn")  # any perplexity exceeds it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(config(tiny_model_dir, alpaca_file, tmp_path / "run", "train.max_steps=4", "train.lr=3e-2"),
              callbacks=(cb,), quiet=True)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "forget/general_ppl" in r]
    assert [r["step"] for r in logged] == [2, 4]  # every eval_every steps and at the end
    assert {"forget/ppl_increase_pct", "forget/probe_acc", "forget/probe_answer_nll"} <= set(logged[0])
    # the baseline was measured with the LoRA adapter off: the base model's perplexity
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert cb.baseline.general_ppl == pytest.approx(
        measure_forgetting(base, tiny_tokenizer, general, max_tokens=200).general_ppl, rel=1e-4)
    assert len(cb.warnings) == 2 and any("forgetting at step 2" in str(w.message) for w in caught)
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


def test_full_fine_tune_needs_an_explicit_baseline(tiny_model, tiny_tokenizer, general):
    cb = ForgettingCallback(tiny_tokenizer, general_text=general, probes=[], max_tokens=100)
    with pytest.raises(TuneforgeError, match="set_baseline"):
        cb(1, tiny_model)
    cb.set_baseline(tiny_model)
    assert cb(1, tiny_model)["forget/ppl_increase_pct"] == pytest.approx(0.0, abs=1e-6)
