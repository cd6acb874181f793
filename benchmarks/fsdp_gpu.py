"""FSDP2 on two GPUs: Llama-3-8B shapes (random weights), LoRA and QLoRA on 1 GPU vs 2, full fine-tuning on 2.

    python benchmarks/fsdp_gpu.py                  # on a 2-GPU machine: every case, results under $OUT
    python benchmarks/fsdp_gpu.py --smoke          # tiny shapes, CPU + gloo, 2 processes: the script end to end
    python benchmarks/fsdp_gpu.py --layers 4       # real widths, 4 layers: a quick check on the GPUs

One command runs every case, each in its own process(es) so its peak memory is its own: 1-GPU cases as a
plain process (what ``tuneforge train`` is on one GPU), 2-GPU cases under ``torchrun --nproc_per_node 2``
with ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` and ``NCCL_NVLS_ENABLE=0`` (NVLink multicast off).
What is measured is the library's own path: ``tuneforge.train.distributed`` shards the model (FSDP2, one unit
per decoder layer + the root), splits the global batch, sums the token count over ranks; the step is the
loop's (``lm_loss`` with the chunked loss, bf16 autocast, loss / global trained tokens, clipping, fused AdamW).

Weak scaling: every GPU gets the same rows per step (``--batch`` × ``--seq``), so the 2-GPU global batch is twice
the 1-GPU one. Scaling efficiency = (tokens/s per GPU on 2 GPUs) / (tokens/s on 1 GPU). Peaks are
``torch.cuda.max_memory_allocated`` after the build, the maximum over ranks. Weights are random at the real
shapes, built layer by layer on each GPU (benchmarks/qlora_gpu.py's builders; every rank builds the same seeded
weights, then FSDP keeps its shard). LoRA and QLoRA bases are bf16 / NF4 as ``train`` loads them on a GPU; full
fine-tuning keeps fp32 master weights and fp32 AdamW states (sharded) and computes in bf16 autocast.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import qlora_gpu  # noqa: E402  (random-weight builders at real shapes, environment())
import torch  # noqa: E402

from tuneforge.train.plan import GIB, shape_config  # noqa: E402

LORA_R, LORA_ALPHA, LOSS_CHUNK = 16, 32, 1024


@dataclass(frozen=True)
class Case:
    name: str
    method: str  # lora | qlora | full
    gpus: int
    ckpt: bool = True
    warmup: int = 2
    steps: int = 8
    seconds: int = 75  # expected wall time, for the time budget


CASES = [
    Case("lora-8b-1gpu", "lora", 1),
    Case("lora-8b-2gpu", "lora", 2),
    Case("qlora-8b-1gpu", "qlora", 1),
    Case("qlora-8b-2gpu", "qlora", 2),
    Case("full-8b-2gpu", "full", 2, seconds=100),
]
PAIRS = [("lora-8b-1gpu", "lora-8b-2gpu"), ("qlora-8b-1gpu", "qlora-8b-2gpu")]


# --- one case (in each process of it) ------------------------------------------------------------

def build(cfg: dict, method: str, device: torch.device) -> torch.nn.Module:
    """Llama with seeded random weights: NF4 Linear4bit (qlora) or dense decoder Linears, our LoRA unless full."""
    from tuneforge.methods.lora import apply_lora
    from tuneforge.quant import nf4
    from tuneforge.quant.linear4bit import Linear4bit, set_submodule
    from tuneforge.quant.nf4 import quantize_4bit
    from tuneforge.train.plan import gpu_weight_dtype

    # The dtypes train uses on a GPU, also in the CPU smoke run (so it goes through the same mixed-dtype FSDP
    # units): bf16 compute; a frozen LoRA base and a 4-bit base's other weights in bf16; fp32 for full.
    compute = torch.bfloat16
    if method == "qlora":
        dense = compute
    else:
        run = SimpleNamespace(method=SimpleNamespace(name=method), train=SimpleNamespace(dtype="auto"))
        dense = torch.bfloat16 if gpu_weight_dtype(run) == "bf16" else torch.float32
    model = qlora_gpu.skeleton(cfg, dense)
    qlora_gpu.materialize_dense(model, device, dense)
    nf4.CHUNK_VALUES = 1 << 26  # quantize in fewer, larger steps: same values, a faster build
    for path, w in qlora_gpu.decoder_weights(model, device):
        if method == "qlora":
            layer = Linear4bit.from_quantized(quantize_4bit(w, 64, "nf4", True), None, compute)
        else:
            layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
            layer.weight = torch.nn.Parameter(w.to(dense), requires_grad=False)
        del w
        set_submodule(model, path, layer)
    if method == "full":
        model.requires_grad_(True)
    else:
        apply_lora(model, r=LORA_R, alpha=LORA_ALPHA, dropout=0.0, target_modules="all-linear")
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(case: Case, smoke: bool, layers: int | None, batch: int, seq: int, steps: int | None) -> dict | None:
    """Build, shard (on 2+ processes), train warm-up + timed steps; rank 0 returns the record."""
    import torch.distributed as dist

    from tuneforge.data.packing import PackedRow, collate
    from tuneforge.train import distributed, recompute
    from tuneforge.train.loop import lm_loss

    cuda = torch.cuda.is_available() and not smoke
    world = distributed.world_size()
    batch, seq = (2, 64) if smoke else (batch, seq)
    device = distributed.init(SimpleNamespace(train=SimpleNamespace(batch_size=batch * world)),
                              torch.device("cuda" if cuda else "cpu"))
    cfg = dict(qlora_gpu.TINY) if smoke else shape_config("llama-3-8b")
    if layers:
        cfg["num_hidden_layers"] = layers
    torch.manual_seed(0)  # LoRA's A init: the same on every rank and in every case
    t0 = time.perf_counter()
    model = build(cfg, case.method, device)
    if case.ckpt:
        recompute.enable(model, "on")
    model.train()
    model = distributed.shard_model(model)
    sync(device)
    build_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    weights_gib = torch.cuda.memory_allocated(device) / GIB if cuda else None

    # the same global rows on every rank (seeded); each rank keeps its share, as train does
    ids = torch.randint(0, cfg["vocab_size"], (batch * world, seq), generator=torch.Generator().manual_seed(1234))
    rows = [PackedRow(input_ids=r.tolist(), labels=r.tolist(), position_ids=list(range(seq)), seq_ids=[0] * seq,
                      lengths=[seq]) for r in ids]
    local = collate(distributed.local_rows(rows), pad_id=0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-5 if case.method == "full" else 2e-4, fused=True)
    amp = torch.bfloat16  # autocast as train on a GPU (CPU autocast in the smoke run)
    warmup, timed = (1, 2) if smoke else (case.warmup, steps or case.steps)
    losses, start = [], time.perf_counter()
    for step in range(warmup + timed):
        if step == warmup:
            sync(device)
            if dist.is_initialized():
                dist.barrier()
            start = time.perf_counter()
        n = distributed.all_sum(int((local["labels"][:, 1:] != -100).sum()))
        loss, _ = lm_loss(model, local, LOSS_CHUNK, amp)
        (loss / n).backward()
        losses.append(distributed.all_sum(float(loss.detach())) / n)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    seconds = time.perf_counter() - start
    mine = {"peak_gib": torch.cuda.max_memory_allocated(device) / GIB if cuda else None,
            "reserved_gib": torch.cuda.max_memory_reserved(device) / GIB if cuda else None,
            "weights_gib": weights_gib, "build_s": build_s}
    every = [mine]
    if dist.is_initialized():
        every = [None] * world
        dist.all_gather_object(every, mine)
    if not distributed.is_main():
        return None
    tokens = batch * world * seq * timed
    peaks = [r["peak_gib"] for r in every if r["peak_gib"] is not None]
    return {"world": world, "batch_per_gpu": batch, "seq": seq, "timed_steps": timed, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "tokens_per_s_per_gpu": tokens / seconds / world,
            "losses": losses, "loss_finite": all(math.isfinite(x) for x in losses),
            "peak_gib": max(peaks) if peaks else None,
            "reserved_gib": max((r["reserved_gib"] for r in every if r["reserved_gib"] is not None), default=None),
            "weights_gib": every[0]["weights_gib"], "build_s": max(r["build_s"] for r in every), "ranks": every,
            "trainable_params": sum(p.numel() for p in params), "config": cfg}


# --- orchestration -------------------------------------------------------------------------------

def child_command(case: Case, args: argparse.Namespace, json_path: Path) -> list[str]:
    tail = [__file__, "--run-case", case.name, "--json", str(json_path), "--batch", str(args.batch),
            "--seq", str(args.seq)]
    tail += ["--smoke"] if args.smoke else []
    tail += ["--layers", str(args.layers)] if args.layers else []
    tail += ["--steps", str(args.steps)] if args.steps else []
    if case.gpus == 1:
        return [sys.executable, *tail]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(case.gpus), *tail]


def run_all(args: argparse.Namespace) -> dict:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted = args.cases.split(",") if args.cases else [c.name for c in CASES]
    env = dict(os.environ)
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    env.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off
    env.setdefault("OMP_NUM_THREADS", "1" if args.smoke else "8")
    if args.smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""  # CPU + gloo even on a GPU machine
    gpus = 0 if args.smoke else torch.cuda.device_count()
    results: dict = {"env": {**qlora_gpu.environment(), "gpus": gpus,
                             "nccl": _version(torch.cuda.nccl.version()) if gpus else None,
                             "nvls": env["NCCL_NVLS_ENABLE"], "alloc_conf": env["PYTORCH_CUDA_ALLOC_CONF"]},
                     "smoke": args.smoke, "layers": args.layers, "cases": {},
                     "command": " ".join(["python", "benchmarks/fsdp_gpu.py", *sys.argv[1:]])}
    scratch = Path(tempfile.mkdtemp(prefix="fsdp_gpu_"))
    start = time.perf_counter()
    with (out_dir / "fsdp_gpu.log").open("w") as log_file:
        for case in CASES:
            if case.name not in wanted:
                continue
            left = args.budget - (time.perf_counter() - start)
            if not args.smoke and gpus < case.gpus:
                results["cases"][case.name] = {"case": asdict(case), "skipped": f"{gpus} GPU(s) here"}
                continue
            if left < 20:
                results["cases"][case.name] = {"case": asdict(case), "skipped": f"time budget ({left:.0f} s left)"}
                continue
            path = scratch / f"{case.name}.json"
            t0 = time.perf_counter()
            print(f"[bench] {case.name} ...", flush=True)
            try:
                proc = subprocess.run(child_command(case, args, path), env=env, timeout=max(10, left - 5),
                                      capture_output=True, text=True)
                log = proc.stdout + proc.stderr
                rec = json.loads(path.read_text()) if proc.returncode == 0 and path.exists() else {
                    "error": f"exit {proc.returncode}", "log_tail": log[-3000:]}
            except subprocess.TimeoutExpired as e:
                log = str(e.stdout or "") + str(e.stderr or "")
                rec = {"error": "timeout", "log_tail": log[-3000:]}
            rec["case"], rec["wall_s"] = asdict(case), time.perf_counter() - t0
            log_file.write(f"=== {case.name}\n{log}\n")
            log_file.flush()
            results["cases"][case.name] = rec
            print(f"[bench] {case.name}: {summary_line(rec)}", flush=True)
            if "error" in rec:
                print(rec.get("log_tail", ""), flush=True)
            (out_dir / "fsdp_gpu.json").write_text(json.dumps(results, indent=1))
    results["scaling"] = scaling(results["cases"])
    results["total_s"] = time.perf_counter() - start
    (out_dir / "fsdp_gpu.json").write_text(json.dumps(results, indent=1))
    (out_dir / "fsdp_gpu.md").write_text(markdown(results))
    print(markdown(results))
    return results


def summary_line(rec: dict) -> str:
    if "error" in rec:
        return f"ERROR {rec['error']}"
    peak = f"{rec['peak_gib']:.2f} GiB" if rec.get("peak_gib") is not None else "-"
    return (f"{rec['tokens_per_s']:,.0f} tok/s ({rec['tokens_per_s_per_gpu']:,.0f}/GPU), peak {peak}, "
            f"loss {rec['losses'][0]:.4f} → {rec['losses'][-1]:.4f}, {rec['wall_s']:.0f} s")


def scaling(cases: dict) -> dict:
    """Per-GPU throughput on 2 GPUs over the 1-GPU throughput, for each method measured both ways."""
    out = {}
    for one, two in PAIRS:
        a, b = cases.get(one, {}), cases.get(two, {})
        if "tokens_per_s" in a and "tokens_per_s" in b:
            out[two] = {"vs": one, "efficiency": b["tokens_per_s_per_gpu"] / a["tokens_per_s"],
                        "speedup": b["tokens_per_s"] / a["tokens_per_s"]}
    return out


def markdown(results: dict) -> str:
    env = results["env"]
    lines = [f"FSDP2 — {env['date']}, {env['gpus']}× {env['gpu']}, torch {env['torch']} (CUDA {env['cuda']}, "
             f"NCCL {env['nccl']}), transformers {env['transformers']}; `PYTORCH_CUDA_ALLOC_CONF={env['alloc_conf']}`,"
             f" `NCCL_NVLS_ENABLE={env['nvls']}`"
             + (" — SMOKE (tiny shapes, CPU + gloo)" if results["smoke"] else "")
             + (f" — {results['layers']} layers only" if results["layers"] else ""), "",
             f"Reproduce: `{results['command']}`.", "",
             "| case | method | GPUs | batch×seq per GPU | checkpointing | tokens/s | tokens/s per GPU | "
             "scaling efficiency | peak GiB per GPU (allocated, max over ranks) | reserved GiB | loss first → last |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    eff = results.get("scaling", {})
    for name, rec in results["cases"].items():
        c = rec["case"]
        ckpt = "on" if c["ckpt"] else "off"
        if "tokens_per_s" not in rec:
            why = rec.get("skipped") or rec.get("error")
            lines.append(f"| {name} | {c['method']} | {c['gpus']} | | {ckpt} | {why} | | | | | |")
            continue
        e = f"{100 * eff[name]['efficiency']:.1f}%" if name in eff else "-"
        finite = "" if rec["loss_finite"] else " (NOT FINITE)"
        lines.append(
            f"| {name} | {c['method']} | {rec['world']} | {rec['batch_per_gpu']}×{rec['seq']} | {ckpt} | "
            f"{rec['tokens_per_s']:,.0f} | {rec['tokens_per_s_per_gpu']:,.0f} | {e} | {_f(rec['peak_gib'])} | "
            f"{_f(rec['reserved_gib'])} | {rec['losses'][0]:.4f} → {rec['losses'][-1]:.4f}{finite} |")
    return "\n".join(lines) + "\n"


def _version(v) -> str:
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def _f(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU with gloo: the script end to end")
    p.add_argument("--layers", type=int, help="override the number of decoder layers (real widths)")
    p.add_argument("--cases", help=f"comma-separated subset of: {', '.join(c.name for c in CASES)}")
    p.add_argument("--batch", type=int, default=4, help="rows per GPU per step")
    p.add_argument("--seq", type=int, default=2048, help="tokens per row")
    p.add_argument("--steps", type=int, help="timed steps per case (default: each case's)")
    p.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "benchmarks" / "results")))
    p.add_argument("--budget", type=float, default=460, help="seconds for all cases; later ones are skipped")
    p.add_argument("--run-case", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run_case:
        case = next(c for c in CASES if c.name == args.run_case)
        rec = run_case(case, args.smoke, args.layers, args.batch, args.seq, args.steps)
        if rec is not None:
            Path(args.json).write_text(json.dumps(rec, indent=1))
        return 0
    run_all(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
