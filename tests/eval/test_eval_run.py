import json

import pytest
import torch

from tuneforge.cli import main
from tuneforge.eval.run import default_metrics, evaluate_model, format_table, run_eval
from tuneforge.eval.scoring import examples_loss
from tuneforge.eval.sources import load_items
from tuneforge.methods.lora import apply_lora
from tuneforge.methods.peft_format import load_adapter, save_adapter

RECORDS = [
    {"prompt": "Upper-case the word: apple", "completion": "APPLE", "task": "upper"},
    {"prompt": "Upper-case the word: pear", "completion": "PEAR", "task": "upper"},
    {"prompt": "Classify the sentiment: I love it", "completion": "positive", "task": "sentiment"},
    {"prompt": "Classify the sentiment: I hate it", "completion": "negative", "task": "sentiment"},
    {"prompt": "Classify the sentiment: What a great day", "completion": "positive", "task": "sentiment"},
    {"prompt": "Translate to JSON: name Alice", "completion": '{"name": "Alice"}', "task": "json",
     "schema": {"type": "object", "required": ["name"]}},
]


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    return path


def make_adapter(model_dir, out, seed):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    apply_lora(model, r=4, alpha=8)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return save_adapter(model, out, base_model_name_or_path=str(model_dir))


def test_default_metrics_follow_the_data(data_file):
    items = load_items(str(data_file))
    assert default_metrics(items) == ["exact", "normalized", "contains", "json_schema", "mc", "loss"]
    assert "refusal" in default_metrics(load_items("builtin:refusal"))


def test_base_and_adapters_side_by_side(tiny_model_dir, data_file, tmp_path):
    a1 = make_adapter(tiny_model_dir, tmp_path / "ad1", seed=1)
    a2 = make_adapter(tiny_model_dir, tmp_path / "ad2", seed=2)
    report = run_eval(str(tiny_model_dir), str(data_file), adapters=[str(a1), str(a2)],
                      output=tmp_path / "out", max_new_tokens=4)
    assert [v.name for v in report.variants] == ["base", "ad1", "ad2"]
    losses = [v.overall["loss"] for v in report.variants]
    assert len(set(losses)) == 3  # each adapter changes the model

    # each column equals evaluating that model on its own
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    items = load_items(str(data_file))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    load_adapter(model, a2)
    assert losses[2] == pytest.approx(examples_loss(model, tok, [i.example for i in items]).nll, rel=1e-5)
    alone = evaluate_model(model, tok, items, ["exact", "mc"], max_new_tokens=4)
    assert alone.overall["mc"] == report.variants[2].overall["mc"]
    assert alone.predictions == report.variants[2].predictions

    assert set(report.variants[0].per_task["mc"]) == {"sentiment"}  # the only closed label set
    assert set(report.variants[0].per_task["loss"]) == {"upper", "sentiment", "json"}
    out = tmp_path / "out"
    saved = json.loads((out / "results.json").read_text())
    assert [v["name"] for v in saved["variants"]] == ["base", "ad1", "ad2"]
    assert (out / "eval.png").stat().st_size > 0 and (out / "eval_per_task.png").stat().st_size > 0
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {"base", "ad1", "ad2"} <= set(rows[0])
    table = format_table(report)
    assert "ad1" in table and "mc by task" in table


def test_cli_eval(tiny_model_dir, data_file, tmp_path, capsys):
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(data_file), "--metric", "exact",
                 "--metric", "loss", "--max-new-tokens", "3", "--output", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "exact_match" in out and "loss" in out and "base" in out
    assert (tmp_path / "o" / "results.json").is_file()


def test_cli_eval_errors_without_traceback(tiny_model_dir, data_file, tmp_path, capsys):
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(data_file), "--metric", "regex",
                 "--output", str(tmp_path / "o")]) == 2
    assert "--pattern" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(tmp_path / "nope.jsonl")]) == 2


def test_eval_callback_writes_metrics_during_training(tiny_model_dir, alpaca_file, tmp_path, tiny_tokenizer):
    from tuneforge.config import load_config
    from tuneforge.eval.run import MetricsCallback
    from tuneforge.eval.sources import load_items
    from tuneforge.train.loop import train

    items = load_items(str(alpaca_file), limit=6)
    cb = MetricsCallback(tiny_tokenizer, items, ["exact", "loss"], max_new_tokens=4)
    cfg = load_config(overrides=[f"model={tiny_model_dir}", f"data.train=[{alpaca_file}]",
                                 f"output_dir={tmp_path / 'run'}", "data.max_seq_len=64", "data.val_fraction=0",
                                 "train.batch_size=4", "train.threads=1", "train.max_steps=6", "train.lr=2e-2",
                                 "train.eval_every=3"])
    train(cfg, callbacks=(cb,), quiet=True)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in logged] == [3, 6] and "eval/exact_match" in logged[0]
    assert logged[-1]["eval/loss"] < logged[0]["eval/loss"]  # training on the same task lowers it


def test_plain_text_file_gives_perplexity(tiny_model, tiny_tokenizer, tmp_path):
    from tuneforge.eval.scoring import text_perplexity

    path = tmp_path / "general.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 30)
    items = load_items(str(path))
    assert default_metrics(items) == ["loss"]
    result = evaluate_model(tiny_model, tiny_tokenizer, items, ["loss"])
    expected = text_perplexity(tiny_model, tiny_tokenizer, path.read_text())
    assert result.overall["loss"] == pytest.approx(expected.nll, rel=1e-5)


def test_adapter_names_are_short_and_distinct():
    from tuneforge.eval.run import adapter_names

    assert adapter_names(["runs/a/adapter", "runs/b/adapter"]) == ["a", "b"]
    assert adapter_names(["x/lab/lora/adapter", "x/advise/lora/adapter"]) == ["lab/lora", "advise/lora"]
    assert adapter_names(["same", "same"]) == ["same", "same#2"]
    assert adapter_names(["runs/base"]) == ["base#2"]
