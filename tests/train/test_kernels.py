import pytest
import torch

from tuneforge.errors import ConfigError
from tuneforge.train.kernels import apply_kernels
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
