"""`tuneforge adapters list|info|merge|combine`, including the errors a user will meet."""

import copy
import json

import pytest
import torch
from torch import nn

from tuneforge.adapters.manager import adapter_info
from tuneforge.cli import main
from tuneforge.methods.lora import apply_lora, lora_layers
from tuneforge.methods.peft_format import save_adapter


def make_adapter(base: nn.Module, out, targets, r: int):
    model = copy.deepcopy(base)
    apply_lora(model, r=r, alpha=2 * r, target_modules=targets)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B["default"].weight.normal_(0, 0.2)
    return save_adapter(model, out, base_model_name_or_path="tiny")


@pytest.fixture
def adapters(tiny_model, tmp_path):
    root = tmp_path / "adapters"
    make_adapter(tiny_model, root / "alpha", ["q_proj", "v_proj"], 4)
    make_adapter(tiny_model, root / "beta", "all-linear", 2)
    return root


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


def test_list_and_info(adapters, capsys):
    corrupt = adapters / "gamma"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text("{oops")
    rc, out, _ = run(capsys, "adapters", "list", adapters)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "RANK", "ALPHA", "TARGETS", "SIZE"]
    assert lines[1].split()[:4] == ["alpha", "4", "8", "q_proj,v_proj"]
    assert lines[2].split()[:3] == ["beta", "2", "4"] and "KB" in lines[2]
    assert lines[3].startswith("gamma: error:") and "not valid JSON" in lines[3]
    rc, out, _ = run(capsys, "adapters", "info", adapters / "alpha")
    assert rc == 0 and "rank: 4" in out and "targets: q_proj, v_proj" in out and "base model: tiny" in out


@pytest.mark.parametrize("command", ["list", "info"])
def test_missing_dir(tmp_path, capsys, command):
    rc, _, err = run(capsys, "adapters", command, tmp_path / "nope")
    assert rc == 2 and "does not exist" in err and err.startswith("error:")


def test_info_on_corrupt_files(adapters, capsys):
    (adapters / "alpha" / "adapter_model.safetensors").write_bytes(b"\x00" * 12)
    rc, _, err = run(capsys, "adapters", "info", adapters / "alpha")
    assert rc == 2 and "not a valid safetensors file" in err
    (adapters / "beta" / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    rc, _, err = run(capsys, "adapters", "info", adapters / "beta")
    assert rc == 2 and "LoRA adapters only" in err


def test_merge(adapters, tiny_model, tiny_model_dir, tmp_path, capsys):
    rc, out, _ = run(capsys, "adapters", "merge", "--model", tiny_model_dir, "--adapter", adapters / "beta",
                     "--out", tmp_path / "merged")
    assert rc == 0 and "merged model written" in out and (tmp_path / "merged" / "config.json").is_file()
    rc, _, err = run(capsys, "adapters", "merge", "--model", tiny_model_dir, "--adapter", adapters / "beta",
                     "--out", tmp_path / "merged")
    assert rc == 2 and "--overwrite" in err
    config = copy.deepcopy(tiny_model.config)
    config.num_hidden_layers = 3  # one layer more: the adapter misses a module the targets select
    other = make_adapter(type(tiny_model)(config), tmp_path / "other", ["q_proj"], 2)
    rc, _, err = run(capsys, "adapters", "merge", "--model", tiny_model_dir, "--adapter", other,
                     "--out", tmp_path / "m2")
    assert rc == 2 and "different base model" in err
    rc, _, err = run(capsys, "adapters", "merge", "--model", tiny_model_dir, "--adapter", tmp_path / "nope",
                     "--out", tmp_path / "m3")
    assert rc == 2 and "does not exist" in err


def test_combine(adapters, tiny_model, tmp_path, capsys):
    rc, out, _ = run(capsys, "adapters", "combine", "--adapter", adapters / "alpha", "--adapter", adapters / "beta",
                     "--weights", "0.5,0.5", "--out", tmp_path / "cat")
    assert rc == 0 and "cat combination" in out and "relative Frobenius error" in out
    info = adapter_info(tmp_path / "cat")
    assert info.r == 2 and set(info.rank_pattern.values()) == {6}  # q/v: 4 + 2, others: 2
    rc, out, _ = run(capsys, "adapters", "combine", "--adapter", adapters / "alpha", "--adapter", adapters / "beta",
                     "--method", "svd", "--rank", "3", "--out", tmp_path / "svd")
    assert rc == 0 and adapter_info(tmp_path / "svd").r == 2  # 3 on q/v, the rank-2 modules stay at 2
    rc, _, err = run(capsys, "adapters", "combine", "--adapter", adapters / "alpha", "--weights", "a,b",
                     "--out", tmp_path / "x")
    assert rc == 2 and "comma-separated numbers" in err
    rc, _, err = run(capsys, "adapters", "combine", "--adapter", adapters / "alpha", "--adapter", adapters / "beta",
                     "--method", "linear", "--out", tmp_path / "x")
    assert rc == 2 and "use --method cat" in err
    config = copy.deepcopy(tiny_model.config)
    config.hidden_size, config.intermediate_size = 32, 48
    other = make_adapter(type(tiny_model)(config), tmp_path / "other", ["q_proj"], 4)
    rc, _, err = run(capsys, "adapters", "combine", "--adapter", adapters / "alpha", "--adapter", other,
                     "--out", tmp_path / "x")
    assert rc == 2 and "different base models" in err
    assert not (tmp_path / "x").exists()
