"""Every causal LM family of issue 18, proven on a tiny random model built from transformers' own config class.

Per family (2 layers, hidden 64, the tiny test tokenizer's ~400-token vocabulary, windows of 8 tokens where the
family has sliding-window attention, non-trivial logit scales and soft-caps): full / freeze / lora / qlora train 2
steps through ``train()``; a packed example's loss equals its loss alone; the fused loss (and its gradients) equals
``model(..., labels=...).loss``; peft loads the LoRA adapter with our logits; the merged export reloads in
transformers with those logits; ``generate`` runs. A family tuneforge cannot train right is refused at start with a
TuneforgeError, and the test asserts that refusal (``REFUSED``).

With ``TUNEFORGE_FAMILY_MATRIX=<file.json>`` the outcomes are written there (``benchmarks/family_matrix.py`` runs
this module and renders the table of docs/models.md from it).
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import build_tiny_tokenizer
from tuneforge.config import load_config
from tuneforge.data.conversation import Tokenized
from tuneforge.data.packing import collate, no_pack, pack
from tuneforge.errors import TuneforgeError
from tuneforge.models.generate import generate
from tuneforge.train.attention import packing_refusal
from tuneforge.train.loop import train
from tuneforge.train.step import CausalLMLoss, batch_loss

WINDOW = 8
DIMS = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 128}
MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
# family → (transformers model_type, config keys beyond DIMS; None: leave that key of DIMS out)
FAMILIES: dict[str, tuple[str, dict]] = {
    "Llama": ("llama", {}),
    "Mistral": ("mistral", {"sliding_window": WINDOW}),
    "Mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": WINDOW}),
    "Qwen2": ("qwen2", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}),
    "Qwen2-MoE": ("qwen2_moe", {**MOE, "shared_expert_intermediate_size": 64}),
    "Qwen3": ("qwen3", {}),
    "Qwen3-MoE": ("qwen3_moe", MOE),
    "Gemma": ("gemma", {}),
    "Gemma2": ("gemma2", {"sliding_window": WINDOW, "query_pre_attn_scalar": 16, "final_logit_softcapping": 2.0}),
    "Gemma3": ("gemma3_text", {"sliding_window": WINDOW, "query_pre_attn_scalar": 16, "final_logit_softcapping": 2.0,
                               "layer_types": ["sliding_attention", "full_attention"]}),
    "Phi": ("phi", {}),
    "Phi-3": ("phi3", {}),
    "GPT-2": ("gpt2", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128}),
    "GPT-NeoX": ("gpt_neox", {}),
    "Falcon": ("falcon", {"head_dim": None, "num_kv_heads": 2, "new_decoder_architecture": True}),
    "Falcon-ALiBi": ("falcon", {"head_dim": None, "alibi": True}),
    "Bloom": ("bloom", {"n_layer": 2, "n_head": 4}),
    "MPT": ("mpt", {"d_model": 64, "n_heads": 4, "n_layers": 2, "expansion_ratio": 2, "max_seq_len": 128}),
    "OPT": ("opt", {"ffn_dim": 128, "word_embed_proj_dim": 64}),
    "OLMo2": ("olmo2", {}),
    "OLMoE": ("olmoe", {"num_experts": 4, "num_experts_per_tok": 2}),
    "StableLM": ("stablelm", {}),
    "Starcoder2": ("starcoder2", {"sliding_window": WINDOW}),
    "Granite": ("granite", {"logits_scaling": 4.0}),
    "Cohere": ("cohere", {"logit_scale": 0.5}),
    "Cohere2": ("cohere2", {"sliding_window": WINDOW, "logit_scale": 0.5,
                            "layer_types": ["sliding_attention", "full_attention"]}),
    "GPT-OSS": ("gpt_oss", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": WINDOW,
                            "layer_types": ["sliding_attention", "full_attention"]}),
}
# families tuneforge cannot train right → (model_type, config keys, a piece of the error that refuses them at start)
REFUSED: dict[str, tuple[str, dict, str]] = {
    "RecurrentGemma": ("recurrent_gemma", {"lru_width": 64, "attention_window_size": WINDOW},
                       r"transforms its output logits \(logits = nn.functional.tanh"),
}
METHODS = ("full", "freeze", "lora", "qlora")
RESULTS: dict[str, dict[str, str]] = {}
TOL = dict(atol=1e-5, rtol=1e-5)


def record(family: str, capability: str, outcome: str) -> None:
    RESULTS.setdefault(family, {})[capability] = outcome


@pytest.fixture(scope="module", autouse=True)
def write_results():
    yield
    out = os.environ.get("TUNEFORGE_FAMILY_MATRIX")
    if out:
        families = {name: spec[0] for name, spec in {**FAMILIES, **REFUSED}.items()}
        Path(out).write_text(json.dumps({"families": families, "results": RESULTS}, indent=1, ensure_ascii=False))


def tiny_config(family: str, tokenizer):
    model_type, extra = FAMILIES[family] if family in FAMILIES else REFUSED[family][:2]
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    keys = {k: v for k, v in {**DIMS, **extra}.items() if v is not None}
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **keys, **ids)
    for key, value in keys.items():  # a key the config class renamed or ignored would test nothing
        assert key in DIMS or getattr(config, key) == value, (family, key)
    return config


@pytest.fixture(scope="module", autouse=True)
def no_plots():
    """The loss plot is half of a 2-step run's time and none of what is tested here."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("tuneforge.train.loop.plot_loss", lambda *args, **kwargs: None)
        yield


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def built(tmp_path_factory, tokenizer):
    """family → the folder of its tiny random model (seeded) and tokenizer, built once per module."""
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(tiny_config(family, tokenizer))
            out = tmp_path_factory.mktemp(family.lower())
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            cache[family] = out
        return cache[family]

    return get


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    words = ["apple", "pear", "dog", "cat", "sun", "moon", "tree", "car"]
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"Upper-case the word: {w}", "input": "",
                                        "output": w.upper()}) + "\n" for w in words))
    return path


def load(folder: Path) -> torch.nn.Module:
    from tuneforge.models.load import load_model

    return load_model(str(folder)).eval()


def examples(vocab: int) -> list[Tokenized]:
    gen = torch.Generator().manual_seed(1)
    lengths = (13, 7, 11)  # longer than the window: a packed example must see only the window, as alone
    return [Tokenized(ids, ids, f"ex{i}") for i, n in enumerate(lengths)
            for ids in [torch.randint(3, vocab, (n,), generator=gen).tolist()]]


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_loss_equals_unpacked(family, built):
    model = load(built(family))
    exs = examples(model.config.vocab_size)
    packed = collate(pack(exs, 64), 0)
    assert int(packed["seq_ids"].max()) == 2  # one row, three examples
    loss_model = CausalLMLoss(model)
    for i, ex in enumerate(exs):
        only_i = dict(packed, labels=packed["labels"].masked_fill(packed["seq_ids"] != i, -100))
        alone = collate(no_pack([ex]), 0)
        with torch.no_grad():
            (a, n_a), (b, n_b) = batch_loss(loss_model, only_i), batch_loss(loss_model, alone)
        assert n_a == n_b
        torch.testing.assert_close(a, b, **TOL)
    record(family, "packing", "exact" if packing_refusal(model) is None else "✓ unpacked")  # one example per row


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_loss_equals_the_models_loss(family, built):
    model = load(built(family))
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(12).repeat(2, 1),
             "seq_ids": torch.zeros_like(ids)}
    reference = copy.deepcopy(model)
    expected = reference(input_ids=ids, labels=labels).loss
    expected.backward()
    loss, n = batch_loss(CausalLMLoss(model), batch)
    (loss / n).backward()
    torch.testing.assert_close(loss / n, expected.detach(), **TOL)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=f"{family}: {name}")
    record(family, "fused loss", "= model loss")


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_runs(family, built, tokenizer):
    model = load(built(family))
    out = generate(model, tokenizer, ["Upper-case the word: dog", "Hello"], max_new_tokens=4)
    assert len(out) == 2 and all(isinstance(x, str) for x in out)
    record(family, "generate", "runs")


def run_config(model_dir: Path, data_file: Path, out: Path, method: str):
    return load_config(overrides=[f"model={model_dir}", f"data.train=[{data_file}]", f"output_dir={out}",
                                  "data.max_seq_len=64", "data.val_fraction=0", "train.batch_size=4",
                                  "train.max_steps=2", "train.lr=1e-2", "train.threads=1",
                                  f"method.name={method}", "method.freeze.top_k_layers=1"])


@pytest.mark.parametrize("family", REFUSED)
def test_a_family_that_cannot_train_right_is_refused_at_start(family, built, data_file, tmp_path):
    for method in METHODS:
        with pytest.raises(TuneforgeError, match=REFUSED[family][2]) as refusal:
            train(run_config(built(family), data_file, tmp_path / method, method), quiet=True)
        assert not (tmp_path / method / "metrics.jsonl").exists()
    record(family, "refused", str(refusal.value))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_trains_two_steps(family, method, built, data_file, tmp_path):
    out = tmp_path / "run"
    config = run_config(built(family), data_file, out, method)
    result = train(config, quiet=True)
    assert result.steps == 2 and torch.isfinite(torch.tensor(result.final_loss))
    if method in ("lora", "qlora"):
        assert (out / "adapter" / "adapter_model.safetensors").is_file()
    else:
        reloaded = AutoModelForCausalLM.from_pretrained(out / "model")
        base = AutoModelForCausalLM.from_pretrained(built(family))
        changed = [n for (n, p), q in zip(reloaded.named_parameters(), base.parameters(), strict=True)
                   if not torch.equal(p, q)]
        assert changed, "the saved model equals the base"
    record(family, method, "trains")


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_adapter_loads_in_peft_and_merges(family, built, tmp_path):
    """A randomized adapter made by tuneforge: peft gives our logits, and the merged export reloads in transformers
    with them."""
    peft = pytest.importorskip("peft")
    from tuneforge.adapters.export import export_merged
    from tuneforge.methods.lora import apply_lora
    from tuneforge.methods.peft_format import save_adapter

    base_dir = built(family)
    model = load(base_dir)
    apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    ours = _logits(model)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = _logits(peft.PeftModel.from_pretrained(load(base_dir), str(tmp_path / "adapter")).eval())
    torch.testing.assert_close(theirs, ours, **TOL)
    record(family, "peft", "same logits")
    export_merged(str(base_dir), tmp_path / "adapter", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_logits(merged), ours, atol=1e-4, rtol=1e-4)
    record(family, "merge/export", "same logits")
