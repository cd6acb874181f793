"""FSDP2 on two GPUs: Llama-3-8B shapes (random weights), LoRA and QLoRA on 1 GPU vs 2, full fine-tuning on 2.

    python benchmarks/fsdp_gpu.py                  # on a 2-GPU machine: every case, results under $OUT
    python benchmarks/fsdp_gpu.py --smoke          # tiny shapes, CPU + gloo, 2 processes: the script end to end
    python benchmarks/fsdp_gpu.py --layers 4       # real widths, 4 layers: a quick check on the GPUs

One command runs every case, each in its own process(es) so its peak memory is its own: 1-GPU cases as a
plain process (what ``tuneforge train`` is on one GPU), 2-GPU cases under ``torchrun --nproc_per_node 2``
with ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` and ``NCCL_NVLS_ENABLE=0`` (NVLink multicast off).
What is measured is the library's own path: ``tuneforge.train.sharding`` shards the model (FSDP2, one unit
per decoder layer + the root), splits the global batch, sums the token count over ranks; the step is the
loop's own (``train.step.train_step``: the chunked loss, bf16 autocast, loss / global trained tokens, clipping,
fused AdamW), with the loss wrapper as the FSDP root.

Weak scaling: every GPU gets the same rows per step (``--batch`` × ``--seq``), so the 2-GPU global batch is twice
the 1-GPU one. Scaling efficiency = (tokens/s per GPU on 2 GPUs) / (tokens/s on 1 GPU). Peaks are
``torch.cuda.max_memory_allocated`` after the build, the maximum over ranks. Weights are random at the real
shapes, built layer by layer on each GPU (benchmarks/qlora_gpu.py's builders; every rank builds the same seeded
weights, then FSDP keeps its shard). LoRA and QLoRA bases are bf16 / NF4 as ``train`` loads them on a GPU; full
fine-tuning keeps fp32 master weights and fp32 AdamW states (sharded) and computes in bf16 autocast.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_runner  # noqa: E402
import qlora_gpu  # noqa: E402  (random-weight builders at real shapes)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from bench_runner import fmt, gib_text, heading, measured_pairs  # noqa: E402
from qlora_gpu import LOSS_CHUNK  # noqa: E402

from tuneforge.data.packing import PackedRow, collate  # noqa: E402
from tuneforge.models.shapes import shape_config  # noqa: E402
from tuneforge.train import distributed, recompute, sharding  # noqa: E402
from tuneforge.train.plan import GIB  # noqa: E402
from tuneforge.train.step import CausalLMLoss, train_step  # noqa: E402


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
    # The dtypes train uses on a GPU, also in the CPU smoke run (so it goes through the same mixed-dtype FSDP
    # units): bf16 compute; a frozen LoRA base and a 4-bit base's other weights in bf16; fp32 for full.
    return qlora_gpu.build_ours(cfg, method, device, compute=torch.bfloat16)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(case: Case, smoke: bool, layers: int | None, batch: int, seq: int, steps: int | None) -> dict | None:
    """Build, shard (on 2+ processes), train warm-up + timed steps; rank 0 returns the record."""
    cuda = torch.cuda.is_available() and not smoke
    world = distributed.world_size()
    batch, seq = (2, 64) if smoke else (batch, seq)
    device = distributed.init(batch * world, torch.device("cuda" if cuda else "cpu"))
    cfg = dict(qlora_gpu.TINY) if smoke else shape_config("llama-3-8b")
    if layers:
        cfg["num_hidden_layers"] = layers
    torch.manual_seed(0)  # LoRA's A init: the same on every rank and in every case
    t0 = time.perf_counter()
    model = build(cfg, case.method, device)
    if case.ckpt:
        recompute.enable(model, "on")
    # autocast as train on a GPU (CPU autocast in the smoke run)
    loss_model = CausalLMLoss(model, LOSS_CHUNK, torch.bfloat16)
    loss_model.train()
    sharding.shard_model(loss_model, device)
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
    params = [p for p in loss_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-5 if case.method == "full" else 2e-4, fused=True)
    warmup, timed = (1, 2) if smoke else (case.warmup, steps or case.steps)
    losses, start = [], time.perf_counter()
    for step in range(warmup + timed):
        if step == warmup:
            sync(device)
            distributed.barrier()
            start = time.perf_counter()
        losses.append(train_step(loss_model, [local], opt, max_grad_norm=1.0, all_sum=distributed.all_sum).loss)
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

def child_command(args: argparse.Namespace, case: Case, json_path: Path) -> list[str]:
    tail = bench_runner.child_args(__file__, case, json_path, args, ("batch", "seq", "smoke", "layers", "steps"))
    if case.gpus == 1:
        return [sys.executable, *tail]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(case.gpus), *tail]


def run_all(args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    env.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off
    env.setdefault("OMP_NUM_THREADS", "1" if args.smoke else "8")
    if args.smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""  # CPU + gloo even on a GPU machine
    gpus = 0 if args.smoke else torch.cuda.device_count()
    machine = {"gpus": gpus, "nccl": _version(torch.cuda.nccl.version()) if gpus else None,
               "nvls": env["NCCL_NVLS_ENABLE"], "alloc_conf": env["PYTORCH_CUDA_ALLOC_CONF"]}
    start = time.perf_counter()
    return bench_runner.run_cases(
        args, "fsdp_gpu.py", {**bench_runner.environment(), **machine}, bench_runner.selected(CASES, args.cases),
        partial(child_command, args), summary_line, markdown,
        lambda cases: {"scaling": scaling(cases), "total_s": time.perf_counter() - start}, env=env,
        skip=lambda case: None if args.smoke or gpus >= case.gpus else f"{gpus} GPU(s) here")


def summary_line(rec: dict) -> str:
    return (f"{rec['tokens_per_s']:,.0f} tok/s ({rec['tokens_per_s_per_gpu']:,.0f}/GPU), "
            f"peak {gib_text(rec.get('peak_gib'))}, loss {rec['losses'][0]:.4f} → {rec['losses'][-1]:.4f}")


def scaling(cases: dict) -> dict:
    """Per-GPU throughput on 2 GPUs over the 1-GPU throughput, for each method measured both ways."""
    return {two: {"vs": one, "efficiency": b["tokens_per_s_per_gpu"] / a["tokens_per_s"],
                  "speedup": b["tokens_per_s"] / a["tokens_per_s"]}
            for one, two, a, b in measured_pairs(cases, PAIRS)}


def markdown(results: dict) -> str:
    env = results["env"]
    title = (f"FSDP2 — {env['date']}, {env['gpus']}× {env['gpu']}, torch {env['torch']} (CUDA {env['cuda']}, "
             f"NCCL {env['nccl']}), transformers {env['transformers']}; `PYTORCH_CUDA_ALLOC_CONF={env['alloc_conf']}`,"
             f" `NCCL_NVLS_ENABLE={env['nvls']}`")
    lines = heading(results, title, ".", "tiny shapes, CPU + gloo") + [
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
            f"{rec['tokens_per_s']:,.0f} | {rec['tokens_per_s_per_gpu']:,.0f} | {e} | {fmt(rec['peak_gib'])} | "
            f"{fmt(rec['reserved_gib'])} | {rec['losses'][0]:.4f} → {rec['losses'][-1]:.4f}{finite} |")
    return "\n".join(lines) + "\n"


def _version(v) -> str:
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def main(argv: list[str] | None = None) -> int:
    p = bench_runner.parser(__doc__, CASES, budget=460, budget_help="seconds for all cases; later ones are skipped",
                            smoke_help="tiny shapes on the CPU with gloo: the script end to end")
    p.add_argument("--batch", type=int, default=4, help="rows per GPU per step")
    p.add_argument("--seq", type=int, default=2048, help="tokens per row")
    p.add_argument("--steps", type=int, help="timed steps per case (default: each case's)")
    args = p.parse_args(argv)
    if args.run_case:
        rc = bench_runner.run_child(
            args, CASES, lambda case: run_case(case, args.smoke, args.layers, args.batch, args.seq, args.steps))
        distributed.barrier()  # rank 0 has written the record: now every process may exit (as train ends)
        return rc
    run_all(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
