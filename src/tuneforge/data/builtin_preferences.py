"""``builtin:preferences``: preference pairs generated from the builtin tasks, deterministic by seed.

Every pair asks a builtin task's question (:mod:`tuneforge.data.builtin_tasks`) and prefers its exact,
bare answer over one of two measurably worse ones:

- ``wrong``: the answer to another input of the same task (a well-formed but incorrect answer);
- ``chatty``: the right answer wrapped in filler ("Sure! Here is the answer you asked for: ...").

A model that learned the preference answers more prompts exactly (correct and bare), which the demo
measures on prompts no training pair contains: ``test`` holds unseen inputs of the trained task types,
``heldout`` the task types kept out of training (``HELD_OUT_TASKS``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tuneforge.data.builtin_tasks import HELD_OUT_TASKS, TASKS, Task, draw
from tuneforge.data.conversation import Message
from tuneforge.data.preference import PreferencePair

KINDS = ("wrong", "chatty")
OPENERS = ("Sure! Here is the answer you asked for:", "Great question! Let me think about it. The answer is",
           "Of course, I would be happy to help with that. It is", "Okay, so after careful consideration, I'd say")
CLOSERS = ("Let me know if you need anything else!", "I hope this helps you with your task.",
           "Feel free to ask me more questions like this.", "Have a wonderful day!")


@dataclass
class PreferenceSplits:
    """Train and test pairs of the trained task types, and pairs of the held-out task types."""

    train: list[PreferencePair]
    test: list[PreferencePair]
    heldout: list[PreferencePair]


def chatty(answer: str, rng: random.Random) -> str:
    """``answer`` padded with a chatty opener and closer."""
    return f"{rng.choice(OPENERS)} {answer}. {rng.choice(CLOSERS)}"


def _wrong(answer: str, pool: list[tuple[str, str]], rng: random.Random) -> str | None:
    others = sorted({a for _, a in pool if a != answer})
    return rng.choice(others) if others else None


def _pairs(task: Task, items: list[tuple[str, str]], pool: list[tuple[str, str]], rng: random.Random,
           start: int) -> list[PreferencePair]:
    out = []
    for i, (prompt, answer) in enumerate(items, start=start):
        kind = rng.choice(KINDS)
        rejected = _wrong(answer, pool, rng) if kind == "wrong" else None
        if rejected is None:  # a task whose every input has the same answer has no wrong one to offer
            kind, rejected = "chatty", chatty(answer, rng)
        out.append(PreferencePair([Message("user", prompt)], [Message("assistant", answer)],
                                  [Message("assistant", rejected)], f"builtin:preferences#{kind}/{task.name}/{i}",
                                  task.name))
    return out


def builtin_preferences(seed: int = 0, n_train: int = 40, n_test: int = 20) -> PreferenceSplits:
    """``n_train`` and ``n_test`` pairs per trained task type, ``n_test`` per held-out type.

    Test and held-out prompts never occur in train; each pair's kind (``wrong`` or ``chatty``) is in its
    ``source``. The same seed gives the same pairs.
    """
    train: list[PreferencePair] = []
    test: list[PreferencePair] = []
    heldout: list[PreferencePair] = []
    for name, task in TASKS.items():
        rng = random.Random(f"builtin:preferences/{seed}/{name}")
        if name in HELD_OUT_TASKS:
            items = draw(task, rng, n_test)
            heldout += _pairs(task, items, items, rng, 0)
            continue
        items = draw(task, rng, n_test + n_train)
        test += _pairs(task, items[:n_test], items, rng, 0)
        train += _pairs(task, items[n_test:], items, rng, n_test)
    random.Random(f"builtin:preferences/{seed}/order").shuffle(train)
    return PreferenceSplits(train=train, test=test, heldout=heldout)


def pair_kind(pair: PreferencePair) -> str:
    """``wrong`` or ``chatty``: which worse answer a builtin pair rejects."""
    return pair.source.split("#", 1)[1].split("/", 1)[0]
