"""GPU DPO speed: tuneforge's preference step against TRL's DPOTrainer, one call, each case in its own process.

    python benchmarks/dpo_gpu.py                 # every case, two rounds each, results under $OUT
    python benchmarks/dpo_gpu.py --smoke         # tiny shapes on a CPU: the script runs end to end
    python benchmarks/dpo_gpu.py --layers 2      # real widths, 2 layers: a quick check of every case

Random weights at the Llama-3-8B shape, built layer by layer (``qlora_gpu.build_ours``, ``speed_gpu.build``), LoRA
r=16 on all 7 projections, bf16. Each step is DPO (sigmoid, beta 0.1) on the same seeded batch: 2 pairs, a 1,024-token
prompt and two 1,024-token answers, so 4 sequences of 2,048 tokens (8,192 tokens) go through the policy and, with
adapters off, through the reference. tuneforge runs ``train``'s step (``train.step.train_step`` on a
``PreferenceLoss``: both answers in one forward, the fused chunked log-probs). The peer is TRL's DPOTrainer at its
fastest setting that fits: gradient checkpointing off, its own fused LM head (no full logits), reference = PEFT
adapters off, with and without Liger's layer kernels (``use_liger_kernel``; TRL 1.16 has padding-free DPO disabled).
Its step is ``trainer.compute_loss`` + backward + clip + AdamW, the parts Trainer.training_step times.

The ``-shared`` cases are tuneforge with each pair as one document ``[prompt | chosen | rejected]`` (``collate_pairs``
with ``share_prompt``, a FlexAttention mask that keeps the answers apart): the prompt runs once, 6,144 tokens computed
per pass instead of 8,192. Tokens/s count the logical 8,192 policy tokens per step (2 pairs × (prompt + chosen +
prompt + rejected)) in every case, the peer's unit; pairs/s is the same rate per pair. The first step's chosen
log-prob is reported by every case as a check that they saw the same batch.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_runner  # noqa: E402
import torch  # noqa: E402
from bench_runner import fmt, gib_text, heading, measured_pairs, ratios  # noqa: E402
from qlora_gpu import LOSS_CHUNK, TINY, build_ours, gib, sync  # noqa: E402
from speed_gpu import build_peer_dense  # noqa: E402

from tuneforge.data.conversation import Tokenized  # noqa: E402
from tuneforge.data.preference import TokenizedPair, collate_pairs  # noqa: E402
from tuneforge.models.shapes import shape_config  # noqa: E402
from tuneforge.train.attention import use_document_attention  # noqa: E402
from tuneforge.train.kernels import apply_kernels  # noqa: E402
from tuneforge.train.preference import PreferenceSettings  # noqa: E402
from tuneforge.train.step import PreferenceLoss, train_step  # noqa: E402

BETA = 0.1


@dataclass(frozen=True)
class Case:
    name: str
    impl: str  # ours | peer
    shape: str = "llama-3-8b"
    method: str = "lora"
    pairs: int = 2
    prompt: int = 1024
    answer: int = 1024
    liger: bool = False
    share_prompt: bool = False
    warmup: int = 2
    steps: int = 5
    optional: bool = False
    seconds: int = 60


CASES = [
    Case("peer-8b-dpo-lora", "peer"),
    Case("peer-8b-dpo-lora-liger", "peer", liger=True),
    Case("ours-8b-dpo-lora", "ours"),
    Case("ours-8b-dpo-lora-liger", "ours", liger=True),
    Case("ours-8b-dpo-lora-shared", "ours", share_prompt=True),
    Case("ours-8b-dpo-lora-liger-shared", "ours", liger=True, share_prompt=True),
]
ROUNDS = 2
COMPARE = [("ours-8b-dpo-lora-liger-shared", "peer-8b-dpo-lora-liger"), ("ours-8b-dpo-lora-shared", "peer-8b-dpo-lora"),
           ("ours-8b-dpo-lora-shared", "peer-8b-dpo-lora-liger"),
           ("ours-8b-dpo-lora-liger", "peer-8b-dpo-lora-liger"), ("ours-8b-dpo-lora", "peer-8b-dpo-lora"),
           ("ours-8b-dpo-lora", "peer-8b-dpo-lora-liger"), ("ours-8b-dpo-lora-liger", "peer-8b-dpo-lora")]


# --- the batch: the same seeded ids for both, in each one's layout ------------------------------------

def pair_ids(cfg: dict, case: Case, smoke: bool) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) token ids of each pair, seeded."""
    n, p, a = (2, 16, 16) if smoke else (case.pairs, case.prompt, case.answer)
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, cfg["vocab_size"], (n, p + 2 * a), generator=g).tolist()
    return [(row[:p], row[p:p + a], row[p + a:]) for row in ids]


def ours_batch(pairs: list, share_prompt: bool) -> dict:
    """tuneforge's layout: rows [chosen_0, rejected_0, ...], -100 on the prompt; or, sharing the prompt, one row
    [prompt | chosen | rejected] per pair."""
    def side(prompt, answer):
        return Tokenized(prompt + answer, [-100] * len(prompt) + answer)
    tokenized = [TokenizedPair(side(p, c), side(p, r), len(p)) for p, c, r in pairs]
    return collate_pairs(tokenized, pad_id=0, share_prompt=share_prompt)


def peer_batch(pairs: list) -> dict:
    """TRL's layout: every chosen row, then every rejected row; ``completion_mask`` marks the answers."""
    rows = [p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs]
    mask = [[0] * len(p) + [1] * len(c) for p, c, _ in pairs] + [[0] * len(p) + [1] * len(r) for p, _, r in pairs]
    ids = torch.tensor(rows)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": torch.tensor(mask)}


# --- steps -----------------------------------------------------------------------------------------

def ours_step(model, device: torch.device):
    amp = torch.bfloat16 if device.type == "cuda" else None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-5, fused=device.type == "cuda")
    loss_model = PreferenceLoss(model, PreferenceSettings("dpo", beta=BETA, reference="adapters_off",
                                                          chunk_tokens=LOSS_CHUNK), amp)
    loss_model.train()

    def step(batch):
        result = train_step(loss_model, [batch], opt, max_grad_norm=1.0)
        return result.loss, result.metrics["logps/chosen"]
    return step


def tiny_tokenizer():
    """TRL needs a tokenizer to build its trainer; the batches are given as ids, so a small byte-level one does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["hello world"] * 4, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                                     special_tokens=["<pad>", "<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def peer_step(model, case: Case, device: torch.device):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    cuda = device.type == "cuda"
    args = DPOConfig(output_dir=tempfile.mkdtemp(prefix="dpo_peer_"), report_to=[], beta=BETA, loss_type=["sigmoid"],
                     per_device_train_batch_size=case.pairs, gradient_checkpointing=False, bf16=cuda,
                     use_cpu=not cuda, use_liger_kernel=case.liger, learning_rate=5e-5, max_length=None,
                     save_strategy="no", logging_strategy="no")
    data = Dataset.from_list([{"prompt": "hello", "chosen": "world", "rejected": "hello"}] * 2)
    trainer = DPOTrainer(model=model, ref_model=None, args=args, processing_class=tiny_tokenizer(),
                         train_dataset=data)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-5, fused=cuda)
    model.train()

    def step(batch):
        inputs = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = trainer.compute_loss(model, inputs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach()), trainer._metrics["train"]["logps/chosen"][-1]
    return step


def build(case: Case, cfg: dict, device: torch.device):
    if case.impl == "ours":
        model = build_ours(cfg, case.method, device)
        if case.liger:
            apply_kernels(model, "liger", device)
        if case.share_prompt:  # as train() does for packed pairs: the mask is block-sparse on a GPU
            use_document_attention(model, device)
        return model
    if case.liger:  # before the model's classes are used; TRL's fused head replaces Liger's loss
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(fused_linear_cross_entropy=False, cross_entropy=False)
    return build_peer_dense(cfg, case.method, device)


def run_case(case: Case, smoke: bool, layers: int | None) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = dict(TINY) if smoke else shape_config(case.shape)
    if layers:
        cfg["num_hidden_layers"] = layers
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build(case, cfg, device)
    out: dict = {"build_s": time.perf_counter() - t0, "config": cfg}
    pairs = pair_ids(cfg, case, smoke)
    batch = ours_batch(pairs, case.share_prompt) if case.impl == "ours" else peer_batch(pairs)
    tokens = sum(len(p) + len(c) + len(p) + len(r) for p, c, r in pairs)  # logical: the prompt counted per answer
    computed = int((batch["seq_ids"] >= 0).sum()) if case.impl == "ours" else int(batch["attention_mask"].sum())
    out["attention"] = model.config._attn_implementation
    sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        out["weights_gib"] = gib(device, "memory_allocated")
        torch.cuda.reset_peak_memory_stats(device)
    step = ours_step(model, device) if case.impl == "ours" else peer_step(model, case, device)
    first = [step(batch) for _ in range(1 if smoke else case.warmup)]
    sync(device)
    t1 = time.perf_counter()
    timed = [step(batch) for _ in range(2 if smoke else case.steps)]
    sync(device)
    seconds = time.perf_counter() - t1
    out.update(losses=[x[0] for x in first + timed], logps_chosen0=first[0][1], seconds=seconds,
               tokens_per_s=tokens * len(timed) / seconds, tokens_per_step=tokens, computed_tokens_per_step=computed,
               pairs_per_s=len(pairs) * len(timed) / seconds,
               peak_gib=gib(device, "max_memory_allocated"), reserved_gib=gib(device, "max_memory_reserved"))
    return out


# --- orchestration ---------------------------------------------------------------------------------

def _median(values: list[float]) -> float:
    values, mid = sorted(values), len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def merge_round(first: dict | None, rec: dict) -> dict:
    """Keep every round's speeds and peak; report the median speeds and the largest peak."""
    rounds = (first or {}).get("rounds", []) + [{k: rec.get(k) for k in ("tokens_per_s", "pairs_per_s", "peak_gib")}]
    measured = [r for r in rounds if r.get("tokens_per_s")]
    peaks = [r["peak_gib"] for r in rounds if r.get("peak_gib") is not None]
    merged = {**(first or rec), "rounds": rounds}
    if measured:
        merged["tokens_per_s"] = _median([r["tokens_per_s"] for r in measured])
        merged["pairs_per_s"] = _median([r["pairs_per_s"] for r in measured])
    merged["peak_gib"] = max(peaks) if peaks else None
    return merged


def run_all(args) -> dict:
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

    def command(case: Case, path: Path) -> list[str]:
        return [sys.executable, *bench_runner.child_args(__file__, case, path, args, ("smoke", "layers"))]

    cases = bench_runner.selected(CASES, args.cases) * ROUNDS  # round 2 of every case after round 1 of all
    return bench_runner.run_cases(args, "dpo_gpu.py", bench_runner.environment(["trl", "liger-kernel"]), cases,
                                  command, summary_line, markdown, lambda c: {"comparisons": compare(c)},
                                  reserve=25, merge=merge_round, skip=skip)


def skip(case: Case) -> str | None:
    return "Liger's kernels need a CUDA GPU" if case.liger and not torch.cuda.is_available() else None


def summary_line(rec: dict) -> str:
    return (f"{rec['tokens_per_s']:,.0f} tok/s, {rec['pairs_per_s']:.3f} pairs/s, "
            f"peak {gib_text(rec.get('peak_gib'))}, first loss {rec['losses'][0]:.4f}, "
            f"first logps/chosen {rec['logps_chosen0']:.2f}")


def compare(cases: dict) -> dict:
    return {f"{ours} / {peer}": {**ratios(a, b), "logps_chosen0": [a["logps_chosen0"], b["logps_chosen0"]]}
            for ours, peer, a, b in measured_pairs(cases, COMPARE)}


def markdown(results: dict) -> str:
    env = results["env"]
    title = (f"GPU DPO speed — {env['date']}, {env['gpu']}, torch {env['torch']}, transformers {env['transformers']}, "
             f"peft {env['peft']}, trl {env['trl']}, liger-kernel {env['liger_kernel']}")
    lines = heading(results, title, " (median of the rounds)") + [
        "| case | kernels | layout | tokens/step (computed) | tokens/s (rounds) | pairs/s | peak GiB | first loss "
        "| first logps/chosen |",
        "|---|---|---|---|---|---|---|---|---|"]
    for name, rec in results["cases"].items():
        c = rec["case"]
        kernels = "Liger" if c["liger"] else "torch"
        layout = "prompt once" if c.get("share_prompt") else "prompt per answer"
        if "tokens_per_s" not in rec:
            lines.append(f"| {name} | {kernels} | {layout} | | {rec.get('skipped') or rec.get('error')} | | | | |")
            continue
        each = ", ".join(f"{r['tokens_per_s']:,.0f}" for r in rec.get("rounds", []) if r.get("tokens_per_s"))
        lines.append(f"| {name} | {kernels} | {layout} | {rec['tokens_per_step']:,} "
                     f"({rec['computed_tokens_per_step']:,}) | {rec['tokens_per_s']:,.0f} ({each}) | "
                     f"{rec['pairs_per_s']:.3f} | {fmt(rec['peak_gib'])} | {rec['losses'][0]:.4f} | "
                     f"{rec['logps_chosen0']:.2f} |")
    lines += ["", "tokens/s count the logical policy tokens of a step (every pair's prompt once per answer, the unit "
              "of TRL's DPOTrainer) in every case; computed: the tokens a pass runs through the model."]
    comps = results.get("comparisons", {})
    if comps:
        lines += ["", "| tuneforge / TRL (same call) | speed | peak memory |", "|---|---|---|"]
        for name, c in comps.items():
            peak = f"{c['peak_ratio']:.2f}×" if c["peak_ratio"] else "-"
            lines.append(f"| {name} | {c['speed_ratio']:.2f}× | {peak} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = bench_runner.parser(__doc__, CASES, budget=560).parse_args(argv)
    if args.run_case:
        torch.set_num_threads(min(8, os.cpu_count() or 1))
        return bench_runner.run_child(args, CASES, lambda case: run_case(case, args.smoke, args.layers))
    run_all(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
