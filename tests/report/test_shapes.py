from tuneforge.methods.lora import apply_lora, count_parameters
from tuneforge.report.shapes import LLAMA2_7B, LLAMA2_70B, Shape, lora_table


def test_counts_match_a_real_model(tiny_model):
    cfg = tiny_model.config
    shape = Shape("tiny", cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads,
                  cfg.num_key_value_heads, cfg.vocab_size, True)
    assert shape.total_params() == sum(p.numel() for p in tiny_model.parameters())
    apply_lora(tiny_model, r=8, alpha=16)
    assert count_parameters(tiny_model)[0] == shape.lora_params(8)


def test_published_sizes():
    assert LLAMA2_7B.total_params() == 6_738_415_616
    assert round(LLAMA2_70B.total_params() / 1e9, 1) == 69.0
    rows = lora_table((8, 64))
    assert len(rows) == 6 and all(0 < r["share_pct"] < 20 for r in rows)
