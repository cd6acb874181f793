"""4-bit weights: NF4/FP4/int4 blockwise quantization in bitsandbytes' format, a frozen 4-bit Linear and 4-bit
MoE expert stacks."""

from tuneforge.quant.experts4bit import Experts4bit
from tuneforge.quant.linear4bit import Linear4bit, QuantizeResult, quantization_targets, quantize_model
from tuneforge.quant.nf4 import Quantized4bit, dequantize_4bit, quantize_4bit

__all__ = [
    "Experts4bit",
    "Linear4bit",
    "QuantizeResult",
    "Quantized4bit",
    "dequantize_4bit",
    "quantization_targets",
    "quantize_4bit",
    "quantize_model",
]
