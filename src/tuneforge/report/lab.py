"""`tuneforge lab`: measure each claim of the fine-tuning lesson on the builtin SmolLM2 and builtin:tasks.

Runs (all on the same data, seeds and row layout; only what the claim is about differs):

- ``full``: full fine-tune of the pre-trained model on the task mixture (the reference run);
- ``random``: the same recipe from random initialization (same architecture);
- ``full_high_lr`` / ``full_low_lr``: the reference run at a far higher / lower learning rate;
- ``lora``: LoRA (r=16, all linear layers) on the task mixture;
- ``lora_one_task``: LoRA on as many examples of a single task type instead of the mixture;
- the ``advise`` comparison (zero-/few-shot vs a short LoRA fine-tune) on one task type.

After each run: exact-match accuracy on test prompts of trained task types ("seen") and of task
types never trained on ("unseen"), general-text perplexity and knowledge probes (forgetting).
:mod:`tuneforge.report.lab_report` turns the numbers into verdicts and the report.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tuneforge.config import validate
from tuneforge.data.builtin_tasks import TASKS, builtin_tasks, draw, to_example
from tuneforge.data.dataset import build_training_data
from tuneforge.data.mixture import first_per_task
from tuneforge.data.replay import with_replay
from tuneforge.eval.advise import AdviseOptions, run_advise
from tuneforge.eval.forgetting import ForgettingMeasure, GeneralText, measure_forgetting
from tuneforge.eval.metrics import evaluate_tasks
from tuneforge.eval.probes import Probe, all_probes, sample_probes
from tuneforge.log import get_logger
from tuneforge.models.load import load_model, load_tokenizer
from tuneforge.models.resolve import resolve_model
from tuneforge.report.lab_report import write_lab_report
from tuneforge.report.lab_result import FULL, LAB_MODEL, QUICK, LabResult, LabSettings, Run, State
from tuneforge.train.callbacks import TrainCallback
from tuneforge.train.loop import train

GENERAL_TEXT = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "general" / "tinyshakespeare.txt"
ONE_TASK = "sort_words"
ADVISE_TASK = "upper"


def general_text_source(path: str | Path | None, out: Path) -> Path:
    """The general text for perplexity: the given file, else ../shared/data's, else the probes as sentences."""
    if path is not None:
        return Path(path)
    if GENERAL_TEXT.is_file():
        return GENERAL_TEXT

    fallback = out / "general_fallback.txt"
    fallback.write_text(" ".join(f"{p.cloze} {p.answer}." for p in all_probes()), encoding="utf-8")
    return fallback


class Lab:
    """Shared pieces of every run: tokenizer, evaluation sets, general text and probes."""

    def __init__(self, settings: LabSettings, out: Path, model_ref: str, general: Path,
                 log: Callable[[str], None], threads: int):
        self.s, self.out, self.model_ref, self.log, self.threads = settings, out, model_ref, log, threads
        self.tokenizer = load_tokenizer(model_ref)
        splits = builtin_tasks(seed=0)
        self.seen = first_per_task(splits.test, settings.n_seen)
        self.unseen = first_per_task(splits.heldout, settings.n_unseen)
        self.text = GeneralText(self.tokenizer, general, settings.ppl_tokens)
        self.text_path = general
        self.probes: list[Probe] = sample_probes(settings.n_probes)

    def model(self):
        return load_model(self.model_ref).eval()

    def random_model(self):
        torch.manual_seed(0)
        config = AutoConfig.from_pretrained(resolve_model(self.model_ref))
        return AutoModelForCausalLM.from_config(config).eval()

    def forgetting(self, model) -> ForgettingMeasure:
        return measure_forgetting(model, self.tokenizer, self.text, self.probes)

    def measure(self, model, what: str) -> State:
        t0 = time.perf_counter()
        model.eval()
        state = State(seen=evaluate_tasks(model, self.tokenizer, self.seen, max_new_tokens=24),
                      unseen=evaluate_tasks(model, self.tokenizer, self.unseen, max_new_tokens=24),
                      forget=self.forgetting(model))
        self.log(f"[lab] {what}: seen {state.seen.accuracy:.1%}, unseen {state.unseen.accuracy:.1%}, "
                 f"general ppl {state.forget.general_ppl:.2f}, probes {state.forget.probe_accuracy:.1%} "
                 f"({time.perf_counter() - t0:.0f}s)")
        return state

    def train(self, name: str, model, method: str, lr: float, steps: int, data: list[str],
              curve: bool = False, measure: bool = True, replay: float = 0.0) -> Run:
        s = self.s
        cfg = validate({"model": self.model_ref, "output_dir": str(self.out / "runs" / name),
                        "data": {"train": data, "max_seq_len": s.max_seq_len, "val_fraction": 0},
                        "method": {"name": method, "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
                        "train": {"lr": lr, "max_steps": steps, "batch_size": s.batch_size, "seed": 0,
                                  "warmup_steps": max(1, steps // 10), "threads": self.threads,
                                  "eval_every": s.eval_every if curve else None}}, source=f"lab:{name}")
        curve_cb = CurveCallback(self, steps)
        callbacks = (curve_cb,) if curve and s.eval_every else ()
        self.log(f"[lab] training {name}: {method}, lr {lr:g}, {steps} steps")
        rows = None
        if replay:
            # general text after the prefix that measures perplexity, so replay never trains on the test text
            rows = with_replay(build_training_data(cfg.data, self.tokenizer, seed=0), self.tokenizer,
                               self.text_path, replay, s.max_seq_len, skip_tokens=s.ppl_tokens)
        result = train(cfg, overwrite=True, model=model, tokenizer=self.tokenizer, quiet=True, callbacks=callbacks,
                       data=rows)
        losses = [(r["step"], r["loss"]) for r in result.metrics if "loss" in r]
        run = Run(name=name, method=method, lr=lr, steps=steps, seconds=result.seconds, trainable=result.trainable,
                  total=result.total, losses=losses, curve=curve_cb.points)
        if measure:
            run.state = self.measure(model, name)
        return run


class CurveCallback(TrainCallback):
    """Task accuracy and forgetting at intermediate evaluation points (the final state is measured apart)."""

    def __init__(self, lab: Lab, total_steps: int):
        self.lab, self.total_steps = lab, total_steps
        self.points: list[dict[str, float]] = []

    def on_eval(self, step: int, model) -> dict[str, float]:
        if step >= self.total_steps:
            return {}
        acc = evaluate_tasks(model, self.lab.tokenizer, self.lab.seen, max_new_tokens=24).accuracy
        f = self.lab.forgetting(model)
        self.points.append({"step": step, "seen_acc": acc, "ppl": f.general_ppl, "probe_acc": f.probe_accuracy})
        model.train()
        return {"lab/seen_acc": acc, "forget/general_ppl": f.general_ppl, "forget/probe_acc": f.probe_accuracy}


def task_examples(task: str, n: int, seed: int = 0, skip: int = 0) -> list:
    """``n`` examples of one builtin task type, drawn as ``builtin:tasks`` draws them after ``skip``
    (with ``skip`` = its test size, none of them is a test input of that seed)."""
    pairs = draw(TASKS[task], random.Random(f"builtin:tasks/{seed}/{task}"), skip + n)[skip:]
    return [to_example(task, skip + i, p, a) for i, (p, a) in enumerate(pairs)]


def one_task_file(out: Path, task: str, n: int) -> Path:
    """``n`` training examples of one builtin task type as a messages JSONL (test inputs excluded)."""
    path = out / f"one_task_{task}.jsonl"
    with path.open("w") as f:
        for e in task_examples(task, n, seed=0, skip=20):
            f.write(json.dumps({"messages": [{"role": m.role, "content": m.content} for m in e.messages],
                                "task": e.task}) + "\n")
    return path


def advise_task_file(out: Path, task: str, n: int) -> Path:
    """``n`` examples of one builtin task type as prompt/completion records (advise splits them)."""
    path = out / f"advise_{task}.jsonl"
    with path.open("w") as f:
        for e in task_examples(task, n, seed=1):
            f.write(json.dumps({"prompt": e.messages[-2].content, "completion": e.messages[-1].content,
                                "task": e.task}) + "\n")
    return path


def run_lab(output: str | Path = "runs/lab", quick: bool = True, model_ref: str = LAB_MODEL,
            general_text: str | Path | None = None, threads: int | None = None,
            log: Callable[[str], None] | None = None, settings: LabSettings | None = None) -> LabResult:
    """Run every measurement of the lab and write report.md, report.html, plots/*.png and lab.json."""
    log = log or get_logger(__name__).info
    t_start = time.perf_counter()
    settings = settings or (QUICK if quick else FULL)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    threads = threads or torch.get_num_threads()
    general = general_text_source(general_text, out)
    lab = Lab(settings, out, model_ref, general, log, threads)
    timings: dict[str, float] = {}

    def timed(key: str, fn):
        t0 = time.perf_counter()
        value = fn()
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0
        return value

    s = settings
    mix = ["builtin:tasks"]
    base = timed("1 base model", lambda: lab.measure(lab.model(), "base model"))
    runs: dict[str, Run] = {}
    runs["full"] = timed("2 sft", lambda: lab.train("full", lab.model(), "full", s.lr_full, s.steps, mix, curve=True))
    runs["random"] = timed("2 sft", lambda: lab.train("random", lab.random_model(), "full", s.lr_full,
                                                      s.steps_random, mix, measure=False))
    runs["full_high_lr"] = timed("2 sft", lambda: lab.train("full_high_lr", lab.model(), "full", s.lr_high,
                                                            s.steps, mix))
    runs["full_low_lr"] = timed("2 sft", lambda: lab.train("full_low_lr", lab.model(), "full", s.lr_low,
                                                           s.steps, mix))
    runs["lora"] = timed("4 lora", lambda: lab.train("lora", lab.model(), "lora", s.lr_lora, s.steps, mix,
                                                     curve=True))
    if s.replay:
        runs["lora_replay"] = timed("5 forgetting", lambda: lab.train("lora_replay", lab.model(), "lora", s.lr_lora,
                                                                       s.steps, mix, replay=s.replay))
    one = one_task_file(out, ONE_TASK, 400)
    runs["lora_one_task"] = timed("3 instruction tuning", lambda: lab.train("lora_one_task", lab.model(), "lora",
                                                                             s.lr_lora, s.steps, [str(one)]))
    advise_file = advise_task_file(out, ADVISE_TASK, 80)
    advice = timed("6 advise", lambda: run_advise(
        AdviseOptions(data=str(advise_file), model=model_ref, shots=s.advise_shots, metric="exact",
                      n_test=s.advise_test, train_steps=s.advise_steps, lr=s.lr_lora, batch_size=s.batch_size,
                      max_seq_len=s.max_seq_len, latency_requests=3, output=str(out / "advise"), threads=threads),
        model=lab.model(), tokenizer=lab.tokenizer, log=log))
    result = LabResult(mode="quick" if quick else "full", settings=s, base=base, runs=runs, advice=advice,
                       seconds=time.perf_counter() - t_start, general_text=str(general), model_ref=model_ref,
                       section_seconds=timings)
    write_lab_report(result, out)
    return result
