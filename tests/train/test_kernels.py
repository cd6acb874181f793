import pytest
import torch

from tuneforge.errors import ConfigError
from tuneforge.train.kernels import apply_kernels, compile_layers
from tuneforge.train.step import CausalLMLoss, batch_loss


def test_auto_keeps_torch_kernels_on_the_cpu(tiny_model):
    assert apply_kernels(tiny_model, "auto", torch.device("cpu")) == "torch"
    assert apply_kernels(tiny_model, "torch", torch.device("cpu")) == "torch"


def test_liger_on_the_cpu_is_refused_with_the_fix(tiny_model):
    with pytest.raises(ConfigError, match="train.kernels=torch"):
        apply_kernels(tiny_model, "liger", torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's kernels are Triton (GPU)")
def test_liger_kernels_keep_the_loss_on_gpu(tiny_model):
    pytest.importorskip("liger_kernel")

    model = tiny_model.to("cuda")
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    batch = {"input_ids": ids, "labels": ids, "seq_ids": torch.zeros_like(ids),
             "position_ids": torch.arange(16).expand(2, 16)}
    ref, _ = batch_loss(CausalLMLoss(model, amp=torch.bfloat16), batch)
    assert apply_kernels(model, "auto", torch.device("cuda")) == "liger"
    fused, _ = batch_loss(CausalLMLoss(model, amp=torch.bfloat16), batch)
    torch.testing.assert_close(fused, ref, rtol=2e-2, atol=2e-2)


def _batch(vocab: int, n: int = 16) -> dict:
    ids = torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids, "seq_ids": torch.zeros_like(ids),
            "position_ids": torch.arange(n).expand(2, n)}


def test_compiled_layers_give_the_same_loss_and_gradients(tiny_model):
    batch = _batch(tiny_model.config.vocab_size)
    tiny_model.train()
    ref, _ = batch_loss(CausalLMLoss(tiny_model), batch)
    ref.backward()
    ref_grads = [p.grad.clone() for p in tiny_model.parameters()]
    tiny_model.zero_grad()
    # the eager backend runs dynamo's capture (the wiring) without the compiler, which the CPU does not need
    assert compile_layers(tiny_model, torch.device("cpu"), backend="eager") == tiny_model.config.num_hidden_layers
    assert all(layer._compiled_call_impl is not None for layer in tiny_model.model.layers)
    out, _ = batch_loss(CausalLMLoss(tiny_model), batch)
    out.backward()
    torch.testing.assert_close(out, ref)
    for p, g in zip(tiny_model.parameters(), ref_grads, strict=True):
        torch.testing.assert_close(p.grad, g)


def test_compile_on_the_cpu_is_refused_with_the_fix(tiny_model):
    with pytest.raises(ConfigError, match="train.compile=false"):
        compile_layers(tiny_model, torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor's Triton kernels need a CUDA GPU")
def test_compiled_layers_keep_the_loss_on_gpu(tiny_model):
    model = tiny_model.to("cuda").train()
    batch = _batch(model.config.vocab_size)
    ref, _ = batch_loss(CausalLMLoss(model, amp=torch.bfloat16), batch)
    compile_layers(model, torch.device("cuda"))
    out, _ = batch_loss(CausalLMLoss(model, amp=torch.bfloat16), batch)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
