"""Load a causal LM and its tokenizer from a resolved model reference.

Weights are read from safetensors. A model folder whose weights exist only as pickle files
(``pytorch_model.bin``, ``*.pt``) is refused unless the user opts in with ``TUNEFORGE_ALLOW_PICKLE=1``
(the CLI's ``--allow-pickle``); even then they are read with ``torch.load(weights_only=True)``, which refuses
any pickled object that is not a tensor, so no code from the file runs. A model that needs code from its
repository loads only with ``trust_remote_code``.

Attention is SDPA where transformers has it for the architecture, else eager (``auto``); ``sdpa``, ``eager`` and
``flex_attention`` ask for one, and a choice transformers refuses for the architecture is a ModelError saying
what to set instead.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tuneforge.errors import ModelError
from tuneforge.log import get_logger
from tuneforge.models.resolve import resolve_model

logger = get_logger(__name__)
ATTENTION = ("auto", "sdpa", "eager", "flex_attention")


def load_tokenizer(ref: str, trust_remote_code: bool = False):
    """Load the tokenizer for a model reference, with a pad token set."""
    path = resolve_model(ref)
    with loading(ref):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def pad_token_id(tokenizer) -> int:
    """The id that fills padding: the tokenizer's pad token, else its eos token, else 0.

    Padding is always masked out, so the value matters only for being a valid id.
    """
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def load_model(ref: str, dtype: torch.dtype = torch.float32, device: str = "cpu", trust_remote_code: bool = False,
               attn_implementation: str = "auto") -> torch.nn.Module:
    """Load a causal LM for a model reference onto ``device``, with ``attn_implementation`` (one of ``ATTENTION``)."""
    path = resolve_model(ref)
    check_weight_files(ref, path)
    with loading(ref), attention_choice(ref, attn_implementation):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     **attention_kwargs(attn_implementation))
    note_eager(model, attn_implementation)
    return model.to(device)


def empty_model(ref: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                attn_implementation: str = "auto") -> torch.nn.Module:
    """The causal LM of a model reference on the meta device: its structure and shapes, no memory, no weights."""
    path = resolve_model(ref)
    with loading(ref):
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with attention_choice(ref, attn_implementation), torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code,
                                                **attention_kwargs(attn_implementation))


def attention_kwargs(attn_implementation: str) -> dict[str, str]:
    """``from_pretrained``'s attention argument: none for ``auto`` (transformers then takes SDPA where the
    architecture has it, else eager)."""
    if attn_implementation not in ATTENTION:
        raise ModelError(f"attn_implementation {attn_implementation!r} is not one of {', '.join(ATTENTION)}")
    return {} if attn_implementation == "auto" else {"attn_implementation": attn_implementation}


@contextmanager
def attention_choice(ref: str, attn_implementation: str) -> Iterator[None]:
    """Turn transformers' refusal of an attention implementation into a ModelError saying what to choose."""
    try:
        yield
    except (ValueError, ImportError) as e:
        if "attn_implementation" not in str(e) and "attention" not in str(e).lower():
            raise
        raise ModelError(f"model '{ref}': transformers has no {attn_implementation} attention for this "
                         f"architecture ({str(e).strip().splitlines()[0][:200]}); set attn_implementation: auto "
                         "(SDPA where supported, else eager) or eager") from None


def note_eager(model: torch.nn.Module, attn_implementation: str) -> None:
    """Say so when ``auto`` fell back to eager attention, and what it costs."""
    if attn_implementation == "auto" and model.config._attn_implementation == "eager":
        logger.info(f"attention: transformers has no SDPA kernel for {model.config.model_type}, so it runs eager "
                    "attention (it builds each layer's full score matrix: slower, and memory grows with the square "
                    "of the row length; keep data.max_seq_len modest)")


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
ALLOW_PICKLE_ENV = "TUNEFORGE_ALLOW_PICKLE"


def check_weight_files(ref: str, path: str) -> None:
    """Refuse a local model folder whose weights are pickle files only, unless the user opted in."""
    folder = Path(path)
    if not folder.is_dir() or os.environ.get(ALLOW_PICKLE_ENV) == "1":
        return
    files = [p.name for p in folder.iterdir() if p.is_file()]
    pickles = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES) and f != "training_args.bin")
    if pickles and not any(f.endswith(".safetensors") for f in files):
        raise ModelError(f"model '{ref}' has its weights only as pickle files ({', '.join(pickles[:3])}); tuneforge "
                         "reads safetensors unless you opt in. Convert them once where you trust the files (load, "
                         "then save_pretrained writes safetensors), or pass --allow-pickle (or set "
                         f"{ALLOW_PICKLE_ENV}=1): they are then read with torch.load(weights_only=True), which refuses "
                         "any pickled Python object that is not a tensor")


@contextmanager
def loading(ref: str) -> Iterator[None]:
    """Turn what transformers raises for a model the user named into a ModelError saying what to do."""
    try:
        yield
    except OSError as e:
        raise ModelError(offline_hint(ref, e)) from e
    except pickle.UnpicklingError as e:
        lines = str(e).strip().splitlines()
        why = next((x.strip() for x in lines if "global" in x.lower()), lines[0] if lines else "")[:200]
        raise ModelError(f"model '{ref}': its pickle weights hold Python objects that are not tensors "
                         f"({why}), so they were refused and nothing in them ran; "
                         "use safetensors weights from a source you trust") from None
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ModelError(f"model '{ref}' needs Python code from its own folder or repository to load "
                             "(auto_map in its config.json). tuneforge runs it only if you set trust_remote_code: "
                             "true (--set trust_remote_code=true); that code runs with your permissions, so read it "
                             "first, or use a model transformers supports natively") from None
        raise ModelError(f"could not load model '{ref}': {str(e).strip().splitlines()[0]}") from e


def offline_hint(ref: str, error: Exception) -> str:
    """A message for a reference transformers could not load, saying why and what to do."""
    return (f"could not load model '{ref}': {error}\n"
            "If this is a hub id, this machine may be offline: download the model elsewhere and "
            "pass its local directory, or use the builtin 'smollm2-135m'.")
