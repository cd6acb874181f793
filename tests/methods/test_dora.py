"""DoRA: training gradients, dropout, merge/unmerge/export, a 4-bit base and per-row adapters, against peft
where peft has the same operation (fp32, a tiny random Llama)."""

import copy
import warnings

import pytest
import torch
from torch import nn

from tuneforge.adapters.combine import combine_adapters
from tuneforge.adapters.export import merge_and_unload
from tuneforge.errors import ModelError
from tuneforge.methods.lora import (
    apply_lora,
    lora_layers,
    merge_lora,
    remove_lora,
    row_adapters,
    set_active_adapters,
    unmerge_lora,
)
from tuneforge.methods.peft_format import load_adapter, save_adapter
from tuneforge.quant.linear4bit import Linear4bit, quantize_model

peft = pytest.importorskip("peft")

IDS = torch.randint(0, 400, (2, 9), generator=torch.Generator().manual_seed(0))
TARGETS = ["q_proj", "v_proj", "down_proj"]


def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def randomize(model: nn.Module, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_magnitude_vector" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)


def dora_model(base: nn.Module, seed: int = 3, dropout: float = 0.0, **kw) -> nn.Module:
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    apply_lora(model, r=4, alpha=8, dropout=dropout, target_modules=TARGETS, use_dora=True, **kw)
    randomize(model, seed)
    return model


def peft_twin(base: nn.Module, ours: nn.Module, tmp_path, dropout: float = 0.0) -> nn.Module:
    """peft's model holding our adapter (saved and reloaded), dropout set as ours."""
    out = save_adapter(ours, tmp_path / "twin")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(out), is_trainable=True)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = dropout
    return model


def test_fresh_dora_adapter_is_a_no_op_and_trains_the_magnitude(tiny_model):
    model = copy.deepcopy(tiny_model)
    apply_lora(model, r=4, alpha=8, target_modules=TARGETS, use_dora=True)
    torch.testing.assert_close(logits(model), logits(tiny_model), atol=1e-5, rtol=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 18 and all(".lora_" in n for n in trainable)
    assert sum(n.endswith(".lora_magnitude_vector.default") for n in trainable) == 6


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_training_forward_and_gradients_equal_peft(tiny_model, tmp_path, dropout):
    ours = dora_model(tiny_model, dropout=dropout).train()
    theirs = peft_twin(tiny_model, ours, tmp_path, dropout).train()
    losses, grads = [], []
    for model in (ours, theirs):
        torch.manual_seed(0)  # the same dropout masks, drawn in the same order
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n.replace("base_model.model.", "").replace(".weight", ""): p.grad
                      for n, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=0)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 18
    for name, grad in grads[0].items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grad, grads[1][name], atol=1e-6, rtol=1e-4)


def test_merge_unmerge_and_export_equal_peft(tiny_model, tmp_path):
    ours = dora_model(tiny_model)
    adapted = logits(ours)
    before = {n: p.clone() for n, p in ours.named_parameters() if "base_layer" in n}
    merge_lora(ours)
    torch.testing.assert_close(logits(ours), adapted, atol=1e-5, rtol=0)
    unmerge_lora(ours)
    for name, p in ours.named_parameters():
        if name in before:
            torch.testing.assert_close(p, before[name], atol=1e-6, rtol=0)
    theirs = peft_twin(tiny_model, ours, tmp_path).eval().merge_and_unload()
    merge_and_unload(ours)
    assert not lora_layers(ours)
    for (name, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)


def test_dora_merges_only_alone(tiny_model):
    model = dora_model(tiny_model)
    apply_lora(model, r=2, alpha=4, target_modules=TARGETS, adapter_name="plain")
    merge_lora(model, "default")
    with pytest.raises(ModelError, match="a DoRA adapter merges exactly only alone; unmerge it first"):
        merge_lora(model, "plain")
    unmerge_lora(model, "default")
    merge_lora(model, "plain")
    with pytest.raises(ModelError, match="cannot merge DoRA adapter 'default' while \\['plain'\\] is merged"):
        merge_lora(model, "default")
    remove_lora(model, "plain")
    merge_lora(model, "default")
    remove_lora(model, "default")  # unmerges first
    assert not lora_layers(model)
    torch.testing.assert_close(logits(model), logits(tiny_model), atol=1e-5, rtol=0)


def test_adapter_weight_scales_dora_change(tiny_model):
    model = dora_model(tiny_model)
    full, base = logits(model), logits(tiny_model)
    set_active_adapters(model, ["default"], [0.0])
    torch.testing.assert_close(logits(model), base, atol=1e-6, rtol=0)
    set_active_adapters(model, ["default"], [1.0])
    torch.testing.assert_close(logits(model), full, atol=0, rtol=0)


def test_rows_mix_dora_lora_and_base(tiny_model, tmp_path):
    """The serving path: one adapter per batch row, DoRA beside plain LoRA and the base."""
    model = dora_model(tiny_model)
    torch.manual_seed(5)
    apply_lora(model, r=2, alpha=4, target_modules=["q_proj", "k_proj"], adapter_name="plain")
    expected = {}
    for name in ("default", "plain"):
        set_active_adapters(model, [name])
        expected[name] = logits(model)
    expected[None] = logits(tiny_model)
    order = ["plain", "default", None]
    ids = torch.cat([IDS[:1], IDS[1:], IDS[:1]])
    with row_adapters(model, order):
        mixed = logits(model, ids)
    for row, name in enumerate(order):
        src = 1 if row == 1 else 0
        torch.testing.assert_close(mixed[row], expected[name][src], atol=1e-5, rtol=0)


def test_4bit_base_equals_its_dequantized_float_twin(tiny_model, tmp_path):
    """QLoRA + DoRA: the norm is taken over the dequantized weight, so a float model holding exactly those
    weights gives the same outputs."""
    q = copy.deepcopy(tiny_model)
    quantize_model(q, compute_dtype=torch.float32)
    twin = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for name, module in q.named_modules():
            if isinstance(module, Linear4bit):
                twin.get_submodule(name).weight.copy_(module.dequantize(torch.float32))
    adapter = save_adapter(dora_model(twin), tmp_path / "a")
    load_adapter(q, adapter)
    load_adapter(twin, adapter)
    torch.testing.assert_close(logits(q), logits(twin), atol=1e-4, rtol=0)
    with pytest.raises(ModelError, match="4-bit base layer"):
        merge_lora(q)


def test_saved_magnitude_round_trips_and_combine_refuses(tiny_model, tmp_path):
    ours = dora_model(tiny_model)
    out = save_adapter(ours, tmp_path / "a")
    again = copy.deepcopy(tiny_model)
    load_adapter(again, out, trainable=True)
    torch.testing.assert_close(logits(again), logits(ours), atol=0, rtol=0)
    layer = again.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.lora_magnitude_vector["default"].requires_grad
    with pytest.raises(ModelError, match="use_dora=true: a DoRA adapter .* cannot be combined"):
        combine_adapters([out, out], None, tmp_path / "sum")


def test_gpt2_conv1d_dora_equals_peft_both_ways(tmp_path):
    """Conv1D stores its weight [in, out] (peft's fan_in_fan_out): DoRA's row norms are over the transposed weight."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=400, n_embd=64, n_layer=2, n_head=4, n_positions=32,
                                      bos_token_id=0, eos_token_id=0)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        made = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            task_type="CAUSAL_LM", r=4, lora_alpha=8, use_dora=True, target_modules=["c_attn", "c_fc"],
            fan_in_fan_out=True))
        randomize(made)
        made.save_pretrained(str(tmp_path / "peft"))
    ours = copy.deepcopy(base)
    load_adapter(ours, tmp_path / "peft")
    torch.testing.assert_close(logits(ours), logits(made.eval()), atol=1e-5, rtol=0)
    expected = logits(ours)
    merge_lora(ours)
    torch.testing.assert_close(logits(ours), expected, atol=1e-5, rtol=0)
    mine = copy.deepcopy(base)
    apply_lora(mine, r=4, alpha=8, target_modules=["c_proj"], use_dora=True)
    randomize(mine)
    torch.testing.assert_close(logits(peft_twin(base, mine.eval(), tmp_path).eval()), logits(mine), atol=1e-5, rtol=0)


def test_method_config_trains_dora_and_peft_reads_the_result(tiny_model, tmp_path):
    from tuneforge.config import MethodConfig
    from tuneforge.methods.setup import prepare_model

    model = copy.deepcopy(tiny_model)
    prepare_model(model, MethodConfig(name="lora", lora={"r": 4, "alpha": 8, "dropout": 0.0, "use_dora": True,
                                                         "target_modules": ["q_proj", "v_proj"]}))
    magnitude = model.get_submodule("model.layers.0.self_attn.q_proj").lora_magnitude_vector["default"]
    before = magnitude.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.equal(magnitude.detach(), before)
    torch.testing.assert_close(logits(peft_twin(tiny_model, model.eval(), tmp_path).eval()), logits(model),
                               atol=1e-5, rtol=0)


def test_two_active_adapters_dora_and_lora_equal_peft(tiny_model, tmp_path):
    """Several active adapters run in turn, each DoRA one rescaling the output so far (peft's order)."""
    first = save_adapter(dora_model(tiny_model, seed=3), tmp_path / "d")
    plain = copy.deepcopy(tiny_model)
    apply_lora(plain, r=2, alpha=4, target_modules=["q_proj", "o_proj"])
    randomize(plain, seed=4)
    second = save_adapter(plain, tmp_path / "p")
    ours = copy.deepcopy(tiny_model)
    load_adapter(ours, first, "d")
    load_adapter(ours, second, "p")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_model), str(first), adapter_name="d")
        theirs.load_adapter(str(second), adapter_name="p")
    for order in (["d", "p"], ["p", "d"]):
        set_active_adapters(ours, order)
        theirs.base_model.set_adapter(order)
        torch.testing.assert_close(logits(ours), logits(theirs.eval()), atol=1e-5, rtol=0)
