"""Load a causal LM straight into 4-bit: quantize each Linear weight as it is read.

The model is built on the meta device (no memory), then the safetensors shards are read one tensor
at a time: a Linear weight goes to ``device``, is quantized there and only its 4-bit form is kept;
every other tensor is materialized in ``compute_dtype``. At no point does the host or the device
hold the whole model in 16/32-bit: the peak is the 4-bit model plus one tensor and its
quantization temporaries.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from tuneforge.errors import ModelError
from tuneforge.models.load import empty_model
from tuneforge.models.resolve import resolve_model
from tuneforge.quant.linear4bit import Linear4bit, quantization_targets, set_submodule
from tuneforge.quant.nf4 import quantize_4bit


def load_model_4bit(
    ref: str,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    skip: tuple[str, ...] = ("lm_head",),
    blocksize: int = 64,
    trust_remote_code: bool = False,
) -> nn.Module:
    """A causal LM whose Linear layers (all but ``skip``) are ``Linear4bit``, in eval mode.

    Embeddings, norms and the output head are kept in ``compute_dtype`` (see
    ``tuneforge.quant.linear4bit`` for why). The result equals
    ``quantize_model(load_model(ref))`` for the same settings.
    """
    model = empty_model(ref, dtype=compute_dtype, trust_remote_code=trust_remote_code)
    path = resolve_model(ref)
    tied = _tied_groups(model)
    targets = {f"{name}.weight" for name in quantization_targets(model, skip)}
    expected = set(model.state_dict())
    loaded: set[str] = set()
    unexpected: list[str] = []
    for key, read in _checkpoint_tensors(path):
        name = _model_key(key, expected, model)
        if name is None:
            unexpected.append(key)
            continue
        tensor = read().to(device)
        if name in targets:
            module_name = name.rsplit(".", 1)[0]
            old = model.get_submodule(module_name)
            q = quantize_4bit(tensor, blocksize, quant_type, double_quant)
            del tensor  # only the 4-bit form stays
            bias = old.bias if old.bias is not None and old.bias.device.type != "meta" else None
            new = Linear4bit.from_quantized(q, bias, compute_dtype)
            if old.bias is not None and bias is None:
                new.bias = old.bias  # still meta: its key comes later in the file
            set_submodule(model, module_name, new)
        else:
            _set_tensor(model, name, tensor.to(compute_dtype) if tensor.is_floating_point() else tensor)
        loaded.add(name)
    _retie(model, tied, loaded)
    _init_non_persistent_buffers(model, device)
    _check_complete(model, ref, unexpected)
    return model.eval()


def _tied_groups(model: nn.Module) -> list[set[str]]:
    """Names of parameters that are one shared tensor (e.g. ``lm_head.weight`` and the embeddings)."""
    by_id: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), set()).add(name)
    return [names for names in by_id.values() if len(names) > 1]


def _checkpoint_tensors(path: str) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """(key, read) for every tensor of the model's safetensors shards; ``read()`` loads one tensor."""
    root = Path(path)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (root / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise ModelError(f"'{path}' has no model.safetensors or model.safetensors.index.json; 4-bit loading "
                         "reads safetensors only (convert .bin checkpoints with save_pretrained)")
    for shard in shards:
        with _open(root / shard) as f:
            for key in f.keys():
                yield key, (lambda f=f, key=key: f.get_tensor(key))


def _open(file: Path):
    # pread reads each tensor into its own buffer: nothing else of the file is mapped into memory.
    try:
        return safe_open(str(file), framework="pt", backend="pread")
    except TypeError:  # safetensors without the backend option
        return safe_open(str(file), framework="pt")


def _model_key(key: str, expected: set[str], model: nn.Module) -> str | None:
    """The model's name for checkpoint key ``key`` (checkpoints of the bare base model lack its prefix)."""
    if key in expected:
        return key
    prefixed = f"{getattr(model, 'base_model_prefix', '')}.{key}"
    return prefixed if prefixed in expected else None


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=old.requires_grad)
    else:
        module._buffers[attr] = tensor


def _retie(model: nn.Module, tied: list[set[str]], loaded: set[str]) -> None:
    """Point every member of a tied group at the one tensor the checkpoint held."""
    for group in tied:
        source = next((n for n in sorted(group) if n in loaded), None)
        if source is None:
            continue
        param = model.get_parameter(source)
        for name in group - {source}:
            module_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module_name), attr, param)


def _init_non_persistent_buffers(model: nn.Module, device: str | torch.device) -> None:
    """Compute buffers that are not in checkpoints (rotary inverse frequencies) on ``device``."""
    for module in model.modules():
        meta = [n for n, b in module._buffers.items() if b is not None and b.device.type == "meta"]
        if not meta:
            continue
        if any(p.device.type == "meta" for p in module.parameters(recurse=False)):
            continue  # left for _check_complete to report
        for n in meta:
            module._buffers[n] = torch.empty_like(module._buffers[n], device=device)
        # transformers' own initializer knows how each such buffer is computed.
        model._init_weights(module)


def _check_complete(model: nn.Module, ref: str, unexpected: list[str]) -> None:
    missing = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.device.type == "meta"]
    if missing:
        raise ModelError(f"model '{ref}': the checkpoint has no tensor for {missing[:5]}"
                         f"{' and more' if len(missing) > 5 else ''}; is it complete and for this config?")
    if unexpected:
        warnings.warn(f"model '{ref}': {len(unexpected)} checkpoint tensors not used by the model, "
                      f"e.g. {unexpected[:3]}", stacklevel=3)
