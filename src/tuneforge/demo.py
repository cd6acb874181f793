"""`tuneforge demo`: LoRA-fine-tune the builtin SmolLM2 on builtin:tasks and measure before/after.

Exact-match accuracy is measured on held-out examples of the trained task types and on task
types never seen in training, before and after the same short LoRA run, on the same prompts.

`tuneforge demo --dpo`: DPO with LoRA on ``builtin:preferences`` (the exact, bare answer preferred over a wrong
or a chatty one), measured on prompts no training pair holds: preference accuracy, and what the model then
says (replies that hold the right answer, bare replies, exact answers, and how long its replies are).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tuneforge.config import RunConfig, validate
from tuneforge.data.builtin_preferences import builtin_preferences
from tuneforge.data.builtin_tasks import builtin_tasks
from tuneforge.data.mixture import first_per_task
from tuneforge.data.preference import PreferencePair, encode_pairs
from tuneforge.eval.metrics import EvalResult, contains_match, evaluate_tasks
from tuneforge.eval.preference import preference_eval
from tuneforge.log import emit, get_logger
from tuneforge.models.load import load_model, load_tokenizer
from tuneforge.models.resolve import resolve_model
from tuneforge.train.loop import TrainResult, train
from tuneforge.train.rundir import check_run_dir, run_inputs

logger = get_logger(__name__)

DEMO_MODEL = "smollm2-135m"
DEMO_TRAIN = {"lr": 5e-4, "max_steps": 120, "batch_size": 2, "warmup_steps": 10, "eval_every": 30, "seed": 0}
N_TEST_PER_TASK = 5
# A gentle run: at lr 5e-4 and 60 steps the margins reached 12 nats and the greedy replies fell apart
DPO_TRAIN = {"objective": "dpo", "lr": 1e-4, "max_steps": 30, "batch_size": 4, "warmup_steps": 5, "eval_every": 15,
             "seed": 0}
DPO_TEST_PER_TASK = 2


@dataclass
class DemoResult:
    before_seen: EvalResult
    after_seen: EvalResult
    before_unseen: EvalResult
    after_unseen: EvalResult
    train: TrainResult
    adapter_bytes: int
    base_bytes: int


def demo_config(output_dir: str, steps: int | None) -> RunConfig:
    """The demo's run: LoRA r=16 on all linear layers, rows of 256 tokens, packed."""
    train_cfg = dict(DEMO_TRAIN, threads=torch.get_num_threads())
    if steps is not None:
        train_cfg["max_steps"] = steps
    return validate({"model": DEMO_MODEL, "output_dir": output_dir,
                     "data": {"train": ["builtin:tasks"], "max_seq_len": 256, "val_fraction": 0.05},
                     "method": {"name": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
                     "train": train_cfg}, source="demo")


def folder_bytes(path: Path, pattern: str = "*.safetensors") -> int:
    return sum(p.stat().st_size for p in Path(path).glob(pattern))


def run_demo(output_dir: str = "runs/demo", steps: int | None = None, overwrite: bool = False) -> DemoResult:
    """Measure, train, measure again, and emit the comparison.

    An existing ``output_dir`` is replaced only when it is a tuneforge run and ``overwrite`` is given (checked
    before anything is measured).
    """
    t0 = time.perf_counter()
    config = demo_config(output_dir, steps)
    check_run_dir(Path(output_dir), run_inputs(config), resume=False, overwrite=overwrite)
    tokenizer = load_tokenizer(DEMO_MODEL)
    model = load_model(DEMO_MODEL).eval()
    splits = builtin_tasks(seed=config.train.seed)
    seen = first_per_task(splits.test, N_TEST_PER_TASK)
    unseen = first_per_task(splits.heldout, 2 * N_TEST_PER_TASK)
    logger.info(f"demo: evaluating the base model on {len(seen)} test prompts of trained task types and "
                f"{len(unseen)} of held-out task types")
    before_seen, before_unseen = evaluate_tasks(model, tokenizer, seen), evaluate_tasks(model, tokenizer, unseen)
    logger.info(f"demo: base exact match: trained types {before_seen.accuracy:.1%}, "
                f"held-out types {before_unseen.accuracy:.1%}")

    result = train(config, overwrite=overwrite, model=model, tokenizer=tokenizer)
    model.eval()
    after_seen, after_unseen = evaluate_tasks(model, tokenizer, seen), evaluate_tasks(model, tokenizer, unseen)
    demo = DemoResult(before_seen, after_seen, before_unseen, after_unseen, result,
                      adapter_bytes=folder_bytes(result.output), base_bytes=folder_bytes(resolve_model(DEMO_MODEL)))
    emit(format_demo(demo, time.perf_counter() - t0))
    return demo


def format_demo(d: DemoResult, seconds: float) -> str:
    """The before/after table, per task type, and where the outputs are."""
    lines = ["", "exact-match accuracy, greedy decoding (same prompts before and after)",
             f"{'task type':<22}{'before':>8}{'after':>8}", "-" * 38]
    for title, before, after in (("trained types", d.before_seen, d.after_seen),
                                 ("held-out types", d.before_unseen, d.after_unseen)):
        for task in sorted(before.per_task):
            lines.append(f"  {task:<20}{before.per_task[task]:>8.0%}{after.per_task[task]:>8.0%}")
        lines.append(f"{title + f' (n={before.n})':<22}{before.accuracy:>8.1%}{after.accuracy:>8.1%}")
        lines.append("-" * 38)
    lines += ["", "sample answers after training:"]
    lines += [f"  [{s['task']}] {s['prompt']!r} -> {s['pred']!r} (expected {s['ref']!r})"
              for s in d.after_seen.samples[:3] + d.after_unseen.samples[:2]]
    lines += ["", f"run directory   {d.train.run_dir}",
              f"adapter         {d.train.output} ({d.adapter_bytes / 2**20:.1f} MiB, "
              f"{100 * d.adapter_bytes / max(d.base_bytes, 1):.1f}% of the {d.base_bytes / 2**20:.0f} MiB base)",
              f"loss curve      {d.train.loss_png}",
              f"total time      {seconds / 60:.1f} min"]
    return "\n".join(lines)


@dataclass
class DpoMeasure:
    """One model state on the held-out pairs: preference accuracy and what it says to their prompts."""

    preference_acc: float
    preference_acc_avg: float
    exact: EvalResult
    correct_in_reply: float
    bare: float
    mean_words: float


@dataclass
class DpoDemoResult:
    before: DpoMeasure
    after: DpoMeasure
    n_pairs: int
    train: TrainResult


def dpo_demo_config(output_dir: str, steps: int | None) -> RunConfig:
    """The DPO demo's run: LoRA r=16 on all linear layers, reference = the base (adapters off), beta 0.1."""
    train_cfg = dict(DPO_TRAIN, threads=torch.get_num_threads())
    if steps is not None:
        train_cfg["max_steps"] = steps
    return validate({"model": DEMO_MODEL, "output_dir": output_dir,
                     "data": {"train": ["builtin:preferences"], "max_seq_len": 256, "val_fraction": 0.02},
                     "method": {"name": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
                     "train": train_cfg}, source="demo --dpo")


def held_out_pairs(seed: int) -> list[PreferencePair]:
    """Pairs whose prompts no training pair has: unseen inputs of trained task types, and held-out task types."""
    splits = builtin_preferences(seed=seed)
    return first_per_task(splits.test, DPO_TEST_PER_TASK) + first_per_task(splits.heldout, 2 * DPO_TEST_PER_TASK)


def reply_measures(preds: list[str], refs: list[str]) -> tuple[float, float, float]:
    """The share of replies that hold the reference (as whole words, case and punctuation ignored), the share
    that are bare (no more words than the reference), and the mean reply length in words."""
    n = max(len(preds), 1)
    words = [len(p.split()) for p in preds]
    held = sum(contains_match(p, r) for p, r in zip(preds, refs, strict=True))
    bare = sum(w <= len(r.split()) for w, r in zip(words, refs, strict=True))
    return held / n, bare / n, sum(words) / n


def measure_dpo(model, tokenizer, pairs: list[PreferencePair]) -> DpoMeasure:
    """Preference accuracy on ``pairs`` and greedy answers to their prompts scored against the chosen answer."""
    tokenized, _ = encode_pairs(pairs, tokenizer, 256)
    pref = preference_eval(model, tokenizer, tokenized)
    exact = evaluate_tasks(model, tokenizer, [p.conversations()[0] for p in pairs], max_new_tokens=32,
                           n_samples=len(pairs))
    held, bare, words = reply_measures([s["pred"] for s in exact.samples], [s["ref"] for s in exact.samples])
    return DpoMeasure(pref.overall["preference_acc"], pref.overall["preference_acc_avg"], exact, held, bare, words)


def run_dpo_demo(output_dir: str = "runs/demo-dpo", steps: int | None = None,
                 overwrite: bool = False) -> DpoDemoResult:
    """Measure, train DPO, measure again, and emit the comparison (``output_dir`` as in :func:`run_demo`)."""
    t0 = time.perf_counter()
    config = dpo_demo_config(output_dir, steps)
    check_run_dir(Path(output_dir), run_inputs(config), resume=False, overwrite=overwrite)
    tokenizer = load_tokenizer(DEMO_MODEL)
    model = load_model(DEMO_MODEL).eval()
    pairs = held_out_pairs(config.train.seed)
    logger.info(f"demo --dpo: measuring the base model on {len(pairs)} held-out pairs")
    before = measure_dpo(model, tokenizer, pairs)
    result = train(config, overwrite=overwrite, model=model, tokenizer=tokenizer)
    model.eval()
    demo = DpoDemoResult(before, measure_dpo(model, tokenizer, pairs), len(pairs), result)
    emit(format_dpo_demo(demo, time.perf_counter() - t0))
    return demo


def format_dpo_demo(d: DpoDemoResult, seconds: float) -> str:
    """The before/after table and where the outputs are."""
    rows = [("preference accuracy (summed log-prob)", d.before.preference_acc, d.after.preference_acc, "%"),
            ("preference accuracy (per-token log-prob)", d.before.preference_acc_avg, d.after.preference_acc_avg, "%"),
            ("replies holding the right answer", d.before.correct_in_reply, d.after.correct_in_reply, "%"),
            ("bare replies (no longer than the answer)", d.before.bare, d.after.bare, "%"),
            ("answers exact (correct and bare)", d.before.exact.accuracy, d.after.exact.accuracy, "%"),
            ("mean reply length (words)", d.before.mean_words, d.after.mean_words, "")]
    lines = ["", f"DPO on builtin:preferences, {d.n_pairs} held-out pairs (same prompts before and after)",
             f"{'measure':<42}{'before':>9}{'after':>9}", "-" * 60]
    for name, b, a, unit in rows:
        fmt = (lambda v: f"{v:.1%}") if unit == "%" else (lambda v: f"{v:.1f}")
        lines.append(f"{name:<42}{fmt(b):>9}{fmt(a):>9}")
    lines += ["", "sample answers after training:"]
    lines += [f"  [{s['task']}] {s['prompt']!r} -> {s['pred']!r} (chosen {s['ref']!r})"
              for s in d.after.exact.samples[::8]]
    lines += ["", f"run directory   {d.train.run_dir}", f"adapter         {d.train.output}",
              f"loss curve      {d.train.loss_png}", f"total time      {seconds / 60:.1f} min"]
    return "\n".join(lines)
