import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tuneforge.config import load_config
from tuneforge.errors import TuneforgeError
from tuneforge.train import loop
from tuneforge.train.callbacks import TrainCallback
from tuneforge.train.loop import train
from tuneforge.train.step import CausalLMLoss, batch_loss


def config(model_dir, data, out, *extra):
    return load_config(overrides=[f"model={model_dir}", f"data.train=[{data}]", f"output_dir={out}",
                                  "data.max_seq_len=64", "data.val_fraction=0", "train.batch_size=2",
                                  "train.threads=1", *extra])


def test_lora_run_writes_the_run_directory(tiny_model_dir, alpaca_file, tmp_path):
    cfg = config(tiny_model_dir, alpaca_file, tmp_path / "run", "train.max_steps=8", "train.lr=1e-2",
                 "data.val_fraction=0.25", "train.eval_every=4")
    result = train(cfg, quiet=True)
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "plots/loss.png"):
        assert (run / name).is_file(), name
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= set(steps[0])
    assert any("val_loss" in r for r in rows) and result.val_loss is not None
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert 0 < result.trainable < result.total


def test_full_fine_tune_exports_a_transformers_model(tiny_model_dir, alpaca_file, tmp_path):
    train(config(tiny_model_dir, alpaca_file, tmp_path / "run", "method.name=full", "train.max_steps=2",
                 "train.lr=1e-3"), quiet=True)
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert not torch.equal(before.model.layers[0].mlp.up_proj.weight, after.model.layers[0].mlp.up_proj.weight)


def test_freeze_trains_only_the_top_block(tiny_model_dir, alpaca_file, tmp_path):
    train(config(tiny_model_dir, alpaca_file, tmp_path / "run", "method.name=freeze",
                 "method.freeze.top_k_layers=1", "train.max_steps=2", "train.lr=1e-3"), quiet=True)
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert torch.equal(before.model.layers[0].mlp.up_proj.weight, after.model.layers[0].mlp.up_proj.weight)
    assert not torch.equal(before.model.layers[1].mlp.up_proj.weight, after.model.layers[1].mlp.up_proj.weight)


def test_accumulation_normalizes_by_tokens_of_the_whole_batch(tiny_model_dir, alpaca_file, tmp_path):
    common = ("method.name=full", "train.max_steps=1", "train.lr=1e-3", "data.packing=false",
              "train.max_grad_norm=null")
    train(config(tiny_model_dir, alpaca_file, tmp_path / "a", *common, "train.batch_size=4"), quiet=True)
    train(config(tiny_model_dir, alpaca_file, tmp_path / "b", *common, "train.batch_size=2",
                 "train.grad_accum=2"), quiet=True)
    a = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)


def test_nan_loss_stops_without_saving(tiny_model, tiny_tokenizer, alpaca_file, tmp_path):
    with torch.no_grad():
        tiny_model.model.layers[0].mlp.up_proj.weight.fill_(float("nan"))
    cfg = config("unused", alpaca_file, tmp_path / "run", "train.max_steps=3")
    with pytest.raises(TuneforgeError, match="loss became nan"):
        train(cfg, model=tiny_model, tokenizer=tiny_tokenizer, quiet=True)
    assert not (tmp_path / "run" / "adapter").exists()


KILLER = """
import os, signal, sys
from tuneforge.config import load_config
from tuneforge.train.callbacks import TrainCallback
from tuneforge.train.loop import train
class Kill(TrainCallback):
    def on_eval(self, step, model):
        os.kill(os.getpid(), signal.SIGKILL)
cfg = load_config(sys.argv[1])
train(cfg, quiet=True, callbacks=[Kill()])
"""


def test_resume_after_sigkill_ends_with_the_same_weights(tiny_model_dir, alpaca_file, tmp_path):
    extra = ("train.max_steps=12", "train.lr=5e-3", "method.lora.dropout=0.2", "train.save_every=4")
    train(config(tiny_model_dir, alpaca_file, tmp_path / "straight", *extra), quiet=True)

    cfg = config(tiny_model_dir, alpaca_file, tmp_path / "killed", *extra, "train.eval_every=7")
    cfg_path = tmp_path / "killed.yaml"
    cfg_path.write_text(json.dumps(cfg.model_dump(mode="json")))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", KILLER, str(cfg_path)], env=env, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]  # killed at step 7, after the step-4 checkpoint
    assert (tmp_path / "killed" / "checkpoints" / "step-4").is_dir()
    assert not (tmp_path / "killed" / "adapter").exists()

    train(cfg, resume=True, quiet=True)
    a = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    steps = [json.loads(x)["step"] for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(set(steps)) == len(steps) - 1  # the final line repeats the last step


def test_qlora_trains_lora_on_a_4bit_base_and_saves_a_peft_adapter(tiny_model_dir, alpaca_file, tmp_path):
    result = train(config(tiny_model_dir, alpaca_file, tmp_path / "run", "method.name=qlora", "train.max_steps=6",
                          "train.lr=1e-2"), quiet=True)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    losses = [r["loss"] for r in result.metrics]
    assert losses[-1] < losses[0]
    weights = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert any("mlp.down_proj.lora_B" in k for k in weights)
    assert result.trainable < result.total


def test_padded_rows_and_packed_rows_give_the_same_loss(tiny_model, tiny_tokenizer):
    from tuneforge.data.conversation import Example, Message
    from tuneforge.data.packing import collate, no_pack, pack
    from tuneforge.data.template import encode

    examples = [Example(messages=[Message("user", "word " * n), Message("assistant", "ok " * (n + 1))])
                for n in (2, 5, 9)]
    tok = [t for e in examples for t in encode(e, tiny_tokenizer, 64)]
    pad = tiny_tokenizer.pad_token_id
    with torch.no_grad():
        padded, n1 = batch_loss(CausalLMLoss(tiny_model), collate(no_pack(tok), pad))
        packed, n2 = batch_loss(CausalLMLoss(tiny_model), collate(pack(tok, 64), pad))
    assert n1 == n2
    torch.testing.assert_close(padded, packed, atol=1e-4, rtol=1e-5)


def test_a_callback_can_stop_the_run_early_and_the_output_is_saved(tiny_model_dir, alpaca_file, tmp_path):
    from tuneforge.errors import StopTraining

    class StopAt4(TrainCallback):
        def on_eval(self, step, model):
            if step == 4:
                raise StopTraining("perplexity rose 50% over the base")
            return {"probe": 1.0}

    result = train(config(tiny_model_dir, alpaca_file, tmp_path / "run", "train.max_steps=10", "train.eval_every=2"),
                   callbacks=[StopAt4()], quiet=True)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert result.steps == 4 and rows[-1]["stopped_early"].startswith("perplexity rose")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4] and rows[1]["probe"] == 1.0
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_a_cpu_batch_split_to_save_ram_trains_the_same_and_says_so(tiny_model_dir, alpaca_file, tmp_path,
                                                                   monkeypatch, capsys):
    common = ("method.name=full", "train.max_steps=2", "train.lr=1e-3", "train.batch_size=4", "data.packing=false")
    train(config(tiny_model_dir, alpaca_file, tmp_path / "whole", *common), quiet=True)
    monkeypatch.setattr(loop, "cpu_rows_per_forward", lambda *a, **k: 1)  # as when RAM allows one row per forward
    capsys.readouterr()
    train(config(tiny_model_dir, alpaca_file, tmp_path / "split", *common))
    assert "runs as forwards of 1 rows" in capsys.readouterr().err
    a = load_file(str(tmp_path / "whole" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "model" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)

