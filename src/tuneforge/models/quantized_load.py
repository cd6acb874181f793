"""Load a causal LM straight into 4-bit: quantize each Linear (and Conv1D) weight as it is read.

The model is built on the meta device (no memory), then the safetensors shards are read one tensor
at a time: a Linear weight goes to ``device``, is quantized there and only its 4-bit form is kept;
every other tensor is materialized in ``compute_dtype``. At no point does the host or the device
hold the whole model in 16/32-bit: the peak is the 4-bit model plus one tensor and its
quantization temporaries.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

from tuneforge.errors import ModelError
from tuneforge.models.load import empty_model
from tuneforge.models.resolve import resolve_model
from tuneforge.quant.experts4bit import Experts4bit, expert_stacks
from tuneforge.quant.linear4bit import (
    Linear4bit,
    expert_targets,
    is_conv1d,
    quantization_targets,
    set_submodule,
)
from tuneforge.quant.nf4 import Quantized4bit, quantize_4bit


def load_model_4bit(
    ref: str,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    skip: tuple[str, ...] = ("lm_head",),
    blocksize: int = 64,
    trust_remote_code: bool = False,
    attn_implementation: str = "auto",
) -> nn.Module:
    """A causal LM whose Linear and Conv1D layers (all but ``skip``) are ``Linear4bit`` and whose MoE experts
    modules are ``Experts4bit``, in eval mode.

    Embeddings, norms and the output head are kept in ``compute_dtype`` (see ``tuneforge.quant.linear4bit``
    for why). Checkpoint keys are mapped as transformers maps them
    (its renames, legacy names and expert fusions), so the result equals ``quantize_model(load_model(ref))``
    for the same settings.
    """
    model = empty_model(ref, dtype=compute_dtype, trust_remote_code=trust_remote_code,
                        attn_implementation=attn_implementation)
    path = resolve_model(ref)
    tied = _tied_groups(model)
    targets = {f"{name}.weight" for name in quantization_targets(model, skip)}
    stacks = {f"{name}.{p}" for name in expert_targets(model) for p in expert_stacks(model.get_submodule(name))}
    loaded: set[str] = set()

    def place(name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.to(device)
        if name in targets:
            _put_quantized(model, name, tensor, quant_type, double_quant, blocksize, compute_dtype)
        elif name in stacks:
            _put_stack(model, name, quantize_4bit(tensor, blocksize, quant_type, double_quant), compute_dtype)
        else:
            _set_tensor(model, name, tensor.to(compute_dtype) if tensor.is_floating_point() else tensor)
        loaded.add(name)

    with _checkpoint(path) as tensors:
        unexpected = _load_mapped(model, tensors, place)
    _retie(model, tied, loaded)
    _init_non_persistent_buffers(model, device)
    _check_complete(model, ref, unexpected)
    return model.eval()


def _put_quantized(model: nn.Module, name: str, weight: torch.Tensor, quant_type: str, double_quant: bool,
                   blocksize: int, compute_dtype: torch.dtype) -> None:
    """Quantize ``weight`` (a Conv1D's is ``[in, out]``: transposed first) into a Linear4bit at ``name``."""
    module_name = name.rsplit(".", 1)[0]
    old = model.get_submodule(module_name)
    conv = is_conv1d(old)
    q = quantize_4bit(weight.t().contiguous() if conv else weight, blocksize, quant_type, double_quant)
    del weight  # only the 4-bit form stays
    bias = old.bias if old.bias is not None and old.bias.device.type != "meta" else None
    new = Linear4bit.from_quantized(q, bias, compute_dtype)
    new.fan_in_fan_out = conv
    if old.bias is not None and bias is None:
        new.bias = old.bias  # still meta: its key comes later in the file
    set_submodule(model, module_name, new)


def _put_stack(model: nn.Module, name: str, q: Quantized4bit, compute_dtype: torch.dtype) -> None:
    """Store MoE expert stack ``name`` 4-bit, wrapping its experts module in an Experts4bit the first time."""
    module_name, _, stack = name.rpartition(".")
    module = model.get_submodule(module_name)
    if not isinstance(module, Experts4bit):
        module = Experts4bit(module, compute_dtype)
        set_submodule(model, module_name, module)
    module.set_stack(stack, q)


def _load_mapped(model: nn.Module, tensors: dict[str, Callable[[], torch.Tensor]],
                 place: Callable[[str, torch.Tensor], None]) -> list[str]:
    """Give ``place`` each model tensor, named and converted as transformers' ``from_pretrained`` does it
    (``conversion_mapping``: renames, legacy names, per-expert tensors fused into 3D stacks); returns the
    checkpoint keys the model does not use.

    A plain tensor is read and placed at once; the tensors a converter fuses are read when it runs, one target
    at a time, so the peak stays one fused tensor and its pieces.
    """
    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    expected = model.state_dict()  # a meta skeleton: names and shapes only
    prefix = getattr(model, "base_model_prefix", None)
    pending: dict[str, WeightConverter] = {}
    unexpected: list[str] = []
    for key in sorted(tensors, key=dot_natural_key):  # transformers' order: experts stack in index order
        name, pattern = rename_source_key(key, renamings, converters, prefix, expected)
        if name not in expected and key in expected:  # renamed although the model uses the key as it is
            name, pattern = rename_source_key(key, [], [], prefix, expected)
        if name not in expected:
            unexpected.append(key)
        elif pattern is None:
            place(name, tensors[key]())
        else:
            converter = pending.setdefault(name, copy.deepcopy(by_pattern[pattern]))
            converter.add_tensor(name, key, pattern, tensors[key])
    for name, converter in pending.items():
        for target, tensor in converter.convert(name, model=model, config=model.config).items():
            place(target, tensor[0] if isinstance(tensor, list) else tensor)
    return unexpected


def _tied_groups(model: nn.Module) -> list[set[str]]:
    """Names of parameters that are one shared tensor (e.g. ``lm_head.weight`` and the embeddings)."""
    by_id: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), set()).add(name)
    return [names for names in by_id.values() if len(names) > 1]


@contextmanager
def _checkpoint(path: str) -> Iterator[dict[str, Callable[[], torch.Tensor]]]:
    """key → read for every tensor of the model's safetensors shards; ``read()`` loads one tensor."""
    root = Path(path)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (root / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise ModelError(f"'{path}' has no model.safetensors or model.safetensors.index.json; 4-bit loading "
                         "reads safetensors only (convert .bin checkpoints with save_pretrained)")
    with ExitStack() as stack:
        tensors = {}
        for shard in shards:
            f = stack.enter_context(_open(root / shard))
            tensors.update({key: (lambda f=f, key=key: f.get_tensor(key)) for key in f.keys()})
        yield tensors


def _open(file: Path):
    # pread reads each tensor into its own buffer: nothing else of the file is mapped into memory.
    try:
        return safe_open(str(file), framework="pt", backend="pread")
    except TypeError:  # safetensors without the backend option
        return safe_open(str(file), framework="pt")


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if isinstance(module, Experts4bit):  # the experts' other tensors (GPT-OSS biases) stay on the module itself
        module = module.base_layer
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
