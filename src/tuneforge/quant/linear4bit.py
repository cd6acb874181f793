"""A frozen 4-bit Linear layer and whole-model quantization.

``Linear4bit`` keeps its weight as 4-bit codes plus block scales in *buffers*: optimizers never see
them, ``state_dict`` saves them, and ``model.to(dtype)`` cannot round the fp32 scales. The forward
dequantizes the weight, multiplies, and lets the dense copy go; the backward dequantizes again
rather than keeping one per layer alive, so activations are all that training adds. Both run as custom ops
(``tuneforge::linear_4bit``, with its backward registered), so ``torch.compile`` traces a decoder layer of
4-bit linears as one graph.

FP8 compute (``method.lora.base_precision: fp8`` with ``qlora``; ``Linear4bit.fp8``): the weight stays 4-bit in
memory, and each forward and backward turns it straight into e4m3 codes with a scale per output channel (one
kernel, ``nf4_gpu.fp8_from_4bit``) for ``torch._scaled_mm``, with the input's rows quantized as ``fp8.Linear8``
does; the CPU runs the same arithmetic in fp32 (the tests' reference).

What ``quantize_model`` leaves alone, and why:

- the output head (``lm_head``): logits are the most precision-sensitive matmul, and in tied models
  (SmolLM2) it shares its weight with the embeddings (QLoRA and bitsandbytes keep it too);
- embeddings: a row lookup, not a matmul, so 4 bits would save memory but no compute, and they
  are often tied to the head;
- norms and biases: tiny, and precision-sensitive.

MoE expert stacks (3D parameters in transformers 5, not Linear layers) are quantized too, by ``Experts4bit``
(``tuneforge.quant.experts4bit``).

transformers' ``Conv1D`` (GPT-2 family, weight stored ``[in, out]``) is a Linear too: it is quantized from
its transposed weight, and the ``Linear4bit`` remembers it (``fan_in_fan_out``) so adapters saved on it say so.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.quant.buffers import QuantizedBuffers
from tuneforge.quant.experts4bit import Experts4bit, expert_stacks
from tuneforge.quant.fp8 import input_gradient, quantize_input, scaled_matmul
from tuneforge.quant.nf4 import Quantized4bit, dequantize_4bit, quantize_4bit
from tuneforge.quant.nf4_gpu import dequantize, dequantize_eager, fp8_from_4bit, fp8_from_4bit_eager, from_op_args

# nn.Linear subclasses of transformers whose forward is exactly ``x @ W.T + b`` (so a Linear4bit computes it).
# Other subclasses may read their weight elsewhere (nn.MultiheadAttention's out_proj): they are left alone.
_PLAIN_LINEAR_SUBCLASSES = ("FalconLinear",)


def is_plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear``, or a transformers subclass of it that computes the same (Falcon's ``FalconLinear``)."""
    return type(module) is nn.Linear or (isinstance(module, nn.Linear)
                                         and type(module).__name__ in _PLAIN_LINEAR_SUBCLASSES)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 family): a Linear whose weight is stored ``[in, out]``.

    Matched by name and layout rather than imported: importing transformers costs the CLI seconds.
    """
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def quantize_model(
    model: nn.Module,
    skip: Iterable[str] = ("lm_head",),
    quant_type: str = "nf4",
    double_quant: bool = True,
    blocksize: int = 64,
    compute_dtype: torch.dtype | None = None,
) -> QuantizeResult:
    """Replace every ``nn.Linear`` and ``Conv1D`` but those in ``skip`` by a ``Linear4bit``, and every MoE
    experts module by an ``Experts4bit``, in place.

    ``skip`` entries match a module path exactly or as a suffix (``"lm_head"`` matches
    ``"model.lm_head"``). A Linear whose weight is shared with another module (a tied head) is
    never quantized: that would silently untie it. Returns the paths and the model's bytes
    before and after.
    """
    before = model_nbytes(model)
    names = quantization_targets(model, skip)
    for name in names:
        linear = model.get_submodule(name)
        set_submodule(model, name, Linear4bit.from_linear(
            linear, quant_type=quant_type, double_quant=double_quant, blocksize=blocksize,
            compute_dtype=compute_dtype))
    experts = expert_targets(model)
    for name in experts:
        set_submodule(model, name, Experts4bit.from_module(
            model.get_submodule(name), quant_type=quant_type, double_quant=double_quant, blocksize=blocksize,
            compute_dtype=compute_dtype))
    return QuantizeResult(names + experts, before, model_nbytes(model))


def expert_targets(model: nn.Module) -> list[str]:
    """Paths of the modules holding MoE expert stacks (3D parameters) to quantize; LoRA wrappers never are."""
    return [name for name, m in model.named_modules()
            if expert_stacks(m) and not isinstance(m, Experts4bit)
            and not any(part.startswith("lora_") for part in name.split("."))]


def quantized_numel(model: nn.Module) -> int:
    """Values the model stores 4-bit (Linear4bit weights and Experts4bit stacks), for parameter counts."""
    return sum(m.in_features * m.out_features if isinstance(m, Linear4bit) else m.quantized_numel
               for m in model.modules() if isinstance(m, Linear4bit | Experts4bit))


def quantization_targets(model: nn.Module, skip: Iterable[str] = ("lm_head",)) -> list[str]:
    """Paths of the ``nn.Linear`` and ``Conv1D`` layers to quantize: all but ``skip`` and those with a shared weight.

    ``skip`` entries match a path exactly or as a suffix. LoRA adapters (``...lora_A...``) are never
    targets: they are what trains. Works on a meta-device skeleton too.
    """
    skip = tuple(skip)
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    return [
        name for name, m in model.named_modules()
        if (is_plain_linear(m) or is_conv1d(m)) and uses[id(m.weight)] == 1
        and not any(name == s or name.endswith(f".{s}") for s in skip)
        and not any(part.startswith("lora_") for part in name.split("."))
    ]


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path`` (``"model.layers.0.mlp.up_proj"``) in ``model``."""
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def model_nbytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers (a tied tensor counts once)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


# --- the forward and backward as custom ops: torch.compile keeps a decoder layer in one graph around them -------------

@torch.library.custom_op("tuneforge::linear_4bit", mutates_args=())
def _linear_4bit(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor | None,
                 offset: torch.Tensor | None, bias: torch.Tensor | None, shape: list[int], blocksize: int,
                 quant_type: str) -> torch.Tensor:
    """``F.linear(x, W, bias)`` with W dequantized in x's dtype (one Triton kernel on a GPU) and let go."""
    return F.linear(x, dequantize_eager(from_op_args(packed, absmax, absmax2, offset, shape, blocksize, quant_type),
                                        x.dtype), bias)


@_linear_4bit.register_fake
def _(x, packed, absmax, absmax2, offset, bias, shape, blocksize, quant_type):
    return x.new_empty((*x.shape[:-1], shape[0]))


def _save_weight(ctx, x: torch.Tensor, packed, absmax, absmax2, offset, layout) -> None:
    # the 4-bit buffers only (references, no copies): the backward dequantizes again rather than keep W per layer
    ctx.save_for_backward(packed, absmax, absmax2, offset)
    ctx.layout, ctx.in_dtype = layout, x.dtype


def _setup_linear_4bit(ctx, inputs, output) -> None:
    x, packed, absmax, absmax2, offset, _bias, *layout = inputs
    _save_weight(ctx, x, packed, absmax, absmax2, offset, layout)


def _linear_4bit_backward(ctx, grad: torch.Tensor):
    q = from_op_args(*ctx.saved_tensors, *ctx.layout)
    grad_x = grad @ dequantize(q, grad.dtype) if ctx.needs_input_grad[0] else None
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[5] else None  # an unfrozen bias
    return grad_x, None, None, None, None, grad_bias, None, None, None


torch.library.register_autograd("tuneforge::linear_4bit", _linear_4bit_backward, setup_context=_setup_linear_4bit)


@torch.library.custom_op("tuneforge::linear_4bit_fp8", mutates_args=())
def _linear_4bit_fp8(x: torch.Tensor, x_codes: torch.Tensor, x_scale: torch.Tensor, packed: torch.Tensor,
                     absmax: torch.Tensor, absmax2: torch.Tensor | None, offset: torch.Tensor | None,
                     shape: list[int], blocksize: int, quant_type: str, out_dtype: torch.dtype) -> torch.Tensor:
    """``y = x Wᵀ`` in FP8: ``x`` given as its row-quantized codes (``x`` itself only carries the gradient), W's
    e4m3 codes and per-output-channel scales made from the 4-bit weight by one kernel, then ``_scaled_mm``."""
    codes, scale = fp8_from_4bit_eager(from_op_args(packed, absmax, absmax2, offset, shape, blocksize, quant_type))
    y = scaled_matmul(x_codes, x_scale, codes, scale, out_dtype)
    return y.view(*x.shape[:-1], shape[0])


@_linear_4bit_fp8.register_fake
def _(x, x_codes, x_scale, packed, absmax, absmax2, offset, shape, blocksize, quant_type, out_dtype):
    return x.new_empty((*x.shape[:-1], shape[0]), dtype=out_dtype)


def _setup_linear_4bit_fp8(ctx, inputs, output) -> None:
    x, _codes, _scale, packed, absmax, absmax2, offset, *layout, _out_dtype = inputs
    _save_weight(ctx, x, packed, absmax, absmax2, offset, layout)


def _linear_4bit_fp8_backward(ctx, grad: torch.Tensor):
    if not ctx.needs_input_grad[0]:  # e.g. the first layer's q/k/v under frozen embeddings
        return (None,) * 11
    q = from_op_args(*ctx.saved_tensors, *ctx.layout)
    codes, scale = fp8_from_4bit(q)  # again: nothing of the weight is kept between forward and backward
    dx = input_gradient(grad.reshape(-1, grad.shape[-1]), codes, scale, grad.dtype)
    return (dx.view(*grad.shape[:-1], q.shape[1]).to(ctx.in_dtype),) + (None,) * 10


torch.library.register_autograd("tuneforge::linear_4bit_fp8", _linear_4bit_fp8_backward,
                                setup_context=_setup_linear_4bit_fp8)


@dataclass
class QuantizeResult:
    """What ``quantize_model`` did: the quantized module paths and the model's size before/after."""

    modules: list[str]
    bytes_before: int
    bytes_after: int


class Linear4bit(QuantizedBuffers):
    """A frozen Linear whose weight is stored 4-bit (NF4/FP4/int4, bitsandbytes layout).

    Buffers: ``weight`` (packed uint8 codes, ``[(out·in + 1) // 2, 1]`` as in bitsandbytes),
    ``absmax`` (fp32 per block, or uint8 codes with ``absmax2`` and ``absmax_offset`` when
    double-quantized). ``weight`` being uint8 tells code that reads ``weight.dtype`` that the layer
    is quantized (LoRA then trains its adapters in fp32). ``bias`` stays a frozen float Parameter.

    ``compute_dtype``: the dtype the matmul runs in (inputs are cast to it and the output cast
    back); None means the input's dtype. bf16 on GPUs, fp32 is fine on the CPU.

    ``fp8``: run the matmuls in FP8 from e4m3 codes made on the fly (see the module docstring); set it only when
    ``nf4_gpu.fp8_convertible(self.quantized)`` (``methods.setup.to_fp8_base`` checks the device too).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, quant_type: str = "nf4",
                 blocksize: int = 64, double_quant: bool = True, compute_dtype: torch.dtype | None = None,
                 weight_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.quant_type = quant_type
        self.blocksize = blocksize
        self.compute_dtype = compute_dtype
        self.weight_dtype = weight_dtype  # the dtype the weight had before quantization
        self.fan_in_fan_out = False  # quantized from a Conv1D, whose checkpoint weight is [in, out]
        self.fp8 = False
        n = in_features * out_features
        n_blocks = -(-n // blocksize)
        self.register_buffer("weight", torch.zeros((n + 1) // 2, 1, dtype=torch.uint8, device=device))
        if double_quant:
            self.register_buffer("absmax", torch.zeros(n_blocks, dtype=torch.uint8, device=device))
            self.register_buffer("absmax2", torch.zeros(-(-n_blocks // 256), device=device))
            self.register_buffer("absmax_offset", torch.zeros((), device=device))
        else:
            self.register_buffer("absmax", torch.zeros(n_blocks, device=device))
            self.register_buffer("absmax2", None)
            self.register_buffer("absmax_offset", None)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_quantized(cls, q: Quantized4bit, bias: torch.Tensor | None = None,
                       compute_dtype: torch.dtype | None = None) -> Linear4bit:
        """Wrap an already quantized ``[out, in]`` weight (and an optional bias) without copying."""
        out_features, in_features = q.shape
        layer = cls(in_features, out_features, bias=False, quant_type=q.quant_type, blocksize=q.blocksize,
                    double_quant=q.double_quant, compute_dtype=compute_dtype, weight_dtype=q.dtype,
                    device="meta")
        layer.weight, layer.absmax = q.packed, q.absmax
        if q.double_quant:
            layer.absmax2, layer.absmax_offset = q.absmax2, q.offset
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach(), requires_grad=False)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Module, quant_type: str = "nf4", double_quant: bool = True,
                    blocksize: int = 64, compute_dtype: torch.dtype | None = None) -> Linear4bit:
        """Quantize an ``nn.Linear`` or a ``Conv1D`` (on its device)."""
        conv = is_conv1d(linear)
        weight = linear.weight.detach()
        q = quantize_4bit(weight.t().contiguous() if conv else weight, blocksize, quant_type, double_quant)
        layer = cls.from_quantized(q, linear.bias, compute_dtype)
        layer.fan_in_fan_out = conv
        return layer

    @property
    def quantized(self) -> Quantized4bit:
        """The weight as a ``Quantized4bit`` (sharing this layer's buffers)."""
        return Quantized4bit(self.weight, self.absmax, torch.Size((self.out_features, self.in_features)),
                             self.weight_dtype, self.blocksize, self.quant_type, self.absmax2,
                             self.absmax_offset)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense ``[out, in]`` weight in ``dtype`` (default: the dtype it was quantized from)."""
        return dequantize_4bit(self.quantized, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        weight = (self.weight, self.absmax, self.absmax2, self.absmax_offset)
        layout = ([self.out_features, self.in_features], self.blocksize, self.quant_type)
        if not self.fp8:
            return _linear_4bit(x.to(dtype), *weight, bias, *layout).to(x.dtype)
        codes, scale = quantize_input(x, self.in_features)  # shared by the layers reading the same x
        y = _linear_4bit_fp8(x, codes, scale, *weight, *layout, dtype)
        return (y if bias is None else y + bias).to(x.dtype)

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.absmax2 is not None else ""
        fp8 = ", fp8 compute" if self.fp8 else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {self.quant_type}, blocksize={self.blocksize}{dq}{fp8}")
