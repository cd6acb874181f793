"""Exact-match metrics over task examples, overall and per task."""

from __future__ import annotations

import json
import re
import string
from collections import defaultdict
from dataclasses import dataclass, field

from tuneforge.data.conversation import Example, Message
from tuneforge.errors import DataError
from tuneforge.eval.schema import matches_schema
from tuneforge.models.generate import generate

PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def exact_match(pred: str, ref: str) -> bool:
    """Equal after stripping surrounding whitespace."""
    return pred.strip() == ref.strip()


def normalize(text: str) -> str:
    """Lower-case, punctuation removed, whitespace collapsed."""
    return " ".join(PUNCTUATION.sub(" ", text.lower()).split())


def normalized_match(pred: str, ref: str) -> bool:
    """Equal ignoring case, punctuation and whitespace differences."""
    return normalize(pred) == normalize(ref)


def split_prompt(example: Example) -> tuple[list[Message], str]:
    """The messages before the final assistant turn, and that turn's content (the reference)."""
    if not example.messages or example.messages[-1].role != "assistant":
        raise DataError(f"{example.source or 'example'}: evaluation needs a conversation that ends "
                        "with an assistant turn (the reference answer)")
    return example.messages[:-1], example.messages[-1].content


def accuracies(hits: list[bool], tasks: list[str | None]) -> tuple[float, dict[str, float]]:
    by_task: dict[str, list[bool]] = defaultdict(list)
    for hit, task in zip(hits, tasks, strict=True):
        by_task[task or "default"].append(hit)
    overall = sum(hits) / len(hits) if hits else 0.0
    return overall, {t: sum(h) / len(h) for t, h in sorted(by_task.items())}


def score(preds: list[str], examples: list[Example]) -> dict:
    """Exact-match (and normalized-match) accuracy overall and per task."""
    if len(preds) != len(examples):
        raise ValueError(f"{len(preds)} predictions for {len(examples)} examples")
    pairs = list(zip(preds, [split_prompt(e)[1] for e in examples], strict=True))
    tasks = [e.task for e in examples]
    exact, per_task = accuracies([exact_match(p, r) for p, r in pairs], tasks)
    normalized, per_task_normalized = accuracies([normalized_match(p, r) for p, r in pairs], tasks)
    return {"n": len(preds), "exact_match": exact, "per_task": per_task,
            "normalized_match": normalized, "per_task_normalized": per_task_normalized}


def prompt_text(messages: list[Message]) -> str:
    """The last user turn (what the sample rows show)."""
    return next((m.content for m in reversed(messages) if m.role == "user"), "")


def sample_indices(examples: list[Example], n: int) -> list[int]:
    """Up to ``n`` indices, the first example of each task first, then the rest in order."""
    firsts: dict[str | None, int] = {}
    for i, e in enumerate(examples):
        firsts.setdefault(e.task, i)
    rest = [i for i in range(len(examples)) if i not in set(firsts.values())]
    return (list(firsts.values()) + rest)[:n]


@dataclass
class EvalResult:
    """Accuracy overall and per task, plus a few (prompt, prediction, reference) rows."""

    accuracy: float
    per_task: dict[str, float]
    n: int
    normalized_accuracy: float = 0.0
    samples: list[dict] = field(default_factory=list)


def evaluate_tasks(model, tokenizer, examples: list[Example], max_new_tokens: int = 32,
                   batch_size: int = 16, n_samples: int = 5) -> EvalResult:
    """Generate greedily from each example's prompt and compare with its assistant answer."""
    prompts = [split_prompt(e)[0] for e in examples]
    preds = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    s = score(preds, examples)
    samples = [{"task": examples[i].task, "prompt": prompt_text(prompts[i]), "pred": preds[i],
                "ref": examples[i].messages[-1].content} for i in sample_indices(examples, n_samples)]
    return EvalResult(accuracy=s["exact_match"], per_task=s["per_task"], n=s["n"],
                      normalized_accuracy=s["normalized_match"], samples=samples)


# --- format metrics (generation) -----------------------------------------------------------------


def contains_match(pred: str, ref: str) -> bool:
    """The normalized reference occurs in the normalized prediction (as whole words)."""
    p, r = normalize(pred), normalize(ref)
    return bool(r) and f" {r} " in f" {p} "


def regex_match(pred: str, pattern: str) -> bool:
    """The whole stripped prediction matches ``pattern`` (``re.fullmatch``, DOTALL)."""
    return re.fullmatch(pattern, pred.strip(), flags=re.DOTALL) is not None


def parse_json(text: str) -> tuple[bool, object]:
    """(True, value) when the stripped text is one JSON document, else (False, None). No fences allowed:
    a strict-format task that asks for JSON gets no credit for wrapping it in Markdown."""
    try:
        return True, json.loads(text.strip())
    except ValueError:
        return False, None


def json_valid(pred: str) -> bool:
    """The prediction is valid JSON."""
    return parse_json(pred)[0]


def json_equal(pred: str, ref: str) -> bool:
    """Prediction and reference parse to the same JSON value (key order and spacing ignored)."""
    ok_p, p = parse_json(pred)
    ok_r, r = parse_json(ref)
    return ok_p and ok_r and p == r


def json_schema_match(pred: str, schema: dict) -> bool:
    """The prediction is valid JSON that validates against ``schema``."""
    ok, value = parse_json(pred)
    return ok and matches_schema(value, schema)
