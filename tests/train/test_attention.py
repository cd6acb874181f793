import pytest
import torch
import torch.nn.functional as F

from tuneforge.train.attention import FLEX, attention_mask, block_causal_mask, document_mask, use_document_attention
from tuneforge.train.step import CausalLMLoss, batch_loss


def _seq_ids() -> torch.Tensor:
    # row 0: three examples then padding; row 1: one example filling the row
    return torch.tensor([[0] * 5 + [1] * 7 + [2] * 3 + [-1] * 1, [0] * 16])


def test_document_mask_attends_like_the_dense_block_causal_mask():
    from torch.nn.attention.flex_attention import flex_attention

    torch.manual_seed(0)
    seq_ids = _seq_ids()
    q, k, v = (torch.randn(2, 2, 16, 8) for _ in range(3))
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=block_causal_mask(seq_ids))
    flex = flex_attention(q, k, v, block_mask=document_mask(seq_ids))
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)


def _branch_ids() -> torch.Tensor:
    # row 0, example 1: prompt 3, chosen 2, rejected 2 (a shared-prompt pair); the rest: plain documents
    from tuneforge.data.preference import CHOSEN, PROMPT, REJECTED

    row0 = [PROMPT] * 5 + [PROMPT] * 3 + [CHOSEN] * 2 + [REJECTED] * 2 + [PROMPT] * 4
    return torch.tensor([row0, [PROMPT] * 16])


def test_shared_prompt_mask_keeps_the_answers_apart():
    mask = block_causal_mask(_seq_ids(), _branch_ids())[0, 0]
    rejected, chosen, prompt = 10, [8, 9], [5, 6, 7]
    assert mask[rejected].nonzero().squeeze(1).tolist() == prompt + [rejected]
    assert not mask[11, chosen].any() and mask[11, 10:12].all()
    assert mask[9].nonzero().squeeze(1).tolist() == prompt + chosen
    assert torch.equal(block_causal_mask(_seq_ids(), torch.zeros(2, 16, dtype=torch.long)),
                       block_causal_mask(_seq_ids()))


def test_shared_prompt_document_mask_attends_like_the_dense_mask():
    from torch.nn.attention.flex_attention import flex_attention

    torch.manual_seed(0)
    seq_ids, branch_ids = _seq_ids(), _branch_ids()
    q, k, v = (torch.randn(2, 2, 16, 8) for _ in range(3))
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=block_causal_mask(seq_ids, branch_ids))
    flex = flex_attention(q, k, v, block_mask=document_mask(seq_ids, branch_ids))
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)


def test_cpu_batches_get_a_padding_mask_or_a_dense_block_mask(tiny_model):
    device = torch.device("cpu")
    assert use_document_attention(tiny_model, device) is False
    assert tiny_model.config._attn_implementation != FLEX
    one_per_row = torch.tensor([[0, 0, 0, -1], [0, 0, 0, 0]])
    assert attention_mask(tiny_model, one_per_row, device).tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    packed = _seq_ids()
    assert torch.equal(attention_mask(tiny_model, packed, device), block_causal_mask(packed))
    shared = torch.tensor([[0, 0, 0, 0]]), torch.tensor([[0, 1, 2, 2]])  # one pair per row still needs its mask
    assert torch.equal(attention_mask(tiny_model, *shared[:1], device, shared[1]), block_causal_mask(*shared))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's fast path is for GPUs")
def test_packed_loss_with_flex_equals_dense_mask_on_gpu(tiny_model):

    device = torch.device("cuda")
    model = tiny_model.to(device)
    seq_ids = _seq_ids()
    ids = torch.randint(0, model.config.vocab_size, seq_ids.shape)
    positions = torch.cat([torch.arange(5), torch.arange(7), torch.arange(3), torch.arange(1)])
    batch = {"input_ids": ids, "labels": ids.masked_fill(seq_ids < 0, -100), "seq_ids": seq_ids,
             "position_ids": torch.stack([positions, torch.arange(16)])}
    dense, n = batch_loss(CausalLMLoss(model), batch)
    assert use_document_attention(model, device)
    flex, n_flex = batch_loss(CausalLMLoss(model), batch)
    assert n == n_flex
    torch.testing.assert_close(flex, dense, atol=1e-4, rtol=1e-4)
