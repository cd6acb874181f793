import pytest
import torch
import torch.nn.functional as F

from tuneforge.train.attention import (
    FLEX,
    attention_layout,
    attention_mask,
    block_causal_mask,
    document_mask,
    packing_refusal,
    use_document_attention,
)
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


GPU_MODELS = {  # full attention; one windowed mask; a mask per layer type; eager with soft-capped scores
    "llama": ("llama", {}),
    "mistral": ("mistral", {"sliding_window": 4}),
    "qwen2-hybrid": ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
    "gemma2": ("gemma2", {"sliding_window": 4, "query_pre_attn_scalar": 16}),
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's fast path is for GPUs")
@pytest.mark.parametrize("name", GPU_MODELS)
def test_packed_loss_with_flex_equals_dense_mask_on_gpu(name):
    device = torch.device("cuda")
    model = _tiny(GPU_MODELS[name][0], **GPU_MODELS[name][1]).to(device)
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


def _tiny(model_type: str, **extra) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                  **extra)
    return AutoModelForCausalLM.from_config(config).eval()


def test_a_sliding_window_keeps_the_last_window_keys_of_the_example():
    seq_ids = torch.tensor([[0] * 6 + [1] * 4])
    mask = block_causal_mask(seq_ids, window=3)[0, 0]
    assert mask[5].nonzero().squeeze(1).tolist() == [3, 4, 5]
    assert mask[7].nonzero().squeeze(1).tolist() == [6, 7]  # the window never reaches into the previous example
    assert torch.equal(mask, block_causal_mask(seq_ids)[0, 0].triu(-2))


def test_document_mask_with_a_window_attends_like_the_dense_mask():
    from torch.nn.attention.flex_attention import flex_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 16, 8) for _ in range(3))
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=block_causal_mask(_seq_ids(), window=4))
    flex = flex_attention(q, k, v, block_mask=document_mask(_seq_ids(), window=4))
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)


def test_packed_masks_follow_each_layer_type():
    packed, cpu = _seq_ids(), torch.device("cpu")
    mistral = attention_mask(_tiny("mistral", sliding_window=4), packed, cpu)  # one mask, every layer windowed
    assert torch.equal(mistral, block_causal_mask(packed, window=4))
    hybrid = _tiny("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    masks = attention_mask(hybrid, packed, cpu)  # a mask per layer type, as the model builds them alone
    assert set(masks) == {"full_attention", "sliding_attention"}
    assert torch.equal(masks["sliding_attention"], block_causal_mask(packed, window=4))
    assert torch.equal(masks["full_attention"], block_causal_mask(packed))
    assert attention_layout(_tiny("qwen2", sliding_window=4)).windows == {"full_attention": None}  # window off


def test_eager_attention_gets_an_additive_mask():
    gemma2 = _tiny("gemma2", sliding_window=4, query_pre_attn_scalar=16)
    assert gemma2.config._attn_implementation == "eager"
    masks = attention_mask(gemma2, _seq_ids(), torch.device("cpu"))
    allowed = block_causal_mask(_seq_ids(), window=4)
    expected = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    assert torch.equal(masks["sliding_attention"], expected)


def test_alibi_models_refuse_packed_masks_and_say_they_unpack(capsys):
    from tuneforge.errors import ConfigError

    bloom = _tiny("bloom", n_layer=2, n_head=2)
    assert "ALiBi" in packing_refusal(bloom) and packing_refusal(_tiny("llama")) is None
    assert attention_mask(bloom, torch.tensor([[0, 0, -1]]), torch.device("cpu")).tolist() == [[1, 1, 0]]
    with pytest.raises(ConfigError, match="data.packing: false"):
        attention_mask(bloom, _seq_ids(), torch.device("cpu"))
    assert use_document_attention(bloom, torch.device("cpu")) is False
    assert "each example gets its own padded row" in capsys.readouterr().err


@pytest.mark.parametrize("model_type, extra", [("qwen3_next", {"num_experts": 2}), ("jamba", {"num_experts": 2}),
                                               ("recurrent_gemma", {}), ("mamba", {})])
def test_layers_no_mask_confines_refuse_packing(model_type, extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, **extra)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert "which no attention mask confines" in packing_refusal(model)
