"""Weighted dataset mixtures, validation splits and held-out tasks (all deterministic by seed)."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from typing import NamedTuple

from tuneforge.data.conversation import Example
from tuneforge.errors import ConfigError, DataError


@dataclass
class MixSource:
    """One dataset of a mixture.

    ``max_examples`` caps the dataset first (a seeded subsample); then ``weight`` scales it to
    ``round(weight * n)`` examples: below 1 subsamples, above 1 repeats (whole copies plus a
    seeded subsample for the fraction).
    """

    name: str
    examples: list[Example]
    weight: float = 1.0
    max_examples: int | None = None


class MixResult(NamedTuple):
    """The shuffled mixture and how many examples each source contributed (unpacks as a pair)."""

    examples: list[Example]
    counts: dict[str, int]


def mix(datasets: list[MixSource], seed: int) -> MixResult:
    """Sample each source by its cap and weight, then shuffle them together.

    Examples without a task get the source's name as their task (copies; inputs are not changed).
    """
    names = [d.name for d in datasets]
    if not datasets:
        raise ConfigError("data.train: the mixture has no datasets; name at least one file.")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"data.train: datasets {dup} appear more than once; give each a distinct "
                          "task name.")
    out: list[Example] = []
    counts: dict[str, int] = {}
    for d in datasets:
        if not d.weight > 0:
            raise ConfigError(f"data.train[{d.name}].weight: must be > 0, got {d.weight}.")
        if d.max_examples is not None and d.max_examples <= 0:
            raise ConfigError(f"data.train[{d.name}].max_examples: must be > 0, got {d.max_examples}.")
        if not d.examples:
            raise DataError(f"{d.name}: the dataset has no examples; check the file and its format.")
        rng = random.Random(f"{seed}:{d.name}")  # per source, so adding a source leaves others unchanged
        pool = d.examples
        if d.max_examples is not None and d.max_examples < len(pool):
            pool = _subsample(pool, d.max_examples, rng)
        target = round(d.weight * len(pool))
        copies, rest = divmod(target, len(pool))
        picked = pool * copies + _subsample(pool, rest, rng)
        out.extend(ex if ex.task is not None else replace(ex, task=d.name) for ex in picked)
        counts[d.name] = len(picked)
    random.Random(seed).shuffle(out)
    return MixResult(out, counts)


def split_validation(examples: list[Example], n_val: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Split off ``n_val`` validation examples (``dataset.validation_count`` says how many).

    Both parts keep the input order; the choice of validation examples depends only on ``seed``.
    """
    if n_val >= len(examples):
        raise ConfigError(f"data.val_fraction: a validation set of {n_val} leaves no training examples "
                          f"out of {len(examples)}; lower it or add data.")
    chosen = set(random.Random(seed).sample(range(len(examples)), n_val))
    train = [ex for i, ex in enumerate(examples) if i not in chosen]
    val = [ex for i, ex in enumerate(examples) if i in chosen]
    return train, val


def hold_out_tasks(examples: list[Example], tasks: list[str],
                   key: str = "data.holdout_tasks") -> tuple[list[Example], list[Example]]:
    """Split off every example whose task matches a name or glob pattern (``ag_news*``) in ``tasks``.

    Held-out tasks measure generalization to unseen tasks; a name matching no task is an error
    naming the config ``key``.
    """
    present = sorted({ex.task for ex in examples if ex.task is not None})
    missing = [t for t in tasks if not any(fnmatchcase(p, t) for p in present)]
    if missing:
        raise ConfigError(f"{key}: no example has task {missing}; tasks present: {present}.")
    kept, held = [], []
    for ex in examples:
        is_held = ex.task is not None and any(fnmatchcase(ex.task, t) for t in tasks)
        (held if is_held else kept).append(ex)
    return kept, held


def _subsample(pool: list[Example], n: int, rng: random.Random) -> list[Example]:
    """``n`` distinct examples in their original order."""
    return [pool[i] for i in sorted(rng.sample(range(len(pool)), n))]


def first_per_task(examples: list[Example], n: int) -> list[Example]:
    """The first ``n`` examples of each task, in their original order (an evaluation subset)."""
    counts: dict[str | None, int] = {}
    out = []
    for e in examples:
        if counts.get(e.task, 0) < n:
            out.append(e)
            counts[e.task] = counts.get(e.task, 0) + 1
    return out
