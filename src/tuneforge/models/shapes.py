"""The sizes of a Llama-style decoder (GQA attention, SwiGLU MLP, RMSNorm) and the parameter counts
they decide, computed from the shape alone: for the memory planner, the benchmarks and the lab report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import AutoConfig

from tuneforge.errors import ConfigError, ModelError
from tuneforge.models.resolve import resolve_model

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Built-in shapes (Hugging Face LlamaConfig keys) for planning and benchmarks without a checkpoint.
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
                     "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
                     "tie_word_embeddings": True, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5},
    "llama-3-8b": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                   "tie_word_embeddings": False, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5},
    "llama-3-70b": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672,
                    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128,
                    "tie_word_embeddings": False, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5},
}


@dataclass(frozen=True)
class ModelShape:
    """The sizes that decide a Llama-style decoder's parameters and memory."""

    name: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each decoder Linear."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def layer_linear_params(self) -> int:
        return sum(a * b for a, b in self.projections().values())

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def norm_params(self) -> int:
        return (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_linear_params + self.embed_params + self.head_params + self.norm_params

    def lora_params(self, r: int, targets: Sequence[str] = PROJECTIONS) -> int:
        """LoRA of rank ``r`` on the ``targets`` projections of every layer: r × (in + out) per Linear."""
        return self.layers * sum(r * (a + b) for name, (a, b) in self.projections().items() if name in targets)


def shape_config(name: str) -> dict[str, Any]:
    """A copy of built-in shape ``name``'s config dict (``LlamaConfig(**d)`` without ``model_type``)."""
    if name not in SHAPES:
        raise ConfigError(f"unknown model shape {name!r}; built-in shapes: {', '.join(SHAPES)}")
    return dict(SHAPES[name])


def model_shape(model_config: Any) -> ModelShape:
    """A ModelShape from a shape name, a model reference (local dir, builtin), an HF config or a dict."""
    if isinstance(model_config, ModelShape):
        return model_config
    name = "model"
    if isinstance(model_config, str):
        name = model_config
        model_config = SHAPES[model_config] if model_config in SHAPES else _load_hf_config(model_config)
    get_text = getattr(model_config, "get_text_config", None)
    if callable(get_text):
        model_config = get_text()
    get = (model_config.get if isinstance(model_config, Mapping)
           else lambda k, d=None: getattr(model_config, k, d))
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if get(k) is None]
    if missing:
        raise ConfigError(f"model {name!r}: its config has no {', '.join(missing)}; the planner knows "
                          "Llama-style decoders (Llama, Mistral, Qwen2, SmolLM, ...)")
    heads = int(get("num_attention_heads"))
    return ModelShape(
        name=name, vocab=int(get("vocab_size")), hidden=int(get("hidden_size")),
        intermediate=int(get("intermediate_size")), layers=int(get("num_hidden_layers")), heads=heads,
        kv_heads=int(get("num_key_value_heads") or heads),
        head_dim=int(get("head_dim") or get("hidden_size") // heads),
        tied=bool(get("tie_word_embeddings", False)),
    )


def _load_hf_config(ref: str) -> Any:
    try:
        return AutoConfig.from_pretrained(resolve_model(ref))
    except OSError as e:
        raise ModelError(f"could not read the config of model '{ref}': {e}\nPass a local Hugging Face "
                         f"directory, a builtin model, or a shape: {', '.join(SHAPES)}") from e


# Published models whose LoRA share the lab report computes (Llama-2 head_dim = hidden / heads).
SMOLLM2_135M = ModelShape("SmolLM2-135M", 49152, 576, 1536, 30, 9, 3, 64, True)
LLAMA2_7B = ModelShape("Llama-2-7B", 32000, 4096, 11008, 32, 32, 32, 128, False)
LLAMA2_70B = ModelShape("Llama-2-70B", 32000, 8192, 28672, 80, 64, 8, 128, False)


def lora_table(ranks: tuple[int, ...] = (8, 16, 32, 64),
               shapes: tuple[ModelShape, ...] = (SMOLLM2_135M, LLAMA2_7B, LLAMA2_70B)) -> list[dict]:
    """One row per (shape, rank): total parameters, LoRA parameters (all linear) and their share."""
    return [{"model": s.name, "total": s.params, "r": r, "lora": s.lora_params(r),
             "share_pct": 100 * s.lora_params(r) / s.params} for s in shapes for r in ranks]
