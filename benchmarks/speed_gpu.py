"""GPU training speed: tuneforge against HF transformers + PEFT (and + Liger kernels, + bitsandbytes), one call.

    python benchmarks/speed_gpu.py --prepare       # once, where ../shared/data exists: tokenize the P3 workload
    python benchmarks/speed_gpu.py                 # every case, one subprocess each, results under $OUT
    python benchmarks/speed_gpu.py --smoke         # tiny shapes on a CPU: the script runs end to end
    python benchmarks/speed_gpu.py --layers 2      # real widths, 2 layers: a quick check of every case

Cases (random weights at the real Llama-3 shapes, the same seeded weights and batch for both sides): 8B LoRA
r=16 on all 7 projections 4×2048 (peers HF+PEFT and HF+PEFT+Liger, each with checkpointing off — its fastest
setting that fits — and on, the memory-matched row); the same with QLoRA (bitsandbytes NF4 + double quant, +
Liger); 1B full fine-tuning 8×2048 (HF, HF+Liger); and a real SFT workload: P3 examples tokenized by tuneforge's
pipeline (their real lengths and response-only labels), the peer with per-batch dynamic padding, tuneforge with
packing and document masks. Unsloth (``unsloth-*``, its packages from ``.whl/unsloth`` in their own site folder,
``UNSLOTH_SITE``) loads the same seeded weights from an HF folder written once. tuneforge's speed options run as
cases of their own: the FP8 base (``precision="fp8"``), compiled decoder layers (``compile``), bf16 weights with
compensated AdamW for full fine-tuning (``weights``). Cases in ``ROUND_TWO`` run again after all others
(``--rounds 2``, the default); their figure is the median with the range.
tuneforge runs what ``train`` runs: its step (``train.step.train_step``), its
attention choice, and the recomputation mode its planner picks (``auto``) unless the case names one. Tokens/s
count real (non-pad) tokens; MFU is model FLOPs (4·params per token for a frozen base, 6· for full, plus causal
attention) over 989 TFLOP/s (H200 dense bf16).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
if "--run-case" in sys.argv and sys.argv[sys.argv.index("--run-case") + 1].startswith("unsloth"):
    import unsloth  # noqa: F401  (before transformers, which it patches)

import bench_runner  # noqa: E402
import torch  # noqa: E402
from bench_runner import fmt, gib_text, heading, measured_pairs, ratios  # noqa: E402
from qlora_gpu import (  # noqa: E402
    LORA_ALPHA,
    LORA_R,
    LOSS_CHUNK,
    TINY,
    build_ours,
    build_peer,
    decoder_weights,
    gib,
    materialize_dense,
    skeleton,
    sync,
)

from tuneforge.config import RunConfig  # noqa: E402
from tuneforge.models.shapes import PROJECTIONS, shape_config  # noqa: E402
from tuneforge.train import recompute as recomputation  # noqa: E402
from tuneforge.train.attention import use_document_attention  # noqa: E402
from tuneforge.train.kernels import apply_kernels  # noqa: E402
from tuneforge.train.plan import GIB, choose_recompute  # noqa: E402
from tuneforge.train.recompute import OffloadedActivations  # noqa: E402
from tuneforge.train.step import CausalLMLoss, train_step  # noqa: E402

PEAK_FLOPS = 989e12
WORKLOAD = ROOT / ".bench" / "p3_workload.json"
P3_DIR = ROOT.parent / "shared" / "data" / "p3"


@dataclass(frozen=True)
class Case:
    name: str
    impl: str  # ours | peer
    shape: str
    method: str = "lora"  # lora | qlora | full
    batch: int = 4
    seq: int = 2048
    recompute: str = "auto"  # ours: auto/off/on/offload; peer: on/off
    liger: bool = False
    workload: str = "fixed"  # fixed (random tokens, full rows) | p3 (real lengths)
    warmup: int = 2
    steps: int = 5
    optional: bool = False
    seconds: int = 45
    precision: str = "bf16"  # ours, lora/qlora: the base's GEMMs in bf16 or fp8 (method.lora.base_precision)
    compile: bool = False  # ours: train.compile (each decoder layer torch.compiled)
    compile_mode: str | None = None  # ours, compiled: torch.compile's mode (reduce-overhead: CUDA graphs)
    weights: str = "fp32_master"  # ours, full: train.weights (bf16_kahan: bf16 weights, compensated AdamW)
    profile: bool = False  # CUDA time by kernel family over two steps (after the warm-up, before timing)
    fused_lora: bool = True  # ours: the LoRA layers' training op (methods/lora_ops.py); False: the autograd path
    grouped: bool = True  # ours, lora/qlora: q/k/v and gate/up share one LoRA-A GEMM (methods/lora_groups.py)
    memory: bool = False  # what the allocations of one step alive at its peak are (after the warm-up)


CASES = [
    Case("peer-8b-lora", "peer", "llama-3-8b", recompute="on"),
    Case("peer-8b-lora-liger", "peer", "llama-3-8b", recompute="on", liger=True),
    # the peer's fastest setting that fits an H200: no recomputation (the rows above are memory-matched)
    Case("peer-8b-lora-off", "peer", "llama-3-8b", recompute="off"),
    Case("peer-8b-lora-liger-off", "peer", "llama-3-8b", recompute="off", liger=True),
    Case("ours-8b-lora", "ours", "llama-3-8b"),
    Case("ours-8b-lora-liger", "ours", "llama-3-8b", liger=True),
    Case("ours-8b-lora-lean", "ours", "llama-3-8b", recompute="offload"),
    Case("ours-8b-lora-lean-liger", "ours", "llama-3-8b", recompute="offload", liger=True),
    Case("peer-8b-qlora", "peer", "llama-3-8b", method="qlora", recompute="on"),
    Case("peer-8b-qlora-liger", "peer", "llama-3-8b", method="qlora", recompute="on", liger=True),
    Case("ours-8b-qlora", "ours", "llama-3-8b", method="qlora", recompute="on"),
    Case("ours-8b-qlora-liger", "ours", "llama-3-8b", method="qlora", recompute="on", liger=True),
    Case("ours-8b-qlora-offload", "ours", "llama-3-8b", method="qlora", recompute="offload", liger=True),
    Case("peer-1b-full", "peer", "llama-3.2-1b", method="full", batch=8, recompute="on"),
    Case("peer-1b-full-liger", "peer", "llama-3.2-1b", method="full", batch=8, recompute="on", liger=True),
    Case("peer-1b-full-liger-off", "peer", "llama-3.2-1b", method="full", batch=8, recompute="off", liger=True),
    Case("ours-1b-full", "ours", "llama-3.2-1b", method="full", batch=8),
    Case("ours-1b-full-liger", "ours", "llama-3.2-1b", method="full", batch=8, liger=True),
    Case("peer-8b-p3", "peer", "llama-3-8b", recompute="off", workload="p3", batch=16, seconds=60),
    Case("ours-8b-p3", "ours", "llama-3-8b", workload="p3", seconds=60),
    Case("ours-8b-p3-dense", "ours", "llama-3-8b", workload="p3", optional=True, seconds=60),
    Case("profile-ours-8b-lora", "ours", "llama-3-8b", warmup=2, steps=2, optional=True, profile=True),
    # speed work, each change on its own: an FP8 base, compiled decoder layers, both
    Case("ours-8b-lora-fp8", "ours", "llama-3-8b", liger=True, precision="fp8"),
    Case("ours-8b-lora-compile", "ours", "llama-3-8b", compile=True, warmup=3, seconds=90),
    Case("ours-8b-lora-fp8-compile", "ours", "llama-3-8b", precision="fp8", compile=True, warmup=3, seconds=90),
    Case("ours-8b-p3-liger", "ours", "llama-3-8b", workload="p3", liger=True, seconds=60),
    Case("ours-8b-p3-fp8", "ours", "llama-3-8b", workload="p3", precision="fp8", compile=True, seconds=60),
    Case("ours-1b-full-kahan", "ours", "llama-3.2-1b", method="full", batch=8, liger=True, weights="bf16_kahan"),
    Case("ours-1b-full-kahan-compile", "ours", "llama-3.2-1b", method="full", batch=8, weights="bf16_kahan",
         compile=True, seconds=90),
    Case("ours-8b-qlora-fast", "ours", "llama-3-8b", method="qlora", liger=True),  # the planner's choice (off)
    Case("ours-8b-qlora-compile", "ours", "llama-3-8b", method="qlora", compile=True, warmup=3, seconds=90),
    Case("ours-8b-qlora-fp8-compile", "ours", "llama-3-8b", method="qlora", precision="fp8", compile=True, warmup=3,
         seconds=90),
    # CUDA graphs for the compiled layers (torch.compile's reduce-overhead) measured on its own
    Case("ours-8b-lora-compile-graphs", "ours", "llama-3-8b", compile=True, compile_mode="reduce-overhead", warmup=4,
         seconds=90),
    Case("ours-8b-lora-fp8-compile-graphs", "ours", "llama-3-8b", precision="fp8", compile=True,
         compile_mode="reduce-overhead", warmup=4, seconds=90),
    # grouped q/k/v and gate/up LoRA A (methods/lora_groups.py) measured on its own: the same steps ungrouped
    Case("ours-8b-lora-compile-ungrouped", "ours", "llama-3-8b", compile=True, warmup=3, seconds=90, grouped=False),
    Case("ours-8b-lora-fp8-compile-ungrouped", "ours", "llama-3-8b", precision="fp8", compile=True, warmup=3,
         seconds=90, grouped=False),
    # where the memory of a QLoRA step goes, ours and the peer's (allocations alive at the step's peak)
    Case("memory-8b-qlora-fp8-compile", "ours", "llama-3-8b", method="qlora", precision="fp8", compile=True, warmup=3,
         seconds=30, memory=True),
    Case("memory-peer-8b-qlora-liger-off", "peer", "llama-3-8b", method="qlora", recompute="off", liger=True,
         seconds=30, memory=True),
    # the LoRA training op (dense bases) measured on its own: the same compiled step through autograd's LoRA path
    Case("ours-8b-lora-compile-autograd", "ours", "llama-3-8b", compile=True, warmup=3, seconds=90, fused_lora=False),
    # where the time goes in the fastest configurations (profiled after the warm-up, then timed as usual)
    Case("profile-8b-lora-compile", "ours", "llama-3-8b", compile=True, warmup=3, seconds=90, profile=True),
    Case("profile-8b-lora-fp8-compile", "ours", "llama-3-8b", precision="fp8", compile=True, warmup=3, seconds=90,
         profile=True),
    Case("profile-8b-qlora-compile", "ours", "llama-3-8b", method="qlora", compile=True, warmup=3, seconds=90,
         profile=True),
    Case("profile-1b-full-kahan-compile", "ours", "llama-3.2-1b", method="full", batch=8, weights="bf16_kahan",
         compile=True, seconds=90, profile=True),
    Case("peer-8b-qlora-liger-off", "peer", "llama-3-8b", method="qlora", recompute="off", liger=True),
    # Unsloth (unsloth + unsloth_zoo from .whl/unsloth, loaded from a random HF directory of the same weights)
    Case("unsloth-8b-lora", "unsloth", "llama-3-8b", recompute="off", seconds=120),
    Case("unsloth-8b-lora-on", "unsloth", "llama-3-8b", recompute="on", seconds=90),
    Case("unsloth-8b-qlora", "unsloth", "llama-3-8b", method="qlora", recompute="off", seconds=120),
    Case("unsloth-8b-qlora-on", "unsloth", "llama-3-8b", method="qlora", recompute="on", seconds=120),
    Case("unsloth-8b-p3", "unsloth", "llama-3-8b", recompute="off", workload="p3", batch=16, seconds=90),
]
COMPARE = [("ours-8b-lora-liger", "peer-8b-lora-liger-off"), ("ours-8b-lora", "peer-8b-lora-liger-off"),
           ("ours-8b-lora", "peer-8b-lora-off"), ("ours-1b-full-liger", "peer-1b-full-liger-off"),
           ("ours-8b-lora", "peer-8b-lora-liger"), ("ours-8b-lora", "peer-8b-lora"),
           ("ours-8b-lora-liger", "peer-8b-lora-liger"), ("ours-8b-lora-lean", "peer-8b-lora-liger"),
           ("ours-8b-lora-lean-liger", "peer-8b-lora-liger"),
           ("ours-8b-qlora", "peer-8b-qlora-liger"), ("ours-8b-qlora-liger", "peer-8b-qlora-liger"),
           ("ours-8b-qlora-offload", "peer-8b-qlora-liger"), ("ours-8b-qlora", "peer-8b-qlora"),
           ("ours-1b-full", "peer-1b-full-liger"), ("ours-1b-full-liger", "peer-1b-full-liger"),
           ("ours-1b-full", "peer-1b-full"), ("ours-8b-p3", "peer-8b-p3"), ("ours-8b-p3-dense", "peer-8b-p3"),
           ("ours-8b-lora-fp8", "peer-8b-lora-liger-off"), ("ours-8b-lora-compile", "peer-8b-lora-liger-off"),
           ("ours-8b-lora-fp8-compile", "peer-8b-lora-liger-off"), ("ours-8b-lora-liger", "unsloth-8b-lora"),
           ("ours-8b-lora-fp8", "unsloth-8b-lora"), ("ours-8b-lora-fp8-compile", "unsloth-8b-lora"),
           ("ours-8b-lora-compile", "unsloth-8b-lora"), ("ours-8b-qlora-offload", "unsloth-8b-qlora"),
           ("ours-8b-qlora-fast", "unsloth-8b-qlora"), ("ours-8b-qlora-fast", "peer-8b-qlora-liger-off"),
           ("ours-8b-qlora-offload", "unsloth-8b-qlora-on"),
           ("ours-8b-p3-liger", "unsloth-8b-p3"), ("ours-8b-p3-fp8", "unsloth-8b-p3"),
           ("ours-8b-p3-liger", "peer-8b-p3"), ("ours-8b-p3-fp8", "peer-8b-p3"),
           ("ours-1b-full-kahan", "peer-1b-full-liger-off"), ("ours-1b-full-kahan-compile", "peer-1b-full-liger-off"),
           ("ours-1b-full-kahan", "peer-1b-full-liger"), ("ours-8b-lora-compile", "ours-8b-lora-compile-autograd"),
           ("ours-8b-qlora-compile", "peer-8b-qlora-liger-off"),
           ("ours-8b-qlora-fp8-compile", "peer-8b-qlora-liger-off"),
           ("ours-8b-qlora-compile", "unsloth-8b-qlora"), ("ours-8b-qlora-fp8-compile", "unsloth-8b-qlora")]
# cases measured again after all others (round 2, interleaved): each figure is the median with the range
ROUND_TWO = ["peer-8b-lora-liger-off", "ours-8b-lora-liger", "ours-8b-lora-fp8", "ours-8b-lora-compile",
             "ours-8b-lora-fp8-compile", "unsloth-8b-lora"]


# --- workload ------------------------------------------------------------------------------------

def prepare_workload(n: int = 1024, seed: int = 0) -> Path:
    """Tokenize ``n`` random P3 examples (all templates) with tuneforge's pipeline; save ids and labels."""
    from tuneforge.config import DataConfig, DatasetSpec
    from tuneforge.data.dataset import encode_all, read_spec
    from tuneforge.errors import DataError
    from tuneforge.models.load import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    cfg = DataConfig(max_seq_len=2048, skip_bad=True)
    examples, skipped = [], []
    for path in sorted(P3_DIR.glob("*.jsonl")):
        try:
            more, bad = read_spec(DatasetSpec(path=str(path)), True, seed)
        except DataError as e:  # P3 ships a few empty templates
            print(f"skipped: {e}")
            continue
        examples += more
        skipped += bad
    random.Random(seed).shuffle(examples)
    tokenized = encode_all(examples[: n + n // 4], tokenizer, cfg, skipped)[:n]
    WORKLOAD.parent.mkdir(exist_ok=True)
    lengths = sorted(len(t.input_ids) for t in tokenized)
    WORKLOAD.write_text(json.dumps({"source": f"{len(list(P3_DIR.glob('*.jsonl')))} P3 templates, seed {seed}",
                                    "examples": [[t.input_ids, t.labels] for t in tokenized]}))
    print(f"{len(tokenized)} examples, tokens {sum(lengths):,}, length p50 {lengths[len(lengths) // 2]}, "
          f"p90 {lengths[int(len(lengths) * 0.9)]}, max {lengths[-1]} -> {WORKLOAD}")
    return WORKLOAD


def load_workload(smoke: bool, vocab: int) -> list:
    from tuneforge.data.conversation import Tokenized

    if smoke and not WORKLOAD.exists():
        g = random.Random(0)
        lengths = [g.randint(5, 60) for _ in range(24)]
        return [Tokenized([g.randrange(vocab) for _ in range(n)], [-100] * (n // 2) + [1] * (n - n // 2))
                for n in lengths]
    data = json.loads(WORKLOAD.read_text())
    out = [Tokenized([i % vocab for i in ids], [-100 if x == -100 else x % vocab for x in labels])
           for ids, labels in data["examples"]]
    return [Tokenized(t.input_ids[:60], t.labels[:60]) for t in out[:48]] if smoke else out


def peer_batches(examples: list, batch: int, pad_id: int = 0) -> list[dict]:
    """HF-style dynamic padding: each batch padded (right) to its longest example."""
    out = []
    for i in range(0, len(examples), batch):
        group = examples[i:i + batch]
        n = max(len(e.input_ids) for e in group)
        ids = torch.full((len(group), n), pad_id)
        labels = torch.full((len(group), n), -100)
        mask = torch.zeros((len(group), n), dtype=torch.long)
        for b, e in enumerate(group):
            k = len(e.input_ids)
            ids[b, :k], labels[b, :k], mask[b, :k] = torch.tensor(e.input_ids), torch.tensor(e.labels), 1
        out.append({"input_ids": ids, "labels": labels, "attention_mask": mask, "real": int(mask.sum())})
    return out


def ours_batches(examples: list, rows_per_batch: int, seq: int, pad_id: int = 0) -> list[dict]:
    """tuneforge's packing of the same examples into rows of ``seq`` tokens."""
    from tuneforge.data.packing import collate, pack

    rows = pack(examples, seq)
    out = []
    for i in range(0, len(rows), rows_per_batch):
        b = collate(rows[i:i + rows_per_batch], pad_id)
        b["real"] = int((b["seq_ids"] >= 0).sum())
        out.append(b)
    return out


def fixed_batch(cfg: dict, batch: int, seq: int, impl: str) -> dict:
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(1234))
    if impl == "peer":
        return {"input_ids": ids, "labels": ids, "real": ids.numel()}
    zeros = torch.zeros_like(ids)
    return {"input_ids": ids, "labels": ids, "seq_ids": zeros, "real": ids.numel(),
            "position_ids": torch.arange(seq).expand(batch, seq).contiguous()}


# --- models --------------------------------------------------------------------------------------

def build_peer_dense(cfg: dict, method: str, device: torch.device):
    """HF Llama in bf16 with PEFT LoRA on the 7 projections (lora) or all weights trainable (full)."""
    from peft import LoraConfig, get_peft_model

    from tuneforge.quant.linear4bit import set_submodule

    model = skeleton(cfg, torch.bfloat16)
    materialize_dense(model, device, torch.bfloat16)
    for path, w in decoder_weights(model, device):
        layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        layer.weight = torch.nn.Parameter(w, requires_grad=False)
        set_submodule(model, path, layer)
    if method == "full":
        return model.requires_grad_(True)
    config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=list(PROJECTIONS),
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def random_model_dir(cfg: dict, device: torch.device) -> Path:
    """The seeded random weights every case uses, saved once as an HF directory (with SmolLM2's tokenizer, from
    ``.bench/tokenizer``) for what loads only from disk: Unsloth, and ``tuneforge train``."""
    import shutil

    from tuneforge.quant.linear4bit import set_submodule

    path = Path(os.environ.get("TF_RANDOM_DIR", "/tmp")) / f"random-{cfg['num_hidden_layers']}l-{cfg['hidden_size']}"
    if (path / "done").exists():
        return path
    model = skeleton(cfg, torch.bfloat16)
    materialize_dense(model, device, torch.bfloat16)
    for name, w in decoder_weights(model, device):
        layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        layer.weight = torch.nn.Parameter(w, requires_grad=False)
        set_submodule(model, name, layer)
    model.save_pretrained(path, max_shard_size="5GB")
    for f in (ROOT / ".bench" / "tokenizer").iterdir():
        shutil.copy(f, path / f.name)
    (path / "done").write_text("")
    del model
    torch.cuda.empty_cache()
    return path


def build_unsloth(case: Case, cfg: dict, device: torch.device):
    """Unsloth's FastLanguageModel on the same weights, its LoRA on the 7 projections (dropout 0, no bias: its fast
    LoRA kernels), its own checkpointing (``"unsloth"``, offloaded) for ``recompute="on"``."""
    from unsloth import FastLanguageModel

    path = random_model_dir(cfg, device)
    t0 = time.perf_counter()
    model, _ = FastLanguageModel.from_pretrained(str(path), max_seq_length=case.seq, dtype=torch.bfloat16,
                                                 load_in_4bit=case.method == "qlora")
    model.unsloth_load_s = time.perf_counter() - t0
    return FastLanguageModel.get_peft_model(model, r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                            target_modules=list(PROJECTIONS), bias="none", random_state=0,
                                            use_gradient_checkpointing="unsloth" if case.recompute == "on" else False)


def build(case: Case, cfg: dict, device: torch.device):
    if case.impl == "unsloth":
        return build_unsloth(case, cfg, device)
    if case.impl == "ours":
        if not case.fused_lora:
            from tuneforge.methods.lora import LoRALinear

            LoRALinear._fused_adapter = lambda self, x: None
        model = build_ours(cfg, case.method, device)
        if case.precision == "fp8":
            from tuneforge.methods.setup import to_fp8_base

            to_fp8_base(model, device)
        if case.grouped and case.method != "full":
            from tuneforge.methods.lora_groups import group_projections

            group_projections(model)
        if case.weights != "fp32_master":
            from tuneforge.train.optimizer import to_bf16_weights

            to_bf16_weights(model)
        return model
    if case.liger:  # before the model's classes are used: Liger patches them (loss included)
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()
    return build_peer(cfg, device) if case.method == "qlora" else build_peer_dense(cfg, case.method, device)


def ours_recompute(case: Case, device: torch.device, batch: int, seq: int) -> str:
    """The mode ``train`` would use: the planner's choice for ``auto``."""
    config = RunConfig.model_validate({
        "model": case.shape, "method": {"name": case.method, "lora": {"r": LORA_R, "alpha": LORA_ALPHA}},
        "data": {"max_seq_len": seq}, "train": {"batch_size": batch, "gradient_checkpointing": case.recompute}})
    return choose_recompute(config, device)


# --- steps ---------------------------------------------------------------------------------------

def step_fn(case: Case, model, device: torch.device, recompute: str):
    """One optimizer step on a batch, returning its loss: ``train_step`` for ours, HF's loss for the peer."""
    amp = torch.bfloat16 if device.type == "cuda" else None
    params = [p for p in model.parameters() if p.requires_grad]
    lr = 1e-5 if case.method == "full" else 2e-4
    opt = torch.optim.AdamW(params, lr=lr, fused=device.type == "cuda")
    if case.impl == "ours":
        from tuneforge.train.optimizer import build_optimizer

        opt = build_optimizer(params, lr, 0.0, case.weights, "fp32", device)
        offload = OffloadedActivations() if recompute == "offload" else None
        loss_model = CausalLMLoss(model, LOSS_CHUNK, amp, offload)
        graphs = case.compile_mode in ("reduce-overhead", "max-autotune")  # the modes that use CUDA graphs

        def ours(batch):
            if graphs:  # a new iteration: CUDA graph outputs of the last one may be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            return train_step(loss_model, [batch], opt, max_grad_norm=1.0).loss
        return ours

    def peer(batch):  # HF+PEFT and Unsloth: the model's own loss (Unsloth's is its fused cross-entropy)
        kw = {k: batch[k].to(device) for k in ("input_ids", "labels", "attention_mask") if k in batch}
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = model(**kw, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())
    return peer


def run_case(case: Case, smoke: bool, layers: int | None) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = dict(TINY) if smoke else shape_config(case.shape)
    if layers:
        cfg["num_hidden_layers"] = layers
    torch.manual_seed(0)
    batch, seq = (2, 64) if smoke else (case.batch, case.seq)
    t0 = time.perf_counter()
    model = build(case, cfg, device)
    out: dict = {"build_s": time.perf_counter() - t0, "config": cfg}
    recompute = case.recompute
    if case.impl == "ours":
        recompute = "off" if smoke and recompute == "auto" else ours_recompute(case, device, batch, seq)
        recomputation.enable(model, recompute)
        if case.liger:
            apply_kernels(model, "liger", device)
        if case.compile:
            from tuneforge.train.kernels import compile_layers

            compile_layers(model, device, "eager" if smoke else "inductor", None if smoke else case.compile_mode)
        if case.workload == "p3" and not case.name.endswith("dense"):
            out["attention"] = "flex" if use_document_attention(model, device) else "sdpa"
    elif recompute == "on" and case.impl == "peer":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    out["recompute"] = recompute
    model.train()
    if case.workload == "p3":
        examples = load_workload(smoke, cfg["vocab_size"])
        batches = (ours_batches(examples, 4 if not smoke else 2, seq) if case.impl == "ours"
                   else peer_batches(examples, case.batch if not smoke else 4))
        out["workload"] = {"examples": len(examples), "batches": len(batches),
                           "real_tokens": sum(b["real"] for b in batches),
                           "padded_tokens": sum(b["input_ids"].numel() for b in batches)}
        warm, timed = batches, batches  # the first pass (compilation included) is the first-call figure
    else:
        b = fixed_batch(cfg, batch, seq, "ours" if case.impl == "ours" else "peer")
        warm, timed = [b] * (1 if smoke else case.warmup), [b] * (2 if smoke else case.steps)
    sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        out["weights_gib"] = gib(device, "memory_allocated")
        torch.cuda.reset_peak_memory_stats(device)
    step = step_fn(case, model, device, recompute)
    losses, warm_s = [], []
    for b in warm:  # compile and warm-up, timed on their own
        t1 = time.perf_counter()
        losses.append(step(b))
        sync(device)
        warm_s.append(time.perf_counter() - t1)
    out["warmup_s"] = warm_s
    if case.workload == "p3":
        out["first_call_tokens_per_s"] = sum(b["real"] for b in warm) / sum(warm_s)
    if case.profile:
        out.update(profile(step, timed, device))
    if case.memory and device.type == "cuda":
        out["memory_at_peak"] = memory_at_peak(step, timed[0], device)
    sync(device)
    t1 = time.perf_counter()
    losses += [step(b) for b in timed]
    sync(device)
    seconds = time.perf_counter() - t1
    real = sum(b["real"] for b in timed)
    if case.workload == "fixed":  # per-step times: the spread within the call
        out["step_s"] = []
        for b in timed[:3]:
            t1 = time.perf_counter()
            step(b)
            sync(device)
            out["step_s"].append(time.perf_counter() - t1)
    n_params = model_params(cfg)
    attention = 6 * cfg["num_hidden_layers"] * cfg["hidden_size"] * mean_context(timed)
    flops_tok = (6 if case.method == "full" else 4) * n_params + attention
    out.update(losses=losses, seconds=seconds, tokens_per_s=real / seconds, real_tokens=real,
               trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
               peak_gib=gib(device, "max_memory_allocated"),
               reserved_gib=gib(device, "max_memory_reserved"),
               mfu=real / seconds * flops_tok / PEAK_FLOPS if device.type == "cuda" else None,
               limit_tokens_per_s=790e12 / ((6 if case.method == "full" else 4) * n_params))
    return out


def model_params(cfg: dict) -> int:
    h, i, v, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * cfg.get("head_dim", h // cfg["num_attention_heads"])
    emb = v * h * (1 if cfg.get("tie_word_embeddings") else 2)
    return n * (2 * h * h + 2 * h * kv + 3 * h * i) + emb


def mean_context(batches: list[dict]) -> float:
    """Mean causal attention span per real token (half the example length, summed per example)."""
    spans, tokens = 0.0, 0
    for b in batches:
        ids = b.get("seq_ids")
        if ids is None:
            mask = b.get("attention_mask", torch.ones_like(b["input_ids"]))
            lengths = mask.sum(1).tolist()
        else:
            lengths = [int((row == s).sum()) for row in ids for s in row.unique().tolist() if s >= 0]
        spans += sum(n * n / 2 for n in lengths)
        tokens += sum(lengths)
    return spans / max(tokens, 1)


def memory_at_peak(step, batch: dict, device: torch.device, top: int = 40) -> dict:
    """The allocations one step makes that are alive at its peak, by allocating frame and size (CUDA memory
    history; what was allocated before the step, weights and optimizer states, is the baseline)."""
    baseline = torch.cuda.memory_allocated(device)
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    step(batch)
    sync(device)
    trace = torch.cuda.memory._snapshot()["device_traces"][device.index or 0]
    torch.cuda.memory._record_memory_history(enabled=None)
    total, peak, peak_at, live = 0, 0, -1, {}
    for i, e in enumerate(trace):  # first pass: when the peak is
        if e["action"] == "alloc":
            live[e["addr"]] = e["size"]
            total += e["size"]
            if total > peak:
                peak, peak_at = total, i
        elif e["action"] == "free_completed" and e["addr"] in live:
            total -= live.pop(e["addr"])
    alive: dict[int, dict] = {}
    for e in trace[:peak_at + 1]:  # second pass: what is alive then
        if e["action"] == "alloc":
            alive[e["addr"]] = e
        elif e["action"] == "free_completed":
            alive.pop(e["addr"], None)
    groups: dict[tuple[str, int], list[int]] = {}
    for e in alive.values():
        frames = e.get("frames") or []
        where = next((f"{f['filename'].rsplit('/', 2)[-1]}:{f['line']} {f['name']}" for f in frames
                      if any(k in f["filename"] for k in ("tuneforge", "transformers", "peft", "bitsandbytes",
                                                          "liger", "torchinductor", "unsloth"))),
                     frames[0]["name"] if frames else "?")
        groups.setdefault((where, e["size"]), []).append(e["size"])
    rows = sorted(groups.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {"baseline_gib": baseline / GIB, "step_peak_gib": peak / GIB, "peak_event": peak_at,
            "events": len(trace), "alive": [{"where": w, "size_mib": size / 2**20, "count": len(v),
                                             "total_mib": sum(v) / 2**20} for (w, size), v in rows]}


def profile(step, batches: list[dict], device: torch.device) -> dict:
    """CUDA time by kernel family over two steps (torch.profiler), the top kernels, and the matmul ops by shape."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    if device.type != "cuda":
        return {}
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for b in batches[:2]:
            step(b)
        sync(device)
    families: dict[str, float] = {}
    kernels = []
    for e in prof.key_averages():
        # kernels only: the ops that launched them, and the annotated ranges around them (a compiled graph's call,
        # optimizer.step: "## ... ##", "Optimizer.step#..."), would count their time twice
        if e.device_type != DeviceType.CUDA or "#" in e.key:
            continue
        t = e.self_device_time_total
        kernels.append((e.key, t / 1e3 / 2))
        families[kernel_family(e.key)] = families.get(kernel_family(e.key), 0.0) + t / 1e3 / 2
    kernels.sort(key=lambda x: -x[1])
    gemms = []
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key in ("aten::mm", "aten::addmm", "aten::_scaled_mm", "aten::bmm"):
            t = e.device_time_total
            gemms.append((f"{e.key} {e.input_shapes}"[:120], round(t / 1e3 / 2, 2), e.count // 2))
    gemms.sort(key=lambda x: -x[1])
    total = sum(families.values())
    return {"profile_ms_per_step": total,
            "profile_families": {k: round(v, 2) for k, v in sorted(families.items(), key=lambda x: -x[1])},
            "profile_top": [(k[:90], round(v, 2)) for k, v in kernels[:30]],
            "profile_gemm_shapes": gemms[:30]}


def kernel_family(name: str) -> str:
    n = name.lower()
    if "memcpy" in n or "memset" in n:
        return "memcpy/memset"
    if "quantize_kernel" in n or "dequant" in n:
        return "quantization (fp8 rows, nf4 dequant)"
    if "flash" in n or "fmha" in n or "attention" in n or "flex" in n or "cudnn" in n and "sdpa" in n:
        return "attention"
    if "gemm" in n or "cutlass" in n or "sm90" in n or "nvjet" in n or "matmul" in n:
        return "matmul (GEMM)"
    if "adam" in n or "multi_tensor" in n or "foreach" in n:
        return "optimizer"
    if n.startswith("triton_"):
        return "compiled layer (Inductor's fused kernels)"
    if "triton" in n or "liger" in n or n.startswith("_") and n.endswith("_kernel"):  # Liger's, ours
        return "triton (fused elementwise/norm)"
    if "reduce" in n or "softmax" in n or "logsumexp" in n or "nll" in n:
        return "reductions (norm, loss)"
    return "elementwise/other"


# --- orchestration -------------------------------------------------------------------------------

def run_all(args: argparse.Namespace) -> dict:
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

    def command(case: Case, path: Path) -> list[str]:
        child = [sys.executable, *bench_runner.child_args(__file__, case, path, args, ("smoke", "layers"))]
        if case.impl != "unsloth":
            return child
        # Unsloth's packages (and the trl version it pins) only in its own processes; no hub, no statistics calls
        site = os.environ.get("UNSLOTH_SITE", "/tmp/site_unsloth")
        return ["env", f"PYTHONPATH={site}:{os.environ.get('PYTHONPATH', '')}", "HF_HUB_OFFLINE=1",
                "TRANSFORMERS_OFFLINE=1", "UNSLOTH_DISABLE_STATISTICS=1", *child]

    cases = bench_runner.selected(CASES, args.cases)
    cases += [c for c in cases if c.name in ROUND_TWO and args.rounds > 1]
    return bench_runner.run_cases(args, "speed_gpu.py", bench_runner.environment(["liger-kernel", "unsloth"]),
                                  cases, command, summary_line, markdown,
                                  lambda cases: {"comparisons": compare(cases)}, reserve=25, merge=merge_rounds)


def merge_rounds(first: dict | None, rec: dict) -> dict:
    """Keep every round's tokens/s; the figure is their median, ``range`` their min and max."""
    if first is None:
        if "tokens_per_s" in rec:
            rec["rounds"] = [rec["tokens_per_s"]]
        return rec
    if "tokens_per_s" in rec:
        first["rounds"].append(rec["tokens_per_s"])
        first["peak_gib"] = max(first["peak_gib"] or 0, rec["peak_gib"] or 0) or None
    rounds = sorted(first["rounds"])
    mid = len(rounds) // 2
    first["tokens_per_s"] = rounds[mid] if len(rounds) % 2 else (rounds[mid - 1] + rounds[mid]) / 2
    first["range"] = [rounds[0], rounds[-1]]
    return first


def summary_line(rec: dict) -> str:
    return (f"{rec['tokens_per_s']:,.0f} tok/s, peak {gib_text(rec.get('peak_gib'))}, "
            f"recompute {rec.get('recompute')}, losses {rec['losses'][0]:.4f}..{rec['losses'][-1]:.4f}")


def compare(cases: dict) -> dict:
    return {f"{ours} / {peer}": {**ratios(a, b), "loss0": [a["losses"][0], b["losses"][0]]
                                 if a["case"]["workload"] == "fixed" else None}  # else not the same batch
            for ours, peer, a, b in measured_pairs(cases, COMPARE)}


def markdown(results: dict) -> str:
    env = results["env"]
    title = (f"GPU training speed — {env['date']}, {env['gpu']}, torch {env['torch']} (CUDA {env['cuda']}), "
             f"transformers {env['transformers']}, peft {env['peft']}, bitsandbytes {env['bitsandbytes']}, "
             f"liger-kernel {env['liger_kernel']}, triton {env['triton']}")
    lines = heading(results, title) + [
        "| case | method | tokens | recompute | kernels | tokens/s | peak GiB | MFU | of limit | first loss |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for name, rec in results["cases"].items():
        c = rec["case"]
        tokens = (f"P3, {rec['workload']['examples']} ex." if rec.get("workload") else f"{c['batch']}×{c['seq']}")
        kernels = ("Liger" if c["liger"] else "compiled" if c.get("compile") else "torch") + (
            " + flex" if rec.get("attention") == "flex" else "") + (" + fp8 base" if c.get("precision") == "fp8"
                                                                    else "")
        who = ("Unsloth" if c["impl"] == "unsloth" else "HF+PEFT" if c["impl"] == "peer" and c["method"] != "full"
               else "HF" if c["impl"] == "peer" else "ours")
        method = f"{c['method']} ({who})"
        if "tokens_per_s" not in rec:
            lines.append(f"| {name} | {method} | {tokens} | {c['recompute']} | {kernels} | "
                         f"{rec.get('skipped') or rec.get('error')} | | | | |")
            continue
        mfu = f"{100 * rec['mfu']:.0f}%" if rec.get("mfu") else "-"
        speed = f"{rec['tokens_per_s']:,.0f}"
        if rec.get("range"):
            speed += f" ({rec['range'][0]:,.0f}–{rec['range'][1]:,.0f}, {len(rec['rounds'])} rounds)"
        if rec.get("first_call_tokens_per_s"):
            speed += f"; first pass {rec['first_call_tokens_per_s']:,.0f}"
        if c.get("compile"):
            speed += f"; compile+warm-up {sum(rec['warmup_s']):.0f} s"
        lines.append(f"| {name} | {method} | {tokens} | {rec['recompute']} | {kernels} | "
                     f"{speed} | {fmt(rec['peak_gib'])} | {mfu} | "
                     f"{100 * rec['tokens_per_s'] / rec['limit_tokens_per_s']:.0f}% | {rec['losses'][0]:.4f} |")
    comps = results.get("comparisons", {})
    if comps:
        lines += ["", "| tuneforge / peer (same call) | speed | peak memory | first loss (ours, peer) |",
                  "|---|---|---|---|"]
        for name, c in comps.items():
            loss = f"{c['loss0'][0]:.4f}, {c['loss0'][1]:.4f}" if c["loss0"] else "different batches (real tokens)"
            peak = f"{c['peak_ratio']:.2f}×" if c["peak_ratio"] else "-"
            lines.append(f"| {name} | {c['speed_ratio']:.2f}× | {peak} | {loss} |")
    for name, rec in results["cases"].items():
        if rec.get("workload"):
            w = rec["workload"]
            share = 100 * w["real_tokens"] / w["padded_tokens"]
            lines.append(f"\n{name}: {w['examples']} examples in {w['batches']} batches, {w['real_tokens']:,} real "
                         f"tokens of {w['padded_tokens']:,} computed ({share:.0f}%)")
        if rec.get("profile_families"):
            lines += ["", f"Profile of {name} (CUDA ms per step by kernel family, "
                          f"{rec['profile_ms_per_step']:.0f} ms total):", "",
                      "| family | ms/step | share |", "|---|---|---|"]
            for fam, ms in rec["profile_families"].items():
                lines.append(f"| {fam} | {ms:.1f} | {100 * ms / rec['profile_ms_per_step']:.0f}% |")
            lines += ["", "| kernel | ms/step |", "|---|---|"]
            lines += [f"| `{k}` | {ms:.1f} |" for k, ms in rec["profile_top"][:15]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = bench_runner.parser(__doc__, CASES, budget=560)
    p.add_argument("--prepare", action="store_true", help="tokenize the P3 workload from ../shared/data/p3")
    p.add_argument("--rounds", type=int, default=2, help="2: the ROUND_TWO cases run again after all others")
    args = p.parse_args(argv)
    if args.prepare:
        prepare_workload()
        return 0
    if args.run_case:
        torch.set_num_threads(min(8, os.cpu_count() or 1))
        return bench_runner.run_child(args, CASES, lambda case: run_case(case, args.smoke, args.layers))
    run_all(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
