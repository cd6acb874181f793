"""An adapter as other tools see it: peft's auto-loader finds its base; files carry the user's umask."""

import json
import os
import stat

import torch
from peft import AutoPeftModelForCausalLM

from tuneforge.files import replaced_atomically
from tuneforge.methods.lora import apply_lora
from tuneforge.methods.peft_format import save_adapter


def test_peft_auto_loader_resolves_the_base_and_our_reference_is_kept(tiny_model, tmp_path, monkeypatch):
    model_dir = tmp_path / "base"
    tiny_model.save_pretrained(model_dir)
    monkeypatch.chdir(tmp_path)
    apply_lora(tiny_model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    out = save_adapter(tiny_model, tmp_path / "adapter", base_model_name_or_path="base")  # relative, as typed
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(model_dir.resolve())
    assert json.loads((out / "tuneforge.json").read_text()) == {"base_model": "base"}
    monkeypatch.chdir("/")  # peft must find the base from anywhere
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(out))
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, tiny_model.eval()(ids).logits, atol=1e-5)


def test_a_hub_id_is_kept_as_given(tiny_model, tmp_path):
    apply_lora(tiny_model, r=2, alpha=4, dropout=0.0, target_modules=["q_proj"])
    out = save_adapter(tiny_model, tmp_path / "a", base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_written_folders_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with replaced_atomically(tmp_path / "out") as tmp:
            (tmp / "f.txt").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "out" / "f.txt").stat().st_mode) == 0o644
