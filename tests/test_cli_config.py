"""Every configured command builds its config one way: YAML ← --set ← named flags, errors naming key and flag."""

import logging
import sys
import types

import pytest

from tuneforge import cli
from tuneforge.config import AdviseConfig, EvalConfig, LabConfig, PlanConfig, RunConfig, ServeConfig, UiConfig
from tuneforge.errors import ConfigError


def config_for(*argv):
    return cli.config_of(cli.build_parser().parse_args([str(a) for a in argv]))


@pytest.mark.parametrize(("command", "schema", "required"), [
    ("train", RunConfig, []), ("eval", EvalConfig, ["--data", "d.jsonl"]),
    ("advise", AdviseConfig, ["--data", "d.jsonl"]), ("serve", ServeConfig, ["--adapters", "a"]),
    ("lab", LabConfig, []), ("ui", UiConfig, []), ("plan", PlanConfig, [])])
def test_each_command_builds_its_model_from_yaml_set_and_flags(tmp_path, command, schema, required):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("model: from-yaml\n" if "model" in schema.model_fields
                         else "threads: 1\n" if schema is LabConfig else "port: 7860\n")
    built = config_for(command, "--config", yaml_file, *required)
    assert isinstance(built, schema)
    if "model" not in schema.model_fields:
        assert built.threads == 1 if schema is LabConfig else built.port == 7860
    else:
        assert built.model == "from-yaml"
        assert config_for(command, "-c", yaml_file, "--set", "model=from-set", *required).model == "from-set"
        # a named flag wins over --set and the file
        assert config_for(command, "-c", yaml_file, "--set", "model=from-set", *required,
                          "--model", "from-flag").model == "from-flag"


def test_train_flags_map_onto_keys():
    c = config_for("train", "--data", "a.jsonl", "--data", "b.csv", "--method", "full", "-o", "runs/x",
                   "--max-steps", "7", "--lr", "1e-4", "--skip-bad")
    assert [s.path for s in c.data.train] == ["a.jsonl", "b.csv"]
    assert (c.method.name, c.output_dir, c.train.max_steps, c.train.lr, c.data.skip_bad) == (
        "full", "runs/x", 7, 1e-4, True)
    assert config_for("train").data.skip_bad is False  # an absent store_true flag leaves the key alone


def test_serve_defaults_come_from_the_model():
    c = config_for("serve", "--model", "m", "--adapters", "d")
    assert (c.host, c.port, c.max_batch, c.max_tokens_limit, c.api_key) == ("127.0.0.1", 8000, 8, 512, None)


def test_ui_passes_its_config_to_the_dashboard(monkeypatch, tmp_path):
    seen = {}
    fake = types.SimpleNamespace(serve_ui=lambda runs_dir, **kw: seen.update(kw, runs_dir=runs_dir))
    monkeypatch.setitem(sys.modules, "tuneforge.ui.app", fake)  # the real one needs the optional [ui] packages
    assert cli.main(["ui", "--runs", str(tmp_path), "--port", "9000", "--set", "token=t"]) == 0
    assert seen == {"runs_dir": tmp_path, "host": "127.0.0.1", "port": 9000, "token": "t",
                    "serve_url": "http://127.0.0.1:8000"}


def test_eval_and_advise_flags():
    c = config_for("eval", "--data", "d.jsonl", "--adapter", "a1", "--adapter", "a2", "--metric", "exact",
                   "--metric", "loss", "--no-base", "--schema", "s.json", "--limit", "5")
    assert (c.adapters, c.metrics, c.include_base, c.schema_file, c.limit) == (
        ["a1", "a2"], ["exact", "loss"], False, "s.json", 5)
    a = config_for("advise", "--data", "d.jsonl", "--shots", "2,4", "--steps", "9")
    assert (a.shots, a.train_steps) == ([2, 4], 9)


def test_plan_flags_set_the_run_keys():
    c = config_for("plan", "--model", "llama-3-8b", "--seq", "2048", "--batch", "4", "--recompute", "on",
                   "--targets", "q_proj,v_proj", "--gpus", "2", "--gpu-mem", "24")
    assert (c.data.max_seq_len, c.train.batch_size, c.train.gradient_checkpointing) == (2048, 4, "on")
    assert (c.method.lora.target_modules, c.gpus, c.gpu_mem) == (["q_proj", "v_proj"], 2, 24.0)


@pytest.mark.parametrize(("argv", "message"), [
    (["advise", "--data", "d", "--shots", "a,b"], r"shots\.0 \(--shots\)"),
    (["train", "--max-steps", "-3"], r"train\.max_steps \(--max-steps\)"),
    (["eval"], r"data: required"),
    (["serve", "--model", "m", "--adapters", "d", "--set", "prot=1"], r"prot: unknown key"),
    (["lab", "--set", "threads=0"], r"threads: Input should be greater than 0"),
    (["plan", "--batch", "3", "--gpus", "2"], r"divisible by --gpus 2"),
])
def test_errors_name_the_key_and_the_flag(argv, message):
    with pytest.raises(ConfigError, match=message):
        config_for(*argv)


def test_main_prints_config_errors_without_a_traceback(tmp_path, capsys):
    bad = tmp_path / "eval.yaml"
    bad.write_text("data: d.jsonl\nlimitt: 3\n")
    assert cli.main(["eval", "-c", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "eval.yaml" in err and "limitt: unknown key" in err


def test_train_builds_the_forgetting_callback_and_passes_it(monkeypatch, tmp_path):
    seen = {}

    def fake_callback(settings, tokenizer):
        seen["settings"], seen["tokenizer"] = settings, tokenizer
        return "forgetting-callback"

    def fake_train(config, resume, overwrite, callbacks, tokenizer, resume_with_changes):
        seen["callbacks"], seen["train_tokenizer"] = callbacks, tokenizer

    monkeypatch.setattr("tuneforge.eval.forgetting.forgetting_callback", fake_callback, raising=False)
    # train.loop first: imported while load_tokenizer is patched, it would keep the fake for later tests
    monkeypatch.setattr("tuneforge.train.loop.train", fake_train)
    monkeypatch.setattr("tuneforge.models.load.load_tokenizer", lambda ref, trust=False: f"tokenizer of {ref}")
    assert cli.main(["train", "--model", "m", "--set", "train.forgetting={n_probes: 5}"]) == 0
    assert seen["settings"].n_probes == 5 and seen["tokenizer"] == "tokenizer of m"
    assert seen["callbacks"] == ["forgetting-callback"] and seen["train_tokenizer"] == "tokenizer of m"
    assert cli.main(["train", "--model", "m"]) == 0
    assert seen["callbacks"] == [] and seen["train_tokenizer"] is None


def test_quiet_silences_information_only(monkeypatch):
    monkeypatch.setattr("tuneforge.adapters.manager.scan_adapters", lambda d: ([], []))
    logger = logging.getLogger("tuneforge")
    try:
        assert cli.main(["adapters", "list", "--quiet", "somewhere"]) == 0
        assert logger.level == logging.WARNING
        assert cli.main(["adapters", "list", "somewhere"]) == 0
        assert logger.level == logging.INFO
    finally:
        logger.setLevel(logging.INFO)
