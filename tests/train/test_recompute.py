import pytest
import torch

from tuneforge.config import validate
from tuneforge.train import plan as plan_module
from tuneforge.train.plan import GIB
from tuneforge.train.recompute import choose_mode, enable, offloaded_checkpoint, resolve_mode


def _config(**train):
    return validate({"model": "llama-3-8b", "method": {"name": "lora"}, "data": {"max_seq_len": 2048},
                     "train": {"batch_size": 4, **train}})


@pytest.mark.parametrize(("gpu_gib", "mode"), [(141, "off"), (32, "on"), (22, "offload")])
def test_auto_recomputes_only_when_the_planner_says_it_must(monkeypatch, gpu_gib, mode):
    # planner for 8B LoRA (bf16 base) 4x2048: ~65 GiB without recomputation, ~21 with, ~19 offloaded
    monkeypatch.setattr(plan_module, "_cuda_memory", lambda device=None: gpu_gib * GIB)
    assert choose_mode(_config(), torch.device("cuda")) == mode


def test_explicit_settings_win_and_the_cpu_never_recomputes_by_default():
    assert choose_mode(_config(gradient_checkpointing=True), torch.device("cuda")) == "on"
    assert choose_mode(_config(gradient_checkpointing="offload"), torch.device("cpu")) == "offload"
    assert choose_mode(_config(), torch.device("cpu")) == "off"
    assert resolve_mode(False) == "off"


def test_offloaded_checkpoint_gives_the_same_gradients_and_replays_dropout():
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.5), torch.nn.Tanh())
    x = torch.randn(4, 8, requires_grad=True)

    def run(inp):
        return layer(inp)

    torch.manual_seed(1)
    ref = run(x)
    ref.sum().backward()
    ref_grads = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()
    torch.manual_seed(1)
    out = offloaded_checkpoint(run, x)
    torch.manual_seed(99)  # the recompute must not see this state
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    for a, b in zip(ref_grads, [x.grad] + [p.grad for p in layer.parameters()], strict=True):
        torch.testing.assert_close(a, b)


def test_enable_checkpoints_every_decoder_layer(tiny_model):
    enable(tiny_model, "offload")
    layers = [m for m in tiny_model.modules() if getattr(m, "gradient_checkpointing", False)]
    assert layers and all(m._gradient_checkpointing_func is offloaded_checkpoint for m in layers)
    tiny_model.train()
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 12))
    tiny_model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in tiny_model.parameters() if p.requires_grad)
