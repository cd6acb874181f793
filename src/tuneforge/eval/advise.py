"""`tuneforge advise`: on the user's own task, is a better prompt enough or does fine-tuning pay off?

Measured on the same held-out test records, for each strategy: accuracy, prompt and output tokens
per request, latency per request (batch 1, greedy), cost per million requests from a price per
1k tokens, and for the fine-tune the one-off training cost from a price per hour of the hardware
that trained it. Strategies: zero-shot, few-shot with k demonstrations (several k; the same k
training records for every request, as a production prompt would hold them), the user's own
prompt (optional), and a short LoRA fine-tune (queried zero-shot).

The recommendation (:func:`recommend`) follows from those numbers, in this order:

1. Compare the fine-tune with the best prompt (highest accuracy; ties go to fewer tokens).
   The fine-tune must win by ``margin`` points (5) to count as better, by twice that when fewer
   than 100 training records exist (rule of thumb: under ~100 examples, prompt).
2. Fine-tune clearly worse (by the margin) → prompt.
3. Fine-tune clearly better → fine-tune.
4. Comparable accuracy → fine-tune only when it pays at scale: the break-even volume is at most
   the expected volume, or latency per request is at least 20% lower, or the task is a strict
   format (exact/regex/JSON metrics) with 1,000+ training records; otherwise prompt (no training
   run, no model to host, easier to change).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tuneforge.config import validate
from tuneforge.data.conversation import Message
from tuneforge.errors import ConfigError, DataError
from tuneforge.eval import metrics as m
from tuneforge.eval.items import EvalItem
from tuneforge.eval.plots import plot_crossover
from tuneforge.eval.run import auto_max_new_tokens
from tuneforge.eval.sources import load_items
from tuneforge.log import get_logger
from tuneforge.models.generate import encode_prompts, generate
from tuneforge.models.load import load_model, load_tokenizer
from tuneforge.train.loop import train

logger = get_logger(__name__)

STRICT_METRICS = ("exact", "regex", "json", "json_schema")
MARGIN_POINTS = 5.0
FEW_EXAMPLES = 100
MANY_EXAMPLES = 1000
LATENCY_GAIN = 0.2


@dataclass
class AdviseOptions:
    """What to measure and the prices to apply."""

    data: str
    model: str = "smollm2-135m"
    shots: tuple[int, ...] = (1, 3, 5)
    prompt_file: str | None = None
    metric: str = "normalized"
    n_test: int = 50
    train_steps: int = 60
    lr: float = 5e-4
    lora_r: int = 16
    batch_size: int = 2
    max_seq_len: int = 512
    price_per_1k_tokens: float = 0.0005
    output_price_per_1k_tokens: float | None = None
    finetuned_price_multiplier: float = 1.0
    gpu_hour_price: float = 2.0
    expected_requests: float = 1_000_000
    latency_requests: int = 8
    max_new_tokens: int | None = None
    output: str = "runs/advise"
    seed: int = 0
    threads: int | None = None


@dataclass
class StrategyResult:
    name: str
    accuracy: float
    accuracy_ci: tuple[float, float]
    prompt_tokens: float
    output_tokens: float
    latency_s: float
    cost_per_million: float
    training_cost: float = 0.0
    training_s: float = 0.0
    samples: list[dict] = field(default_factory=list)


@dataclass
class Advice:
    strategies: list[StrategyResult]
    recommendation: str  # "prompt" or "fine-tune"
    best_prompt: str
    reasons: list[str]
    break_even_requests: float | None
    n_train: int
    n_test: int
    options: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)

    def strategy(self, name: str) -> StrategyResult:
        return next(s for s in self.strategies if s.name == name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def split_items(items: list[EvalItem], n_test: int, seed: int) -> tuple[list[EvalItem], list[EvalItem]]:
    """(test, train pool): a seeded shuffle; at most half of the records go to the test set."""
    usable = [it for it in items if it.reference is not None and it.text is None]
    if len(usable) < 4:
        raise DataError(f"advise needs at least 4 records with a reference answer, got {len(usable)}")
    order = list(range(len(usable)))
    random.Random(f"advise/{seed}").shuffle(order)
    k = min(n_test, len(usable) // 2)
    return [usable[i] for i in order[:k]], [usable[i] for i in order[k:]]


def few_shot_prompt(demos: list[EvalItem], item: EvalItem) -> list[Message]:
    """Demonstrations as earlier user/assistant turns, then the request."""
    turns: list[Message] = []
    for d in demos:
        turns += [m for m in d.prompt if m.role != "system"] + [Message("assistant", d.reference or "")]
    return turns + item.prompt


def user_prompt(template: str, item: EvalItem) -> tuple[list[Message], str | None]:
    """The user's prompt: with ``{input}`` a template for the user message, else a system prompt."""
    if "{input}" in template:
        msgs = [Message(m.role, template.replace("{input}", m.content) if m.role == "user" else m.content)
                for m in item.prompt]
        return msgs, None
    return item.prompt, template


def hit(metric: str, pred: str, item: EvalItem) -> bool:
    ref = item.reference or ""
    if metric == "exact":
        return m.exact_match(pred, ref)
    if metric == "normalized":
        return m.normalized_match(pred, ref)
    if metric == "contains":
        return m.contains_match(pred, ref)
    if metric == "json":
        return m.json_equal(pred, ref) if m.parse_json(ref)[0] else m.json_valid(pred)
    if metric == "json_schema":
        return item.schema is not None and m.json_schema_match(pred, item.schema)
    if metric == "regex":
        return item.pattern is not None and m.regex_match(pred, item.pattern)
    raise ConfigError(f"--metric {metric}: advise supports exact, normalized, contains, regex, json, json_schema")


def measure_strategy(name: str, model, tokenizer, prompts: list[list[Message]], system: str | None,
                     items: list[EvalItem], opts: AdviseOptions, max_new_tokens: int,
                     fine_tuned: bool = False) -> StrategyResult:
    """Accuracy (batched generation), tokens, latency (batch 1) and cost of one strategy."""
    preds = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=8, system_prompt=system)
    hits = [hit(opts.metric, p, it) for p, it in zip(preds, items, strict=True)]
    prompt_tokens = sum(len(x) for x in encode_prompts(tokenizer, prompts, system)) / len(prompts)
    # +1: the end-of-turn token the model emits to stop
    output_tokens = sum(len(tokenizer(p, add_special_tokens=False)["input_ids"]) + 1 for p in preds) / len(preds)
    n_lat = max(1, min(opts.latency_requests, len(prompts)))
    t0 = time.perf_counter()
    for p in prompts[:n_lat]:
        generate(model, tokenizer, [p], max_new_tokens=max_new_tokens, batch_size=1, system_prompt=system)
    latency = (time.perf_counter() - t0) / n_lat
    out_price = opts.output_price_per_1k_tokens if opts.output_price_per_1k_tokens is not None \
        else opts.price_per_1k_tokens
    mult = opts.finetuned_price_multiplier if fine_tuned else 1.0
    per_request = mult * (prompt_tokens * opts.price_per_1k_tokens + output_tokens * out_price) / 1000
    samples = [{"prompt": prompts[i][-1].content[:200], "pred": preds[i], "ref": items[i].reference}
               for i in range(min(3, len(items)))]
    return StrategyResult(name=name, accuracy=sum(hits) / len(hits), accuracy_ci=wilson(sum(hits), len(hits)),
                          prompt_tokens=prompt_tokens, output_tokens=output_tokens, latency_s=latency,
                          cost_per_million=per_request * 1e6, samples=samples)


def break_even(ft: StrategyResult, prompt: StrategyResult) -> float | None:
    """Requests after which the fine-tune's training cost is paid back (None: never, per request it costs more)."""
    saving = (prompt.cost_per_million - ft.cost_per_million) / 1e6
    if saving <= 0:
        return None
    return ft.training_cost / saving


def recommend(strategies: list[StrategyResult], n_train: int, metric: str,
              expected_requests: float) -> tuple[str, str, list[str], float | None]:
    """(recommendation, best prompt's name, reasons, break-even volume) by the rules in the module docstring."""
    ft = next(s for s in strategies if s.name == "fine-tune")
    prompts = [s for s in strategies if s.name != "fine-tune"]
    best = max(prompts, key=lambda s: (s.accuracy, -s.prompt_tokens))
    gap = 100 * (ft.accuracy - best.accuracy)
    need = MARGIN_POINTS * (2 if n_train < FEW_EXAMPLES else 1)
    be = break_even(ft, best)
    reasons = [f"best prompt: {best.name} at {100 * best.accuracy:.1f}% ({best.prompt_tokens:.0f} prompt tokens); "
               f"fine-tune: {100 * ft.accuracy:.1f}% ({ft.prompt_tokens:.0f} prompt tokens); "
               f"difference {gap:+.1f} points (needed to count: {need:.0f})"]
    if n_train < FEW_EXAMPLES:
        reasons.append(f"only {n_train} training records (< {FEW_EXAMPLES}): the rule of thumb favours prompting, "
                       f"so the fine-tune must win by {need:.0f} points")
    elif n_train >= MANY_EXAMPLES:
        reasons.append(f"{n_train} training records (>= {MANY_EXAMPLES}): enough data for fine-tuning to be reliable")
    cost_line = (f"cost per million requests: {best.name} ${best.cost_per_million:,.2f}, fine-tune "
                 f"${ft.cost_per_million:,.2f}, plus ${ft.training_cost:,.4f} one-off training; ")
    cost_line += (f"fine-tuning pays off after {be:,.0f} requests" if be is not None
                  else "fine-tuning never pays off on cost (it costs as much or more per request)")
    reasons.append(cost_line)
    if gap <= -need:
        return "prompt", best.name, reasons + [f"the fine-tune is {-gap:.1f} points worse than {best.name}"], be
    if gap >= need:
        return "fine-tune", best.name, reasons + [f"the fine-tune is {gap:.1f} points more accurate"], be
    reasons.append(f"accuracy is comparable (within {need:.0f} points): deciding on cost, latency and format")
    faster = ft.latency_s <= (1 - LATENCY_GAIN) * best.latency_s
    if be is not None and be <= expected_requests:
        return "fine-tune", best.name, reasons + [f"at the expected {expected_requests:,.0f} requests the saving "
                                                  f"exceeds the training cost (break-even {be:,.0f})"], be
    if faster:
        return "fine-tune", best.name, reasons + [f"latency per request {1000 * ft.latency_s:.0f} ms vs "
                                                  f"{1000 * best.latency_s:.0f} ms (>= {LATENCY_GAIN:.0%} faster)"], be
    if metric in STRICT_METRICS and n_train >= MANY_EXAMPLES:
        return "fine-tune", best.name, reasons + ["strict output format with 1,000+ examples"], be
    return "prompt", best.name, reasons + ["no measured gain in accuracy, cost at the expected volume, or "
                                           "latency justifies a training run"], be


def _train_adapter(model, tokenizer, train_items: list[EvalItem], opts: AdviseOptions, out: Path):
    """LoRA fine-tune of ``model`` in place on the training pool; returns the TrainResult."""
    data_path = out / "train.jsonl"
    with data_path.open("w") as f:
        for it in train_items:
            msgs = [{"role": m.role, "content": m.content} for m in it.example.messages]
            f.write(json.dumps({"messages": msgs}) + "\n")
    cfg = validate({"model": opts.model, "output_dir": str(out / "lora"),
                    "data": {"train": [str(data_path)], "max_seq_len": opts.max_seq_len, "val_fraction": 0,
                             "skip_bad": True},
                    "method": {"name": "lora", "lora": {"r": opts.lora_r, "alpha": 2 * opts.lora_r, "dropout": 0.0}},
                    "train": {"lr": opts.lr, "max_steps": opts.train_steps, "batch_size": opts.batch_size,
                              "warmup_steps": max(1, opts.train_steps // 10), "seed": opts.seed,
                              "threads": opts.threads or torch.get_num_threads()}}, source="advise")
    return train(cfg, overwrite=True, model=model, tokenizer=tokenizer, quiet=True)


def run_advise(opts: AdviseOptions, model=None, tokenizer=None, log: Callable[[str], None] | None = None) -> Advice:
    """Measure every strategy, recommend, and write advise.json, advise.md and the crossover PNG."""
    log = log or logger.info
    if not opts.shots or any(k <= 0 for k in opts.shots):
        raise ConfigError("--shots: give positive numbers of demonstrations, e.g. 1,3,5")
    out = Path(opts.output)
    out.mkdir(parents=True, exist_ok=True)
    items = load_items(opts.data)
    test, pool = split_items(items, opts.n_test, opts.seed)
    if len(pool) < max(opts.shots):
        raise DataError(f"{opts.data}: {len(pool)} records are left for demonstrations and training, fewer than "
                        f"the largest --shots {max(opts.shots)}")
    template = Path(opts.prompt_file).read_text(encoding="utf-8").strip() if opts.prompt_file else None
    tokenizer = tokenizer or load_tokenizer(opts.model)
    model = model or load_model(opts.model).eval()
    max_new = opts.max_new_tokens or auto_max_new_tokens(tokenizer, test)
    demos = random.Random(f"advise/demos/{opts.seed}").sample(pool, max(opts.shots))
    plan: list[tuple[str, list[list[Message]], str | None]] = [("zero-shot", [it.prompt for it in test], None)]
    plan += [(f"{k}-shot", [few_shot_prompt(demos[:k], it) for it in test], None) for k in sorted(set(opts.shots))]
    if template:
        pairs = [user_prompt(template, it) for it in test]
        plan.append(("your prompt", [p for p, _ in pairs], pairs[0][1]))
    results = []
    for name, prompts, system in plan:
        log(f"[advise] {name}: {len(test)} test requests")
        results.append(measure_strategy(name, model, tokenizer, prompts, system, test, opts, max_new))
    log(f"[advise] fine-tune: LoRA r={opts.lora_r}, {opts.train_steps} steps on {len(pool)} records")
    tr = _train_adapter(model, tokenizer, pool, opts, out)
    model.eval()
    ft = measure_strategy("fine-tune", model, tokenizer, [it.prompt for it in test], None, test, opts, max_new,
                          fine_tuned=True)
    ft.training_s = tr.seconds
    ft.training_cost = tr.seconds / 3600 * opts.gpu_hour_price
    results.append(ft)
    rec, best, reasons, be = recommend(results, len(pool), opts.metric, opts.expected_requests)
    advice = Advice(strategies=results, recommendation=rec, best_prompt=best, reasons=reasons,
                    break_even_requests=be, n_train=len(pool), n_test=len(test), options=asdict(opts))
    write_advice(advice, out)
    return advice


def write_advice(advice: Advice, out: Path) -> None:
    (out / "advise.json").write_text(json.dumps(advice.to_dict(), indent=2, default=str))
    (out / "advise.md").write_text(format_advice(advice, markdown=True))
    advice.files = {"json": str(out / "advise.json"), "markdown": str(out / "advise.md")}
    png = plot_crossover(advice, out / "crossover.png")
    if png:
        advice.files["crossover"] = str(png)


def advice_table(a: Advice) -> tuple[list[str], list[list[str]]]:
    """The comparison as a header and one row of formatted cells per strategy."""
    head = ["strategy", "accuracy", "95% CI", "prompt tok", "output tok", "latency", "$ / 1M requests",
            "training $"]
    rows = [[s.name, f"{100 * s.accuracy:.1f}%", f"{100 * s.accuracy_ci[0]:.0f}-{100 * s.accuracy_ci[1]:.0f}%",
             f"{s.prompt_tokens:.0f}", f"{s.output_tokens:.1f}", f"{1000 * s.latency_s:.0f} ms",
             f"{s.cost_per_million:,.2f}", f"{s.training_cost:,.4f}" if s.name == "fine-tune" else "-"]
            for s in a.strategies]
    return head, rows


def format_advice(a: Advice, markdown: bool = False) -> str:
    """The comparison table, the recommendation and why."""
    head, rows = advice_table(a)
    if markdown:
        table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |"
                                                                             for r in rows]
    else:
        widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
        table = ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True)))
                 for r in [head] + rows]
    opts = a.options
    lines = [f"{'## ' if markdown else ''}Prompt or fine-tune? {opts['data']} ({a.n_test} test records, "
             f"{a.n_train} for demonstrations and training, metric {opts['metric']})", ""] + table + [""]
    lines.append(f"{'**' if markdown else ''}Recommendation: {a.recommendation}"
                 f"{' (' + a.best_prompt + ')' if a.recommendation == 'prompt' else ''}{'**' if markdown else ''}")
    lines += [f"- {r}" for r in a.reasons]
    lines += ["", f"Prices: ${opts['price_per_1k_tokens']} per 1k prompt tokens, "
                  f"${opts['output_price_per_1k_tokens'] or opts['price_per_1k_tokens']} per 1k output tokens, "
                  f"fine-tuned model x{opts['finetuned_price_multiplier']}, ${opts['gpu_hour_price']} per hour of the "
                  f"training hardware; latency measured at batch 1 on this machine."]
    return "\n".join(lines)
