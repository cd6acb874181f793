"""4-bit weights: NF4/FP4/int4 blockwise quantization in bitsandbytes' format and a frozen 4-bit Linear."""

from tuneforge.quant.linear4bit import Linear4bit, QuantizeResult, quantization_targets, quantize_model
from tuneforge.quant.nf4 import Quantized4bit, dequantize_4bit, quantize_4bit

__all__ = [
    "Linear4bit",
    "QuantizeResult",
    "Quantized4bit",
    "dequantize_4bit",
    "quantization_targets",
    "quantize_4bit",
    "quantize_model",
]
