"""`tuneforge eval`: a model, with and without adapters, on one evaluation file, many metrics.

Metrics (``--metric``, repeatable; by default whatever the records support):

=============  ==========================================================================
exact          generated answer equals the reference (surrounding whitespace ignored)
normalized     equal ignoring case, punctuation and whitespace
contains       the normalized reference occurs (as whole words) in the normalized answer
regex          the whole answer matches the record's ``pattern`` (or ``--pattern``)
json           the answer is valid JSON (``json_valid``) and, when the reference is JSON,
               the same value (``json_equal``)
json_schema    the answer is JSON that validates against the record's ``schema`` (or ``--schema``)
mc             multiple choice by log-likelihood of the options (``mc``, ``mc_norm``); records
               without ``choices`` get their task's distinct answers as options
loss           loss per reference token (assistant answer + end-of-turn) and its perplexity
refusal        share of replies the refusal detector flags (``refusal_rate`` on prompts to
               decline, ``over_refusal`` on prompts to answer)
preference     on a file of preference pairs: the share of pairs whose chosen answer has the
               higher log-prob (``preference_acc``: summed, ``preference_acc_avg``: per token)
=============  ==========================================================================
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tuneforge.adapters.manager import AdapterSet
from tuneforge.data.preference import encode_pairs, is_pair_file, load_pairs
from tuneforge.errors import ConfigError, DataError
from tuneforge.eval import metrics as m
from tuneforge.eval.items import EvalItem, auto_choices, spread, summarize
from tuneforge.eval.mc import choice_hits, score_choices
from tuneforge.eval.plots import plot_eval, plot_per_task
from tuneforge.eval.preference import preference_eval
from tuneforge.eval.refusal import is_refusal, load_detector, refusal_columns
from tuneforge.eval.results import EvalReport, ModelEval
from tuneforge.eval.scoring import examples_loss, text_perplexity
from tuneforge.eval.sources import load_items
from tuneforge.models.generate import generate
from tuneforge.train.callbacks import TrainCallback

METRICS = ("exact", "normalized", "contains", "regex", "json", "json_schema", "mc", "loss", "refusal")
GENERATION_METRICS = {"exact", "normalized", "contains", "regex", "json", "json_schema", "refusal"}


def default_metrics(items: list[EvalItem]) -> list[str]:
    """The metrics a set of items supports, when the user names none."""
    s = summarize(items)
    out: list[str] = []
    gen_refs = sum(1 for i in items if i.reference is not None and i.choices is None)
    if gen_refs:
        out += ["exact", "normalized", "contains"]
        if all(m.parse_json(i.reference)[0] for i in items if i.reference is not None and i.choices is None):
            out.append("json")
    if s.with_pattern:
        out.append("regex")
    if s.with_schema:
        out.append("json_schema")
    if s.with_choices or any(i.choices for i in auto_choices([i for i in items if i.text is None])):
        out.append("mc")
    if s.with_reference:
        out.append("loss")
    if s.with_refusal_label:
        out.append("refusal")
    return out or ["loss"]


def check_metrics(metrics: Sequence[str], items: list[EvalItem], pattern: str | None, schema: dict | None) -> None:
    s = summarize(items)
    for name in metrics:
        if name not in METRICS:
            raise ConfigError(f"--metric {name}: unknown metric; use one of {', '.join(METRICS)}")
    if "regex" in metrics and pattern is None and not s.with_pattern:
        raise ConfigError("--metric regex needs a pattern: pass --pattern REGEX or give records a 'pattern' field")
    if "json_schema" in metrics and schema is None and not s.with_schema:
        raise ConfigError("--metric json_schema needs a schema: pass --schema FILE.json or give records a "
                          "'schema' field")
    needs_ref = {"exact", "normalized", "contains", "json", "loss", "mc"} & set(metrics)
    if s.plain_text:  # loss on plain text is perplexity: it needs no reference answer
        needs_ref -= {"loss"}
    if needs_ref and not s.with_reference:
        raise DataError(f"metrics {sorted(needs_ref)} need reference answers, and no record has one")


def _mean_by_task(hits: list[bool | None], items: list[EvalItem]) -> tuple[float | None, dict[str, float]]:
    by_task: dict[str, list[bool]] = defaultdict(list)
    for h, it in zip(hits, items, strict=True):
        if h is not None:
            by_task[it.task or "default"].append(bool(h))
    flat = [h for hs in by_task.values() for h in hs]
    if not flat:
        return None, {}
    return sum(flat) / len(flat), {t: sum(h) / len(h) for t, h in sorted(by_task.items())}


def generation_hits(preds: list[str | None], items: list[EvalItem], metrics: Sequence[str],
                    pattern: str | None = None, schema: dict | None = None) -> dict[str, list[bool | None]]:
    """Per column, per item: hit, miss, or None where the metric does not apply to the item."""
    refs = [it.reference if p is not None else None for p, it in zip(preds, items, strict=True)]
    out: dict[str, list[bool | None]] = {}

    def col(fn: Callable[[str, EvalItem], bool | None]) -> list[bool | None]:
        return [None if p is None else fn(p, it) for p, it in zip(preds, items, strict=True)]

    if "exact" in metrics:
        out["exact_match"] = col(lambda p, it: None if it.reference is None else m.exact_match(p, it.reference))
    if "normalized" in metrics:
        out["normalized_match"] = col(lambda p, it: None if it.reference is None else
                                      m.normalized_match(p, it.reference))
    if "contains" in metrics:
        out["contains"] = col(lambda p, it: None if it.reference is None else m.contains_match(p, it.reference))
    if "regex" in metrics:
        out["regex"] = col(lambda p, it: None if (it.pattern or pattern) is None else
                           m.regex_match(p, it.pattern or pattern))
    if "json" in metrics:
        out["json_valid"] = col(lambda p, it: m.json_valid(p))
        if any(r is not None and m.parse_json(r)[0] for r in refs):
            out["json_equal"] = col(lambda p, it: None if it.reference is None or not m.parse_json(it.reference)[0]
                                    else m.json_equal(p, it.reference))
    if "json_schema" in metrics:
        out["json_schema"] = col(lambda p, it: None if (it.schema or schema) is None else
                                 m.json_schema_match(p, it.schema or schema))
    return out


def auto_max_new_tokens(tokenizer, items: list[EvalItem]) -> int:
    """Room for the longest reference plus a margin (48 tokens for open replies such as refusals)."""
    refs = [len(tokenizer(it.reference, add_special_tokens=False)["input_ids"]) for it in items
            if it.reference is not None]
    longest = max(refs, default=0)
    open_ended = any(it.reference is None for it in items)
    return min(256, max(16, longest + 8, 48 if open_ended else 0))


def evaluate_model(model, tokenizer, items: list[EvalItem], metrics: Sequence[str], name: str = "model",
                   pattern: str | None = None, schema: dict | None = None, max_new_tokens: int | None = None,
                   batch_size: int = 16, detector: Callable[[str], bool] | None = None,
                   system_prompt: str | None = None) -> ModelEval:
    """Every requested metric of one model (with whatever adapters are active) on ``items``."""
    result = ModelEval(name=name, n=len(items), predictions=[None] * len(items))
    columns: dict[str, list[bool | None]] = {}
    chat = [i for i, it in enumerate(items) if it.text is None]
    if GENERATION_METRICS & set(metrics) and chat:
        preds = generate(model, tokenizer, [items[i].prompt for i in chat],
                         max_new_tokens=max_new_tokens or auto_max_new_tokens(tokenizer, [items[i] for i in chat]),
                         batch_size=batch_size, system_prompt=system_prompt)
        for i, p in zip(chat, preds, strict=True):
            result.predictions[i] = p
        columns.update(generation_hits(result.predictions, items, metrics, pattern, schema))
        if "refusal" in metrics:
            columns.update(refusal_columns(result.predictions, items, detector or is_refusal))
    if "mc" in metrics:
        columns.update(_mc_columns(model, tokenizer, items, batch_size, system_prompt))
    for col, hits in columns.items():
        overall, per_task = _mean_by_task(hits, items)
        if overall is not None:
            result.overall[col], result.per_task[col] = overall, per_task
    if "loss" in metrics:
        _add_loss(result, model, tokenizer, items, batch_size)
    return result


def _mc_columns(model, tokenizer, items, batch_size, system_prompt) -> dict[str, list[bool | None]]:
    with_choices = auto_choices([it for it in items if it.text is None])
    idx = [i for i, it in enumerate(items) if it.text is None]
    scored = [(i, it) for i, it in zip(idx, with_choices, strict=True) if it.choices is not None]
    if not scored:
        raise DataError("--metric mc: no record has 'choices', and no task has a small closed set of answers "
                        "(2 to 20 distinct references) to use as options")
    results = score_choices(model, tokenizer, [it for _, it in scored], batch_size=batch_size,
                            system_prompt=system_prompt)
    acc, acc_norm = choice_hits(results, [it for _, it in scored])
    mc: list[bool | None] = [None] * len(items)
    mc_norm: list[bool | None] = [None] * len(items)
    for (i, _), a, b in zip(scored, acc, acc_norm, strict=True):
        mc[i], mc_norm[i] = a, b
    return {"mc": mc, "mc_norm": mc_norm}


def _add_loss(result: ModelEval, model, tokenizer, items: list[EvalItem], batch_size: int,
              max_text_tokens: int = 4096) -> None:
    """Loss per reference token by task; plain-text records count all their tokens (first 4096 each)."""
    by_task: dict[str, list] = defaultdict(list)
    for it in items:
        if it.reference is not None and it.text is None:
            by_task[it.task or "default"].append(it.example)
    texts: dict[str, list[str]] = defaultdict(list)
    for it in items:
        if it.text is not None:
            texts[it.task or "text"].append(it.text)
    total, count = 0.0, 0
    result.per_task["loss"], result.per_task["ppl"] = {}, {}
    for task in sorted(set(by_task) | set(texts)):
        parts = [examples_loss(model, tokenizer, by_task[task], batch_size=batch_size)] if by_task[task] else []
        parts += [text_perplexity(model, tokenizer, t, max_tokens=max_text_tokens) for t in texts[task]]
        n = sum(p.n_tokens for p in parts)
        nll = sum(p.nll * p.n_tokens for p in parts) / max(n, 1)
        result.per_task["loss"][task], result.per_task["ppl"][task] = nll, math.exp(min(nll, 50.0))
        total, count = total + nll * n, count + n
    if count:
        result.overall["loss"] = total / count
        result.overall["ppl"] = math.exp(min(total / count, 50.0))


# --- several variants: base and adapters --------------------------------------------------------


def adapter_names(paths: Sequence[str]) -> list[str]:
    """Display names of adapter directories: the shortest path suffixes that tell them apart
    (a trailing ``adapter`` folder, as in run directories, keeps its parent's name)."""
    parts = [[p for p in Path(x).resolve().parts if p not in ("/", "")] for x in paths]
    parts = [ps[:-1] if len(ps) > 1 and ps[-1] == "adapter" else ps for ps in parts]
    k, distinct = 1, len({tuple(ps) for ps in parts})
    while k < max((len(ps) for ps in parts), default=1) and len({tuple(ps[-k:]) for ps in parts}) < distinct:
        k += 1
    names: list[str] = []
    for ps in parts:
        name = "/".join(ps[-k:]) or "adapter"
        base, n = name, 2
        while name in names or name == "base":
            name, n = f"{base}#{n}", n + 1
        names.append(name)
    return names


def run_eval(model_ref: str, data: str, adapters: Sequence[str] = (), metrics: Sequence[str] | None = None,
             output: str | Path | None = None, pattern: str | None = None, schema_path: str | None = None,
             refusal_detector: str | None = None, limit: int | None = None, max_new_tokens: int | None = None,
             batch_size: int = 16, include_base: bool = True, format: str = "auto",
             system_prompt: str | None = None, overwrite: bool = False) -> EvalReport:
    """Evaluate the base model and each adapter on ``data``; write results.json, predictions and PNGs.

    A file of preference pairs is scored by preference accuracy (the only metric that applies to it).
    ``output`` must be new or empty, or an earlier evaluation's folder with ``overwrite``.
    """
    if output:
        check_output(Path(output), overwrite)
    if is_pair_file(data, format):
        return run_preference_eval(model_ref, data, adapters, output, limit, batch_size, include_base, format)
    items = load_items(data, format=format)
    schema = _read_schema(schema_path) if schema_path else None
    chosen = list(metrics) if metrics else default_metrics(items)
    if "mc" in chosen:
        items = auto_choices(items)  # label sets from the whole file, before --limit
    items = spread(items, limit)
    if not metrics and not any(it.choices for it in items):  # --limit kept no record of a closed label set
        chosen = [c for c in chosen if c != "mc"]
    check_metrics(chosen, items, pattern, schema)
    detector = load_detector(refusal_detector)
    aset, plan = _variants(model_ref, adapters, include_base)
    variants = []
    for name, selection in plan:
        aset.activate(selection)
        variants.append(evaluate_model(aset.model, aset.tokenizer, items, chosen, name=name, pattern=pattern,
                                       schema=schema, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                       detector=detector, system_prompt=system_prompt))
    report = EvalReport(variants=variants, metrics=chosen, data=data, n=len(items))
    if output:
        write_eval_outputs(report, items, Path(output))
    return report


def _variants(model_ref: str, adapters: Sequence[str], include_base: bool) -> tuple[AdapterSet, list[tuple]]:
    """The base model with the adapters loaded, and the (name, selection) of each variant to evaluate."""
    aset = AdapterSet.from_pretrained(model_ref)
    names = adapter_names(adapters)
    for name, path in zip(names, adapters, strict=True):
        aset.load(name, path)
    return aset, ([("base", {})] if include_base or not adapters else []) + [(n, {n: 1.0}) for n in names]


def run_preference_eval(model_ref: str, data: str, adapters: Sequence[str] = (), output: str | Path | None = None,
                        limit: int | None = None, batch_size: int = 16, include_base: bool = True,
                        format: str = "auto", max_len: int = 2048) -> EvalReport:
    """Preference accuracy of the base model and each adapter on a pair file; results.json and eval.png."""
    aset, plan = _variants(model_ref, adapters, include_base)
    loaded = load_pairs(data, format=format, skip_bad=True)
    pairs, _ = encode_pairs(spread(loaded.pairs, limit), aset.tokenizer, max_len, skip_bad=True)
    if not pairs:
        raise DataError(f"{data}: no pair could be scored (all {len(loaded.pairs)} are longer than {max_len} "
                        "tokens or unreadable); check the file with `tuneforge data inspect`")
    variants = []
    for name, selection in plan:
        aset.activate(selection)
        variants.append(preference_eval(aset.model, aset.tokenizer, pairs, name=name, batch_size=batch_size))
    report = EvalReport(variants=variants, metrics=["preference"], data=data, n=len(pairs))
    if output:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(report.to_dict(), indent=2))
        report.files = {"results": str(out / "results.json")}
        png = plot_eval(report, out / "eval.png")
        if png:
            report.files["chart"] = str(png)
    return report


def _read_schema(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"--schema {path}: no such file")
    try:
        schema = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"--schema {path}: not valid JSON ({e})") from e
    if not isinstance(schema, dict):
        raise DataError(f"--schema {path}: a JSON Schema is an object")
    return schema


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse to write over earlier results unless asked, and over anything that is not an evaluation's."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / "results.json").is_file():
        raise ConfigError(f"--output {out}: the folder holds files that are not a tuneforge evaluation's "
                          "(no results.json); give a new folder")
    if not overwrite:
        raise ConfigError(f"--output {out}: it holds an earlier evaluation (results.json); pass --overwrite to "
                          "replace it, or give a new folder")


def write_eval_outputs(report: EvalReport, items: list[EvalItem], out: Path) -> None:
    """results.json, predictions.jsonl, eval.png (overall) and eval_per_task.png."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report.to_dict(), indent=2))
    with (out / "predictions.jsonl").open("w") as f:
        for i, it in enumerate(items):
            row = {"source": it.source, "task": it.task, "reference": it.reference}
            row.update({v.name: v.predictions[i] for v in report.variants if v.predictions[i] is not None})
            f.write(json.dumps(row) + "\n")
    report.files = {"results": str(out / "results.json"), "predictions": str(out / "predictions.jsonl")}
    png = plot_eval(report, out / "eval.png")
    if png:
        report.files["chart"] = str(png)
    png = plot_per_task(report, out / "eval_per_task.png")
    if png:
        report.files["per_task_chart"] = str(png)


def _fmt(col: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if col == "loss" else f"{value:.2f}" if col == "ppl" else f"{100 * value:.1f}%"


def format_table(report: EvalReport, per_task: bool = True) -> str:
    """The variants side by side (one column each), overall then per task."""
    cols = report.columns
    names = [v.name for v in report.variants]
    width = max([len(c) for c in cols] + [12])
    colw = max([len(n) for n in names] + [8]) + 2
    lines = [f"{'metric':<{width}}" + "".join(f"{n:>{colw}}" for n in names), "-" * (width + colw * len(names))]
    for c in cols:
        lines.append(f"{c:<{width}}" + "".join(f"{_fmt(c, v.overall.get(c)):>{colw}}" for v in report.variants))
    tasks = sorted({t for v in report.variants for d in v.per_task.values() for t in d})
    if per_task and len(tasks) > 1:
        for c in [c for c in cols if c != "ppl"]:
            lines += ["", f"{c} by task"]
            for t in tasks:
                lines.append(f"  {t:<{width - 2}}" + "".join(f"{_fmt(c, v.per_task.get(c, {}).get(t)):>{colw}}"
                                                             for v in report.variants))
    return "\n".join(lines)


def format_report(report: EvalReport) -> str:
    out = [f"evaluated {report.n} records of {report.data} with {', '.join(report.metrics)}", "",
           format_table(report)]
    if report.files:
        out += [""] + [f"{k:<15} {v}" for k, v in report.files.items()]
    return "\n".join(out)


class MetricsCallback(TrainCallback):
    """A ``train(callbacks=...)`` callback: the overall metrics of ``items`` at each evaluation point.

    Keys are ``prefix + column`` (e.g. ``eval/exact_match``) and land in ``metrics.jsonl``.
    ``kwargs`` go to :func:`evaluate_model`.
    """

    def __init__(self, tokenizer, items: list[EvalItem], metrics: Sequence[str], prefix: str = "eval/",
                 **kwargs: Any):
        check_metrics(metrics, items, kwargs.get("pattern"), kwargs.get("schema"))
        self.tokenizer, self.items, self.metrics, self.prefix, self.kwargs = tokenizer, items, metrics, prefix, kwargs

    def on_eval(self, step: int, model) -> dict[str, float]:
        result = evaluate_model(model, self.tokenizer, self.items, self.metrics, **self.kwargs)
        return {self.prefix + k: round(v, 5) for k, v in result.overall.items()}
