import pytest
import torch

from tuneforge.config import validate
from tuneforge.train import plan as plan_module
from tuneforge.train.plan import GIB, choose_recompute, resolve_mode
from tuneforge.train.recompute import OffloadedActivations, enable
from tuneforge.train.step import CausalLMLoss, batch_loss


def _config(**train):
    return validate({"model": "llama-3-8b", "method": {"name": "lora"}, "data": {"max_seq_len": 2048},
                     "train": {"batch_size": 4, **train}})


@pytest.mark.parametrize(("gpu_gib", "mode"), [(141, "off"), (32, "on"), (22, "offload")])
def test_auto_recomputes_only_when_the_planner_says_it_must(monkeypatch, gpu_gib, mode):
    # planner for 8B LoRA (bf16 base) 4x2048: ~65 GiB without recomputation, ~21 with, ~19 offloaded
    monkeypatch.setattr(plan_module, "_cuda_memory", lambda device=None: gpu_gib * GIB)
    assert choose_recompute(_config(), torch.device("cuda")) == mode


def test_explicit_settings_win_and_the_cpu_never_recomputes_by_default():
    assert choose_recompute(_config(gradient_checkpointing=True), torch.device("cuda")) == "on"
    assert choose_recompute(_config(gradient_checkpointing="offload"), torch.device("cpu")) == "offload"
    assert choose_recompute(_config(), torch.device("cpu")) == "off"
    assert resolve_mode(False) == "off"


def _grads(model, offload: bool) -> list[torch.Tensor]:
    model.zero_grad()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(12).expand(2, 12),
             "seq_ids": torch.zeros_like(ids)}
    torch.manual_seed(1)  # dropout draws the same masks in both runs (and the recompute replays them)
    loss, _ = batch_loss(CausalLMLoss(model, activations=OffloadedActivations() if offload else None), batch)
    loss.backward()
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_checkpointing_and_offloading_keep_the_gradients(tiny_model):
    tiny_model.config.attention_dropout = 0.3  # recomputation must replay dropout
    tiny_model.train()
    plain = _grads(tiny_model, offload=False)
    enable(tiny_model, "offload")
    assert [m for m in tiny_model.modules() if getattr(m, "gradient_checkpointing", False)]
    for offload in (False, True):
        for a, b in zip(plain, _grads(tiny_model, offload), strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="offloading moves GPU tensors to host memory")
def test_offloading_through_host_memory_keeps_the_gradients_on_gpu(tiny_model):
    model = tiny_model.to("cuda")
    model.train()
    enable(model, "on")
    kept = _grads(model, offload=False)
    for a, b in zip(kept, _grads(model, offload=True), strict=True):
        torch.testing.assert_close(a, b)
