"""Adapters found in run directories (`runs/NAME/adapter`), and malformed adapter folders met through every
entry point: one validation, one message naming the file, the key and the fix."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_helpers import make_adapter
from tuneforge.adapters.manager import adapter_info, find_adapter_dirs, scan_adapters
from tuneforge.cli import main
from tuneforge.errors import ModelError
from tuneforge.methods.peft_format import load_adapter

Q_KEY = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture
def runs(tiny_model, tmp_path):
    """runs/: two finished runs, one still running (no adapter yet), one broken run, a plain adapter folder."""
    root = tmp_path / "runs"
    for name, seed in (("exp1", 1), ("exp2", 2)):
        make_adapter(tiny_model, root / name / "adapter", ["q_proj", "v_proj"], 2 * seed, seed)
        (root / name / "tuneforge-run.json").write_text(json.dumps({"status": "finished"}))
    (root / "running").mkdir()
    (root / "running" / "tuneforge-run.json").write_text(json.dumps({"status": "running"}))
    broken = make_adapter(tiny_model, root / "broken" / "adapter", ["q_proj"], 2, 3)
    config = json.loads((broken / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps(config | {"target_modules": 5}))
    make_adapter(tiny_model, root / "plain", "all-linear", 2, 4)
    (root / "notes").mkdir()
    return root


def test_run_directories_are_named_by_the_run(runs):
    assert find_adapter_dirs(runs) == {"broken": runs / "broken" / "adapter", "exp1": runs / "exp1" / "adapter",
                                       "exp2": runs / "exp2" / "adapter", "plain": runs / "plain"}
    infos, errors = scan_adapters(runs)
    assert [(i.name, i.r, i.path) for i in infos] == [("exp1", 2, str(runs / "exp1" / "adapter")),
                                                      ("exp2", 4, str(runs / "exp2" / "adapter")),
                                                      ("plain", 2, str(runs / "plain"))]
    assert list(errors) == ["broken"] and "target_modules=5" in errors["broken"]
    # a run directory, or its adapter folder, given itself
    assert [i.name for i in scan_adapters(runs / "exp1")[0]] == ["exp1"]
    assert [i.name for i in scan_adapters(runs / "exp1" / "adapter")[0]] == ["adapter"]


def test_cli_adapters_list_runs(runs, capsys):
    assert main(["adapters", "list", str(runs)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[1:4]] == ["exp1", "exp2", "plain"]
    assert out[4].startswith("broken: error: ") and "target_modules=5" in out[4]


def _break(adapter, how: str) -> str:
    """Make ``adapter`` malformed; returns a piece of the message every entry point must show."""
    config_path, weights_path = adapter / "adapter_config.json", adapter / "adapter_model.safetensors"
    if how == "weights":
        save_file(load_file(weights_path) | {f"{Q_KEY}.lora_A.weight": torch.tensor(1.0)}, weights_path)
        return f"{weights_path}: {Q_KEY}.lora_A.weight has shape []"
    config = json.loads(config_path.read_text())
    change = {"targets": {"target_modules": 5}, "rank_pattern": {"rank_pattern": [4]},
              "alpha": {"lora_alpha": "16"}}[how]
    config_path.write_text(json.dumps(config | change))
    return f"{config_path}: {next(iter(change))}="


@pytest.mark.parametrize("how", ["targets", "rank_pattern", "alpha", "weights"])
def test_info_and_load_share_one_validation(tiny_model, tmp_path, how):
    adapter = make_adapter(tiny_model, tmp_path / "a", ["q_proj", "v_proj"], 4, 1)
    message = _break(adapter, how)
    with pytest.raises(ModelError) as info_error:
        adapter_info(adapter)
    with pytest.raises(ModelError) as load_error:
        load_adapter(copy.deepcopy(tiny_model), adapter)
    assert message in str(info_error.value) and str(info_error.value) == str(load_error.value)


@pytest.mark.parametrize("how", ["targets", "weights"])
def test_malformed_adapter_through_generate_eval_and_train(tiny_model, tiny_model_dir, alpaca_file, tmp_path,
                                                           capsys, how):
    adapter = make_adapter(tiny_model, tmp_path / "a", ["q_proj", "v_proj"], 4, 1)
    message = _break(adapter, how)
    commands = {
        "generate": ["generate", "--model", tiny_model_dir, "--adapter", adapter, "--threads", "1", "hello"],
        "eval": ["eval", "--model", tiny_model_dir, "--adapter", adapter, "--data", alpaca_file,
                 "--output", tmp_path / "eval", "--threads", "1"],
        "train": ["train", "--quiet", "--model", tiny_model_dir, "--data", alpaca_file, "-o", tmp_path / "run",
                  "--set", "train.threads=1", "--set", "train.max_steps=1",
                  "--set", f"method.lora.init_adapter={adapter}"],
    }
    for name, argv in commands.items():
        rc = main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err and "this is a bug" not in err, (name, err)
        assert message in err, (name, err)
