"""One batch, one adapter per row, one forward pass per step: each row equals its adapter alone."""

import copy

import pytest
import torch

from lora_helpers import make_adapter
from tuneforge.adapters.manager import AdapterSet, generate_multi
from tuneforge.errors import ModelError
from tuneforge.methods.lora import apply_lora, lora_layers, row_adapters
from tuneforge.methods.peft_format import save_adapter

PROMPTS = ["Hello world.", "The quick brown fox jumps", "apple ->", "What is 2 + 3? The answer",
           "Classify the sentiment: I love it", "0123"]
ROWS = ["a", None, "b", "c", "a", "b"]




@pytest.fixture
def aset(tiny_model, tiny_tokenizer, tmp_path):
    s = AdapterSet(copy.deepcopy(tiny_model), tiny_tokenizer)
    specs = {"a": (["q_proj", "v_proj"], 4), "b": ("all-linear", 2), "c": (["up_proj", "down_proj", "o_proj"], 8)}
    for i, (name, (targets, r)) in enumerate(specs.items()):
        s.load(name, make_adapter(tiny_model, tmp_path / name, targets, r, seed=i + 1, std=0.5))
    return s


def test_rows_match_each_adapter_alone(aset):
    out = generate_multi(aset, PROMPTS, ROWS, max_new_tokens=10)
    for name in ("a", "b", "c", None):
        aset.activate(name or {})
        same_batch = aset.generate(PROMPTS, max_new_tokens=10)
        for i, row in enumerate(ROWS):
            if row == name:
                assert out[i] == same_batch[i]
                assert out[i] == aset.generate([PROMPTS[i]], max_new_tokens=10)[0]  # unpadded, alone
        if name is not None:  # the adapters really change the output, so the check above can fail
            assert same_batch != generate_multi(aset, PROMPTS, [None] * len(PROMPTS), max_new_tokens=10)
    assert generate_multi(aset, PROMPTS, ROWS, max_new_tokens=10, batch_size=4) == out  # chunked


def test_one_forward_per_step(aset):
    calls = []
    model_hook = aset.model.register_forward_hook(lambda *_: calls.append("model"))
    layer = aset.model.model.layers[0].self_attn.q_proj
    layer_hook = layer.register_forward_hook(lambda *_: calls.append("q_proj"))
    try:
        generate_multi(aset, PROMPTS, ROWS, max_new_tokens=6)
    finally:
        model_hook.remove()
        layer_hook.remove()
    steps = calls.count("model")
    assert 1 <= steps <= 6  # not 6 × the number of adapters
    assert calls.count("q_proj") == steps  # and every LoRA layer ran once per step, for the whole batch


def test_row_logits_equal_single_adapter_logits(aset):
    ids = torch.randint(0, 400, (len(ROWS), 7), generator=torch.Generator().manual_seed(0))
    keys = [None if r is None else aset.key(r) for r in ROWS]
    with torch.no_grad(), row_adapters(aset.model, keys):
        mixed = aset.model(input_ids=ids).logits
    for name in ("a", "b", "c", None):
        aset.activate(name or {})
        with torch.no_grad():
            single = aset.model(input_ids=ids).logits
        rows = [i for i, r in enumerate(ROWS) if r == name]
        torch.testing.assert_close(mixed[rows], single[rows], atol=1e-5, rtol=0)
    assert all(layer.row_groups is None for layer in lora_layers(aset.model).values())  # context restored


def test_row_mode_refuses_what_it_cannot_do(aset):
    ids = torch.zeros((3, 4), dtype=torch.long)
    with pytest.raises(ModelError, match="given 2 rows but the forward has 3"):
        with row_adapters(aset.model, [aset.key("a"), None]):
            aset.model(input_ids=ids)
    aset.merge("a")
    with pytest.raises(ModelError, match="merged into the base"):
        with row_adapters(aset.model, [aset.key("b")]):
            pass
    with pytest.raises(ModelError, match="no adapter named 'zz'"):
        generate_multi(aset, ["x"], ["zz"])
    assert generate_multi(aset, ["x"], ["a"], max_new_tokens=2)  # generate_multi unmerges first


def test_dora_adapter_mixes_with_lora_rows(aset, tiny_model, tmp_path):
    """DoRA rescales each row's own output, so it joins the one-adapter-per-row batch like plain LoRA."""
    model = copy.deepcopy(tiny_model)
    torch.manual_seed(9)
    apply_lora(model, r=4, alpha=8, target_modules=["q_proj", "o_proj", "down_proj"], use_dora=True)
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_magnitude_vector" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    aset.load("d", save_adapter(model, tmp_path / "d"))
    rows = ["d", "a", None, "d"]
    out = generate_multi(aset, PROMPTS[:4], rows, max_new_tokens=8)
    aset.activate("d")
    alone = aset.generate(PROMPTS[:4], max_new_tokens=8)
    assert [out[0], out[3]] == [alone[0], alone[3]]
    assert alone != generate_multi(aset, PROMPTS[:4], [None] * 4, max_new_tokens=8)  # DoRA changes the output
