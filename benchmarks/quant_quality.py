"""Quality cost of 4-bit weights: perplexity of the builtin SmolLM2 on general text.

Compares the fp32 model with NF4, NF4 + double quantization, FP4 and plain int4 (every Linear but
the output head quantized, blocks of 64, compute in fp32 so only the weights differ), as in the
QLoRA paper's data-type comparison; and the FP8 GEMMs a GPU would run (``method.lora.base_precision: fp8``):
e4m3 weights with per-channel scales, and NF4 + double quantization made into e4m3 codes (QLoRA with FP8
compute), activations quantized per row, emulated in fp32 on the CPU with the GPU's codes and scales.
Prints a table and writes JSON.

    python benchmarks/quant_quality.py [--tokens 16384] [--window 512] [--out quant_quality.json]

Note: the builtin SmolLM2 ships as a Q4_1 GGUF, so its "fp32" weights are already on a 4-bit grid
(blocks of 32); the numbers measure re-quantizing those weights.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from tuneforge.models.load import load_model, load_tokenizer
from tuneforge.quant.fp8 import Linear8, convertible
from tuneforge.quant.linear4bit import Linear4bit, model_nbytes, quantization_targets, quantize_model, set_submodule
from tuneforge.quant.nf4_gpu import fp8_convertible

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "general" / "tinyshakespeare.txt"
CONFIGS = {  # name: quantize_model settings (None: not quantized), "fp8": the GEMMs in FP8
    "fp32": None,
    "nf4": {"quant_type": "nf4", "double_quant": False},
    "nf4+dq": {"quant_type": "nf4", "double_quant": True},
    "fp4": {"quant_type": "fp4", "double_quant": False},
    "int4": {"quant_type": "int4", "double_quant": False},
    "fp8": {"fp8": True},
    "nf4+dq+fp8": {"quant_type": "nf4", "double_quant": True, "fp8": True},
}


def quantize(model: torch.nn.Module, settings: dict) -> int:
    """Apply one of CONFIGS to ``model`` in place; returns its bytes after."""
    settings = dict(settings)
    fp8 = settings.pop("fp8", False)
    if not settings:  # the FP8 base: e4m3 weights, per-channel scales (fp32 outputs: only the GEMMs differ)
        for name in quantization_targets(model):
            if convertible(linear := model.get_submodule(name)):
                set_submodule(model, name, Linear8.from_linear(linear, out_dtype=torch.float32))
        return model_nbytes(model)
    size = quantize_model(model, compute_dtype=torch.float32, **settings).bytes_after
    for m in model.modules():
        if fp8 and isinstance(m, Linear4bit) and fp8_convertible(m.quantized):
            m.fp8 = True
    return size


def perplexity(model: torch.nn.Module, ids: torch.Tensor, window: int, batch: int = 4) -> tuple[float, int]:
    """exp(mean next-token NLL) over non-overlapping windows; returns (ppl, tokens scored)."""
    n = ids.numel() // window * window
    rows = ids[:n].view(-1, window)
    nll, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, rows.shape[0], batch):
            x = rows[i:i + batch]
            logits = model(x).logits[:, :-1].float()
            nll += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
            count += x[:, 1:].numel()
    return math.exp(nll / count), count


def run(model_ref: str, tokens: int, window: int, configs: list[str]) -> dict:
    tokenizer = load_tokenizer(model_ref)
    ids = torch.tensor(tokenizer(DATA.read_text()).input_ids[:tokens])
    results = []
    for name in configs:
        model = load_model(model_ref, dtype=torch.float32).eval()
        size = model_nbytes(model) if CONFIGS[name] is None else quantize(model, CONFIGS[name])
        start = time.perf_counter()
        ppl, scored = perplexity(model, ids, window)
        results.append({"config": name, "perplexity": ppl, "model_bytes": size,
                        "seconds": round(time.perf_counter() - start, 1)})
        print(f"{name:8s} ppl {ppl:8.3f}  model {size / 2**20:7.1f} MiB  ({results[-1]['seconds']} s)",
              flush=True)
        del model
    base = results[0]["perplexity"]
    for r in results:
        r["ppl_increase_pct"] = 100 * (r["perplexity"] / base - 1)
    return {"model": model_ref, "data": DATA.name, "tokens": scored, "window": window,
            "torch": torch.__version__, "machine": platform.machine(), "results": results}


def table(report: dict) -> str:
    lines = [f"SmolLM2-135M perplexity, {report['data']}, {report['tokens']} tokens scored, windows of "
             f"{report['window']} (Linear layers but lm_head quantized, blocksize 64, fp32 compute; fp8 rows: "
             "the GEMMs' FP8 inputs, emulated)",
             "| weights | perplexity | vs fp32 | model MiB |", "|---|---|---|---|"]
    for r in report["results"]:
        lines.append(f"| {r['config']} | {r['perplexity']:.3f} | {r['ppl_increase_pct']:+.2f}% | "
                     f"{r['model_bytes'] / 2**20:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--out", default="quant_quality.json")
    args = parser.parse_args()
    configs = ["fp32"] + [c for c in args.configs if c != "fp32"]  # fp32: the baseline of every row
    report = run(args.model, args.tokens, args.window, configs)
    print(table(report))
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
