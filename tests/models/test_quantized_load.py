"""load_model_4bit: quantize-on-load equals quantize-after-load, and never holds the model in fp32."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from tuneforge.errors import ModelError
from tuneforge.models.load import load_model
from tuneforge.models.quantized_load import load_model_4bit
from tuneforge.quant.experts4bit import Experts4bit
from tuneforge.quant.linear4bit import Linear4bit, model_nbytes, quantize_model


def save_llama(path: Path, hidden: int = 128, layers: int = 3, vocab: int = 500, tied: bool = True,
               max_shard_size: str | None = None) -> nn.Module:
    """A seeded random Llama saved as an HF directory (safetensors); returns the model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return model


def logits(model: nn.Module, vocab: int = 500) -> torch.Tensor:
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits


def peak_bytes(fn):
    """(result, peak bytes allocated while ``fn`` ran): torch's allocator plus Python's.

    Tensors come from torch's CPU allocator (seen by the profiler's memory events); safetensors'
    pread reads land in Python buffers (seen by tracemalloc). The sum of the two peaks bounds the
    true peak from above.
    """
    from torch.profiler import ProfilerActivity, profile

    tracemalloc.start()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn()
        python_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = torch_peak = 0
    for e in events:
        current += e.nbytes()
        torch_peak = max(torch_peak, current)
    return result, torch_peak + python_peak


@pytest.mark.parametrize(("quant_type", "double_quant"), [("nf4", True), ("fp4", False), ("int4", False)])
def test_equals_quantize_after_load(tmp_path, quant_type, double_quant):
    save_llama(tmp_path)
    model = load_model_4bit(str(tmp_path), quant_type=quant_type, double_quant=double_quant,
                            compute_dtype=torch.float32)
    reference = load_model(str(tmp_path))
    quantize_model(reference, quant_type=quant_type, double_quant=double_quant, compute_dtype=torch.float32)
    assert torch.equal(logits(model), logits(reference))
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 3 * 7
    assert not model.training


def test_sharded_untied_checkpoint(tmp_path):
    save_llama(tmp_path, tied=False, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model = load_model_4bit(str(tmp_path), compute_dtype=torch.float32)
    reference = load_model(str(tmp_path))
    quantize_model(reference, compute_dtype=torch.float32)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(logits(model), logits(reference))


def test_default_computes_in_bf16(tmp_path):
    save_llama(tmp_path)
    model = load_model_4bit(str(tmp_path))
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.bfloat16
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, Linear4bit) and layer.compute_dtype == torch.bfloat16
    out = logits(model)
    assert out.dtype == torch.bfloat16
    # Same 4-bit weights as the fp32-compute load: only bf16 rounding differs.
    assert torch.equal(layer.weight, load_model_4bit(str(tmp_path), compute_dtype=torch.float32)
                       .model.layers[0].self_attn.q_proj.weight)
    fp32 = logits(load_model_4bit(str(tmp_path), compute_dtype=torch.float32))
    assert torch.nn.functional.cosine_similarity(out.float().flatten(), fp32.flatten(), dim=0) > 0.99


def test_peak_memory_stays_near_the_4bit_size(tmp_path):
    original = save_llama(tmp_path, hidden=256, layers=6, vocab=1000)
    full = model_nbytes(original)
    largest = max(p.numel() * 4 for p in original.parameters())  # in fp32, as stored
    del original
    model, peak = peak_bytes(lambda: load_model_4bit(str(tmp_path), compute_dtype=torch.float32))
    # The result, one tensor as read, and the quantization temporaries of one tensor (~2x).
    bound = model_nbytes(model) + 3 * largest + 256 * 1024
    assert bound < full / 2  # otherwise the test could not tell streaming from loading it all
    assert peak >= largest  # the reads are seen by the measurement
    assert peak <= bound, f"peak {peak / 2**20:.2f} MiB > bound {bound / 2**20:.2f} MiB (full {full / 2**20:.2f})"


def test_missing_tensor_is_reported(tmp_path):
    original = save_llama(tmp_path)
    state = {k: v for k, v in original.state_dict().items() if k not in ("model.norm.weight", "lm_head.weight")}
    (tmp_path / "model.safetensors").unlink()
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"model\.norm\.weight"):
        load_model_4bit(str(tmp_path))


def test_directory_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 100,
                                                      "hidden_size": 64, "num_hidden_layers": 1,
                                                      "num_attention_heads": 4, "intermediate_size": 128}))
    with pytest.raises(ModelError, match="safetensors"):
        load_model_4bit(str(tmp_path))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_quantizes_on_the_device(tmp_path):
    save_llama(tmp_path)
    model = load_model_4bit(str(tmp_path), compute_dtype=torch.float32, device="cuda")
    layer = model.model.layers[0].mlp.up_proj
    assert layer.weight.is_cuda and model.model.embed_tokens.weight.is_cuda
    assert model.model.rotary_emb.inv_freq.is_cuda
    cpu = load_model_4bit(str(tmp_path), compute_dtype=torch.float32)
    assert torch.equal(layer.weight.cpu(), cpu.model.layers[0].mlp.up_proj.weight)
    ids = torch.randint(0, 500, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(ids.cuda()).logits.cpu(), cpu(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("family", "renamed"), [
    ("gpt2", None),  # Conv1D weights are [in, out]: quantized transposed
    ("gpt_neox", "embed_out.weight"),  # transformers 5 loads it as lm_head.weight
    ("mixtral", "model.layers.0.block_sparse_moe.experts.0.w1.weight"),  # fused into mlp.experts.gate_up_proj
    ("qwen2_moe", "model.layers.0.mlp.experts.0.gate_proj.weight"),
    ("gpt_oss", None),  # experts stored as 3D already
    ("falcon", None),  # FalconLinear, an nn.Linear subclass
])
def test_checkpoint_keys_are_mapped_as_transformers_maps_them(tmp_path, family, renamed):
    from safetensors import safe_open

    from tiny_families import tiny

    tiny(family).save_pretrained(tmp_path)  # transformers 5 writes the original (hub) key names
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert renamed is None or renamed in f.keys()
    model = load_model_4bit(str(tmp_path), compute_dtype=torch.float32)
    reference = load_model(str(tmp_path))
    quantize_model(reference, compute_dtype=torch.float32)
    assert torch.equal(logits(model, vocab=64), logits(reference.eval(), vocab=64))
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert any(isinstance(m, Linear4bit) for m in model.modules())
    moe = family in ("mixtral", "qwen2_moe", "gpt_oss")
    assert moe == any(isinstance(m, Experts4bit) for m in model.modules())  # expert stacks stored 4-bit too
    assert not any(p.dim() == 3 for p in model.parameters())
