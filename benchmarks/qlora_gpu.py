"""QLoRA on one GPU: tuneforge against HF transformers + PEFT + bitsandbytes, the 70B case, and the planner.

    python benchmarks/qlora_gpu.py                 # every case, one subprocess each, results under $OUT
    python benchmarks/qlora_gpu.py --smoke         # tiny shapes, a minute on a CPU: the script runs end to end
    python benchmarks/qlora_gpu.py --layers 2      # real widths, 2 layers: calibration in seconds

Each case runs in its own process so its peak memory is its own. Models have random weights at the
real Llama-3 shapes, built layer by layer: every decoder Linear is generated in bf16 on the GPU and
quantized at once, so no full-size 16-bit model ever exists. Both implementations quantize the same
seeded tensors (ours with ``tuneforge.quant``, the peer with bitsandbytes), get the same random
batch, and are timed after warm-up steps; peaks are ``torch.cuda.max_memory_allocated`` (reserved
is reported too). tuneforge's step is ``train.step.train_step``, the training loop's own; the peer's is
HF's loss under bf16 autocast, backward, gradient clipping, fused AdamW.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_runner  # noqa: E402
import torch  # noqa: E402
from bench_runner import fmt, gib_text, heading, measured_pairs, pct, ratios  # noqa: E402

from tuneforge.models.shapes import PROJECTIONS, shape_config  # noqa: E402
from tuneforge.train import recompute  # noqa: E402
from tuneforge.train.loss import CHUNK_TOKENS as LOSS_CHUNK  # noqa: E402  (the product's default)
from tuneforge.train.plan import GIB, PlanInputs, plan_memory  # noqa: E402
from tuneforge.train.recompute import OffloadedActivations  # noqa: E402
from tuneforge.train.step import CausalLMLoss, train_step  # noqa: E402

TINY = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 160,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "tie_word_embeddings": False, "max_position_embeddings": 256, "rms_norm_eps": 1e-5}
LORA_R, LORA_ALPHA = 16, 32


@dataclass(frozen=True)
class Case:
    name: str
    impl: str  # ours | peer | dequant
    shape: str
    method: str = "qlora"
    batch: int = 4
    seq: int = 2048
    ckpt: bool = True
    offload: bool = False  # checkpointed layer inputs in pinned host memory (our checkpoint function)
    mask: bool = False  # the training loop's dense block-causal mask instead of SDPA's causal flag
    warmup: int = 2
    steps: int = 5
    optional: bool = False
    seconds: int = 90  # expected wall time, for the time budget


CASES = [
    Case("dequant", "dequant", "llama-3-8b", seconds=40),
    Case("ours-8b", "ours", "llama-3-8b"),
    Case("peer-8b", "peer", "llama-3-8b"),
    Case("ours-8b-offload", "ours", "llama-3-8b", offload=True),
    Case("ours-70b", "ours", "llama-3-70b", batch=1, warmup=1, steps=3, seconds=150),
    Case("ours-1b-full", "ours", "llama-3.2-1b", method="full", batch=8, seconds=60),
    Case("ours-1b-lora-nockpt", "ours", "llama-3.2-1b", method="lora", ckpt=False, seconds=60),
    Case("ours-8b-nockpt", "ours", "llama-3-8b", ckpt=False, optional=True),
    Case("ours-8b-mask", "ours", "llama-3-8b", mask=True, optional=True),
    Case("ours-70b-offload", "ours", "llama-3-70b", batch=1, offload=True, warmup=1, steps=3, optional=True,
         seconds=150),
]
COMPARE = [("ours-8b", "peer-8b"), ("ours-8b-offload", "peer-8b")]


# --- models --------------------------------------------------------------------------------------

def model_config(case: Case, smoke: bool, layers: int | None) -> dict:
    cfg = dict(TINY) if smoke else shape_config(case.shape)
    if layers:
        cfg["num_hidden_layers"] = layers
    return cfg


def seeded(name: str, shape: tuple[int, ...], device: torch.device, std: float) -> torch.Tensor:
    """A bf16 N(0, std²) tensor that depends only on ``name``: both implementations get the same weights."""
    g = torch.Generator(device=device).manual_seed(zlib.crc32(name.encode()))
    return (torch.randn(shape, generator=g, device=device, dtype=torch.float32) * std).to(torch.bfloat16)


def skeleton(cfg: dict, dtype: torch.dtype):
    """The model on the meta device (no memory), SDPA attention."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")


def materialize_dense(model, device: torch.device, dtype: torch.dtype) -> None:
    """Real tensors for everything but the decoder Linears: seeded embeddings/head, unit norms, rotary."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    for name, p in list(model.named_parameters()):
        if p.device.type != "meta" or any(name.endswith(f"{proj}.weight") for proj in PROJECTIONS):
            continue
        value = (torch.ones(p.shape, device=device) if "norm" in name
                 else seeded(name, tuple(p.shape), device, 0.02)).to(dtype)
        module_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module_name), attr, torch.nn.Parameter(value, requires_grad=False))
    if model.config.tie_word_embeddings:  # named_parameters() listed the shared tensor once
        model.lm_head.weight = model.model.embed_tokens.weight
    with torch.device(device):
        model.model.rotary_emb = LlamaRotaryEmbedding(config=model.config)


def decoder_weights(model, device: torch.device):
    """(module path, seeded bf16 weight) of every decoder Linear, one at a time."""
    n_layers = model.config.num_hidden_layers
    for i in range(n_layers):
        for proj in PROJECTIONS:
            path = f"model.layers.{i}.{'self_attn' if proj[0] in 'qkvo' else 'mlp'}.{proj}"
            linear = model.get_submodule(path)
            # Output projections scaled down with depth (GPT-2's init) keep 80 random layers finite.
            std = 0.02 / (2 * n_layers) ** 0.5 if proj in ("o_proj", "down_proj") else 0.02
            yield path, seeded(path, (linear.out_features, linear.in_features), device, std)


def build_ours(cfg: dict, method: str, device: torch.device, compute: torch.dtype | None = None):
    """tuneforge's model: HF Llama with our Linear4bit (qlora) or dense weights, and our LoRA.

    ``compute`` replaces the device's compute dtype (bf16 on a GPU, fp32 on a CPU).
    """
    from tuneforge.methods.lora import apply_lora
    from tuneforge.methods.setup import gpu_weight_dtype
    from tuneforge.quant import nf4
    from tuneforge.quant.linear4bit import Linear4bit, set_submodule
    from tuneforge.quant.nf4 import quantize_4bit

    compute = compute or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    # the weights that are not 4-bit, as train loads them on a GPU (a frozen LoRA base in the compute dtype,
    # fp32 master weights for full fine-tuning)
    dense = compute if method == "qlora" or gpu_weight_dtype(method) == "bf16" else torch.float32
    model = skeleton(cfg, dense)
    materialize_dense(model, device, dense)
    nf4.CHUNK_VALUES = 1 << 26  # quantize in fewer, larger steps: same values, a faster build
    t0 = time.perf_counter()
    for path, w in decoder_weights(model, device):
        if method == "qlora":
            layer = Linear4bit.from_quantized(quantize_4bit(w, 64, "nf4", True), None, compute)
        else:
            layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
            layer.weight = torch.nn.Parameter(w.to(dense), requires_grad=False)
        del w
        set_submodule(model, path, layer)
    sync(device)
    model.linears_build_s = time.perf_counter() - t0
    if method == "full":
        model.requires_grad_(True)
    else:
        apply_lora(model, r=LORA_R, alpha=LORA_ALPHA, dropout=0.0, target_modules="all-linear")
    return model


def build_peer(cfg: dict, device: torch.device):
    """The peer: HF Llama with bitsandbytes NF4 (double quant) Linears, PEFT LoRA on all 7 projections."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    from tuneforge.quant.linear4bit import set_submodule

    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = skeleton(cfg, compute)
    materialize_dense(model, device, compute)
    for path, w in decoder_weights(model, device):
        layer = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compute_dtype=compute,
                                  compress_statistics=True, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(w.to(compute), requires_grad=False, compress_statistics=True,
                                         quant_type="nf4", blocksize=64).to(device)
        del w
        set_submodule(model, path, layer)
    model.is_loaded_in_4bit = True  # what from_pretrained(quantization_config=...) sets; PEFT reads it
    config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=list(PROJECTIONS),
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


# --- steps ---------------------------------------------------------------------------------------

def ours_step(model, case: Case, device: torch.device) -> Callable[[torch.Tensor], float]:
    """``train``'s step (``train.step.train_step``) on rows of one example each; the loss of each step.

    ``case.mask``: the rows hold two examples each, so the loss gets the dense block-causal mask train passes
    for packed rows (SDPA's masked kernel) instead of SDPA's causal flag.
    """
    if case.ckpt:
        recompute.enable(model, "offload" if case.offload else "on")
    amp = torch.bfloat16 if device.type == "cuda" else None
    loss_model = CausalLMLoss(model, LOSS_CHUNK, amp, OffloadedActivations() if case.offload else None)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, fused=device.type == "cuda")

    def step(ids: torch.Tensor) -> float:
        batch, seq = ids.shape
        seq_ids = torch.zeros_like(ids)
        if case.mask:
            seq_ids[:, seq // 2:] = 1
        batch = {"input_ids": ids, "labels": ids, "seq_ids": seq_ids,
                 "position_ids": torch.arange(seq, device=ids.device).expand(batch, seq)}
        return train_step(loss_model, [batch], opt, max_grad_norm=1.0).loss
    return step


def peer_step(model, case: Case, device: torch.device) -> Callable[[torch.Tensor], float]:
    """The peer's step: HF's loss under bf16 autocast, backward, clipping, fused AdamW."""
    if case.ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, fused=device.type == "cuda")
    amp = torch.bfloat16 if device.type == "cuda" else None

    def step(ids: torch.Tensor) -> float:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())
    return step


def timed_steps(model, step: Callable[[torch.Tensor], float], ids: torch.Tensor, warmup: int, steps: int,
                device: torch.device) -> dict:
    losses, t0 = [], None
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        losses.append(step(ids))
    sync(device)
    seconds = time.perf_counter() - t0
    return {"losses": losses, "seconds": seconds, "tokens_per_s": ids.numel() * steps / seconds,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gib(device: torch.device, what: str) -> float | None:
    if device.type != "cuda":
        return None
    return getattr(torch.cuda, what)(device) / GIB


# --- cases ---------------------------------------------------------------------------------------

def run_training_case(case: Case, smoke: bool, layers: int | None, steps: int | None = None) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = model_config(case, smoke, layers)
    torch.manual_seed(0)  # LoRA's A init: the same adapters in every case
    batch, seq = (2, 64) if smoke else (case.batch, case.seq)
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(1234)).to(device)
    t0 = time.perf_counter()
    if case.impl == "peer":
        model = build_peer(cfg, device)
        step = peer_step(model, case, device)
    else:
        model = build_ours(cfg, case.method, device)
        step = ours_step(model, case, device)
    model.train()
    sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the build's temporaries must not count as the training's reserved memory
    out = {"build_s": time.perf_counter() - t0, "linears_build_s": getattr(model, "linears_build_s", None),
           "build_peak_gib": gib(device, "max_memory_allocated"),
           "weights_gib": gib(device, "memory_allocated"), "batch": batch, "seq": seq, "config": cfg}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warmup, steps = (1, 2) if smoke else (case.warmup, steps or case.steps)
    out.update(timed_steps(model, step, ids, warmup, steps, device))
    out.update(peak_gib=gib(device, "max_memory_allocated"), reserved_gib=gib(device, "max_memory_reserved"),
               host_peak_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20))
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        out["outside_torch_gib"] = (total - free - torch.cuda.memory_reserved(device)) / GIB  # context etc.
    if case.impl == "ours":
        out.update(replan(case, out, device.type))
    return out


def replan(case: Case, rec: dict, device_type: str = "cuda") -> dict:
    """The planner's prediction for a measured case, and its error against the measured peak."""
    recompute = ("offload" if case.offload else "on") if case.ckpt else "off"
    plan = plan_memory(PlanInputs(rec["config"], case.method, rec["seq"], rec["batch"], lora_r=LORA_R,
                                  recompute=recompute, loss_chunk_tokens=LOSS_CHUNK, attention_mask=case.mask,
                                  dtype="bf16" if device_type == "cuda" else "fp32"), advise=False)
    out = {"plan": plan.to_dict()}
    if rec.get("peak_gib"):
        out["plan_error_pct"] = 100 * (plan.allocated / GIB - rec["peak_gib"]) / rec["peak_gib"]
        if rec.get("reserved_gib") is not None and rec.get("outside_torch_gib") is not None:
            used = rec["reserved_gib"] + rec["outside_torch_gib"]  # what nvidia-smi would show
            out["plan_total_error_pct"] = 100 * (plan.peak / GIB - used) / used
    return out


def run_dequant_case(smoke: bool) -> dict:
    """GPU dequantization: Triton kernel == reference == bitsandbytes, our codes == bitsandbytes' codes; speed."""
    from tuneforge.quant.nf4 import dequantize_4bit, quantize_4bit
    from tuneforge.quant.nf4_gpu import dequantize, use_fast_path

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = [(256, 128), (100, 65)] if smoke else [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336),
                                                      (28672, 8192)]
    out: dict = {"shapes": [], "fast_path": None}
    bnbf = _try_bnb()
    for shape in shapes:
        w = torch.randn(shape, device=device, dtype=torch.bfloat16) * 0.02
        q = quantize_4bit(w, 64, "nf4", True)
        out["fast_path"] = use_fast_path(q)
        ref = dequantize_4bit(q, torch.bfloat16)
        fast = dequantize(q, torch.bfloat16)
        row = {"shape": list(shape), "fast_equals_reference": bool(torch.equal(fast, ref))}
        if bnbf is not None:
            packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            row["codes_equal_bnb"] = bool(torch.equal(packed.reshape(-1), q.packed.reshape(-1)))
            row["absmax_codes_equal_bnb_pct"] = 100 * float((state.absmax == q.absmax).float().mean())
            row["fast_equals_bnb_dequant_of_our_state"] = bool(torch.equal(fast, bnbf.dequantize_4bit(
                q.packed, _bnb_state(bnbf, q))))
            row["max_abs_diff_vs_bnb_roundtrip"] = float((bnbf.dequantize_4bit(packed, state) - fast).abs().max())
        if device.type == "cuda":
            timed = {"triton": lambda q=q: dequantize(q, torch.bfloat16),
                     "reference": lambda q=q: dequantize_4bit(q, torch.bfloat16)}
            if bnbf is not None:
                timed["bnb"] = lambda p=packed, s=state: bnbf.dequantize_4bit(p, s)
            for name, fn in timed.items():
                ms = _bench_ms(fn)
                row[f"{name}_ms"] = ms
                row[f"{name}_gbps"] = q.numel * 2.5 / ms / 1e6  # packed codes read + bf16 written
        out["shapes"].append(row)
    out["all_equal"] = all(r["fast_equals_reference"] for r in out["shapes"])
    return out


def _try_bnb():
    try:
        import bitsandbytes.functional as bnbf
        return bnbf
    except Exception:  # noqa: BLE001 - any import failure means "no peer here"
        return None


def _bnb_state(bnbf, q):
    state2 = bnbf.QuantState(absmax=q.absmax2, code=bnbf.create_dynamic_map(signed=True).to(q.packed.device),
                             blocksize=256, dtype=torch.float32)
    return bnbf.QuantState(absmax=q.absmax, shape=q.shape, code=bnbf.get_4bit_type("nf4", device=q.packed.device),
                           blocksize=64, quant_type="nf4", dtype=torch.bfloat16, offset=q.offset, state2=state2)


def _bench_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


# --- orchestration -------------------------------------------------------------------------------

def run_all(args: argparse.Namespace) -> dict:
    # Both implementations get the allocator setting that keeps reserved memory close to allocated.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    chosen = bench_runner.selected(CASES, args.cases)
    again = args.repeat_only.split(",") if args.repeat_only else [c.name for c in chosen]
    rounds = [c for r in range(args.repeat) for c in chosen if r == 0 or c.impl != "dequant" and c.name in again]

    def command(case: Case, path: Path) -> list[str]:
        return [sys.executable, *bench_runner.child_args(__file__, case, path, args, ("smoke", "layers", "steps"))]

    return bench_runner.run_cases(args, "qlora_gpu.py", bench_runner.environment(), rounds, command, summary_line,
                                  markdown, lambda cases: {"comparisons": compare(cases)}, merge=merge_round)


def merge_round(first: dict | None, rec: dict) -> dict:
    """Fold a repeated run into the first: tokens/s becomes the median of the rounds, peaks the maximum."""
    run = {k: rec.get(k) for k in ("tokens_per_s", "peak_gib", "reserved_gib", "seconds")}
    if first is None or "tokens_per_s" not in rec:
        if "tokens_per_s" in rec:
            rec["runs"] = [run]
        return rec if first is None else first
    first["runs"].append(run)
    speeds = sorted(r["tokens_per_s"] for r in first["runs"])
    first["tokens_per_s"] = speeds[len(speeds) // 2] if len(speeds) % 2 else sum(speeds[len(speeds) // 2 - 1:][:2]) / 2
    for key in ("peak_gib", "reserved_gib"):
        if rec.get(key) is not None:
            first[key] = max(first[key], rec[key])
    return first


def summary_line(rec: dict) -> str:
    if "tokens_per_s" in rec:
        err = f", planner {rec['plan_error_pct']:+.1f}%" if "plan_error_pct" in rec else ""
        return (f"{rec['tokens_per_s']:,.0f} tok/s, peak {gib_text(rec.get('peak_gib'))}, "
                f"loss0 {rec['losses'][0]:.4f}{err}")
    return json.dumps({k: v for k, v in rec.items() if k in ("all_equal", "fast_path")})


def compare(cases: dict) -> dict:
    return {f"{name}/{peer_name}": {
        **ratios(ours, peer), "loss0_ours": ours["losses"][0], "loss0_peer": peer["losses"][0],
        "loss0_rel_diff": abs(ours["losses"][0] - peer["losses"][0]) / abs(peer["losses"][0])}
        for name, peer_name, ours, peer in measured_pairs(cases, COMPARE)}


def markdown(results: dict) -> str:
    env = results["env"]
    title = (f"QLoRA on one GPU — {env['date']}, {env['gpu']}, torch {env['torch']} (CUDA {env['cuda']}), "
             f"transformers {env['transformers']}, peft {env['peft']}, bitsandbytes {env['bitsandbytes']}, "
             f"triton {env['triton']}; `PYTORCH_CUDA_ALLOC_CONF={env['alloc_conf']}`")
    lines = heading(results, title, " (on the GPU machine; `--smoke` runs it on a CPU).") + [
        "| case | method | batch×seq | checkpointing | tokens/s | peak GiB (allocated) | reserved GiB | "
        "planner GiB | planner error | planner total vs used | first loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, rec in results["cases"].items():
        c = rec["case"]
        if c["impl"] == "dequant":
            continue
        style = "offloaded" if c["offload"] else "on"
        ckpt = style if c["ckpt"] else "off"
        method = c["method"] + (" (bnb+PEFT)" if c["impl"] == "peer" else "") + (" +mask" if c["mask"] else "")
        if "tokens_per_s" not in rec:
            why = rec.get("skipped") or rec.get("error")
            lines.append(f"| {name} | {method} | {c['batch']}×{c['seq']} | {ckpt} | {why} | | | | | | |")
            continue
        plan = rec.get("plan")
        speeds = sorted(r["tokens_per_s"] for r in rec.get("runs", []))
        spread = f" ({speeds[0]:,.0f}–{speeds[-1]:,.0f})" if len(speeds) > 1 else ""
        lines.append(
            f"| {name} | {method} | {rec['batch']}×{rec['seq']} | {ckpt} | {rec['tokens_per_s']:,.0f}{spread} | "
            f"{fmt(rec['peak_gib'])} | {fmt(rec['reserved_gib'])} | "
            f"{fmt(plan['allocated'] / GIB) if plan else '-'} | "
            f"{pct(rec.get('plan_error_pct'))} | {pct(rec.get('plan_total_error_pct'))} | "
            f"{rec['losses'][0]:.4f} |")
    comps = results.get("comparisons", {})
    if comps:
        lines += ["", "| tuneforge vs peer (same call, same weights, same batch) | speed | peak memory | "
                  "first-step loss (ours / peer) |", "|---|---|---|---|"]
        for name, c in comps.items():
            peak = f"{c['peak_ratio']:.2f}×" if c["peak_ratio"] else "-"
            lines.append(f"| {name} | {c['speed_ratio']:.2f}× | {peak} | {c['loss0_ours']:.4f} / "
                         f"{c['loss0_peer']:.4f} (rel. diff {c['loss0_rel_diff']:.1e}) |")
    deq = results["cases"].get("dequant", {})
    if deq.get("shapes"):
        lines += ["", "| dequantize (bf16 out) | Triton == reference | codes == bnb | "
                  "Triton ms (GB/s) | reference ms | bnb ms |", "|---|---|---|---|---|---|"]
        for r in deq["shapes"]:
            lines.append(f"| {r['shape'][0]}×{r['shape'][1]} | {r['fast_equals_reference']} | "
                         f"{r.get('codes_equal_bnb', '-')} | {fmt(r.get('triton_ms'), 3)} "
                         f"({fmt(r.get('triton_gbps'), 0)}) | {fmt(r.get('reference_ms'), 3)} | "
                         f"{fmt(r.get('bnb_ms'), 3)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = bench_runner.parser(__doc__, CASES, budget=540)
    p.add_argument("--steps", type=int, help="timed steps per training case (default: each case's)")
    p.add_argument("--repeat", type=int, default=1, help="run the training cases this many times, interleaved: "
                   "tokens/s is the median, peaks the maximum")
    p.add_argument("--repeat-only", help="comma-separated cases that --repeat repeats (default: all)")
    p.add_argument("--markdown-from", help="re-render the table from a results JSON and exit")
    p.add_argument("--save", help="with --markdown-from: write the re-planned results JSON here")
    args = p.parse_args(argv)
    if args.markdown_from:  # re-render with the current planner's predictions
        results = json.loads(Path(args.markdown_from).read_text())
        for rec in results["cases"].values():
            if rec["case"]["impl"] == "ours" and "peak_gib" in rec:
                known = {k: v for k, v in rec["case"].items() if k in Case.__dataclass_fields__}
                rec.update(replan(Case(**known), rec))
        results["comparisons"] = compare(results["cases"])
        print(markdown(results))
        if args.save:
            Path(args.save).write_text(json.dumps(results, indent=1))
        return 0
    if args.run_case:
        torch.set_num_threads(min(8, os.cpu_count() or 1))
        return bench_runner.run_child(args, CASES, lambda case: run_dequant_case(args.smoke) if case.impl == "dequant"
                                      else run_training_case(case, args.smoke, args.layers, args.steps))
    run_all(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
