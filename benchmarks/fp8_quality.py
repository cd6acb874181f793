"""Does the FP8 frozen base train like the 16-bit one? The same LoRA run twice, loss curves compared.

    python benchmarks/fp8_quality.py --model smollm2-135m --device cpu   # real weights; FP8 emulated on the CPU
    python benchmarks/fp8_quality.py --model llama-3-8b --device cuda    # random weights at 8B shapes, on a GPU

Both runs see the same seeded adapters and the same batches: 1,024 real P3 examples (``.bench/p3_workload.json``,
made by ``speed_gpu.py --prepare``) packed into rows, LoRA r=16, alpha 32 on all 7 projections, AdamW at a constant
2e-4, ``train.step.train_step``. On the CPU the FP8 base runs the emulation (e4m3 codes and scales as on the GPU,
dequantized, fp32 matmul), i.e. the same function as ``torch._scaled_mm`` but for accumulation order. The verdict:
the per-step losses, smoothed over 10 steps, stay within 1% of the 16-bit run's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from tuneforge.methods.lora import apply_lora, lora_layers  # noqa: E402
from tuneforge.quant.fp8 import Linear8, convertible  # noqa: E402
from tuneforge.train.step import CausalLMLoss, train_step  # noqa: E402

WORKLOAD = ROOT / ".bench" / "p3_workload.json"


def batches(seq: int, rows: int, steps: int, vocab: int) -> list[dict]:
    from tuneforge.data.conversation import Tokenized
    from tuneforge.data.packing import collate, pack

    data = json.loads(WORKLOAD.read_text())["examples"]
    examples = [Tokenized([i % vocab for i in ids], [x if x == -100 else x % vocab for x in labels])
                for ids, labels in data]
    cut = [Tokenized(e.input_ids[:seq], e.labels[:seq]) for e in examples]
    packed = pack([t for t in cut if any(x != -100 for x in t.labels[1:])], seq)  # the cut left an answer
    out = [collate(packed[i:i + rows], 0) for i in range(0, len(packed) - rows + 1, rows)]
    return [out[i % len(out)] for i in range(steps)]


def build(name: str, device: torch.device, layers: int | None) -> torch.nn.Module:
    if name == "smollm2-135m":
        from tuneforge.models.load import load_model

        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        return load_model(name, dtype=dtype, device=str(device))
    from qlora_gpu import build_ours

    from tuneforge.models.shapes import shape_config

    cfg = shape_config(name)
    if layers:
        cfg["num_hidden_layers"] = layers
    model = build_ours(cfg, "lora", device)
    from tuneforge.methods.lora import unwrap_lora

    unwrap_lora(model)  # run() adds the adapters itself, seeded the same for both precisions
    return model


def run(args: argparse.Namespace, precision: str, data: list[dict]) -> dict:
    device = torch.device(args.device)
    model = build(args.model, device, args.layers)
    torch.manual_seed(0)
    apply_lora(model, r=16, alpha=32, dropout=0.0)
    if precision == "fp8":
        out_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        for layer in lora_layers(model).values():
            if convertible(layer.base_layer):
                layer.base_layer = Linear8.from_linear(layer.base_layer, out_dtype)
    model.train()
    amp = torch.bfloat16 if device.type == "cuda" else None
    loss_model = CausalLMLoss(model, amp=amp)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, fused=device.type == "cuda")
    losses, t0 = [], time.perf_counter()
    for i, b in enumerate(data):
        losses.append(train_step(loss_model, [b], opt, max_grad_norm=1.0).loss)
        if i % 20 == 0:
            print(f"{precision} step {i}: {losses[-1]:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    peak = torch.cuda.max_memory_allocated(device) / (1 << 30) if device.type == "cuda" else None
    del model, loss_model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return {"losses": losses, "seconds": time.perf_counter() - t0, "peak_gib": peak}


def smooth(xs: list[float], k: int = 10) -> list[float]:
    return [sum(xs[max(0, i - k + 1):i + 1]) / len(xs[max(0, i - k + 1):i + 1]) for i in range(len(xs))]


def compare(ref: list[float], other: list[float]) -> dict:
    a, b = smooth(ref), smooth(other)
    rel = [abs(y - x) / x for x, y in zip(a, b, strict=True)]
    tail = slice(-20, None)
    last_ref, last = sum(ref[tail]) / 20, sum(other[tail]) / 20
    return {"max_rel_diff_smoothed": max(rel[10:]), "mean_rel_diff_smoothed": sum(rel[10:]) / len(rel[10:]),
            "last20_ref": last_ref, "last20_fp8": last, "last20_rel_diff": (last - last_ref) / last_ref,
            "within_1pct": max(rel[10:]) < 0.01}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", type=int, help="decoder layers (random shapes only)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "benchmarks" / "results")))
    args = p.parse_args()
    device = torch.device(args.device)
    vocab = 49152 if args.model == "smollm2-135m" else 128256
    data = batches(args.seq, args.rows, args.steps, vocab)
    result = {"args": vars(args), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__}
    for precision in ("bf16", "fp8"):
        result[precision] = run(args, precision, data)
    result["compare"] = compare(result["bf16"]["losses"], result["fp8"]["losses"])
    name = f"fp8_quality_{args.model}_{device.type}.json"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / name).write_text(json.dumps(result, indent=1))
    c = result["compare"]
    print(f"{args.model} on {result['device']}: {args.steps} steps of {args.rows}x{args.seq}; loss "
          f"{result['bf16']['losses'][0]:.4f} -> last-20 mean {c['last20_ref']:.4f} (16-bit base) vs "
          f"{c['last20_fp8']:.4f} (fp8, {100 * c['last20_rel_diff']:+.2f}%); smoothed curves differ by at most "
          f"{100 * c['max_rel_diff_smoothed']:.2f}% (mean {100 * c['mean_rel_diff_smoothed']:.2f}%): "
          f"{'within' if c['within_1pct'] else 'NOT within'} 1%; seconds {result['bf16']['seconds']:.0f} / "
          f"{result['fp8']['seconds']:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
