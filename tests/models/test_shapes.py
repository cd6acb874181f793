from tuneforge.methods.lora import apply_lora, count_parameters
from tuneforge.models.shapes import LLAMA2_7B, LLAMA2_70B, lora_table, model_shape


def test_counts_match_a_real_model(tiny_model):
    shape = model_shape(tiny_model.config)
    assert shape.params == sum(p.numel() for p in tiny_model.parameters())
    apply_lora(tiny_model, r=8, alpha=16)
    assert count_parameters(tiny_model)[0] == shape.lora_params(8)


def test_published_sizes():
    assert LLAMA2_7B.params == 6_738_415_616
    assert round(LLAMA2_70B.params / 1e9, 1) == 69.0
    assert model_shape("llama-3.2-1b").params == 1_235_814_400  # tied embeddings counted once
    rows = lora_table((8, 64))
    assert len(rows) == 6 and all(0 < r["share_pct"] < 20 for r in rows)
