import json
import random
import re
import string

import pytest

from tuneforge.data.builtin_tasks import HELD_OUT_TASKS, TASKS, builtin_tasks
from tuneforge.errors import ConfigError

# An independent answer for each task type, from the fields the task drew.
CHECKS = {
    "upper": lambda f: f["word"].upper(),
    "lower": lambda f: f["word"].lower(),
    "capitalize": lambda f: f["word"][0].upper() + f["word"][1:],
    "first_letter": lambda f: f["word"][0],
    "last_letter": lambda f: f["word"][-1],
    "first_word": lambda f: f["sentence"].split(" ")[0],
    "last_word": lambda f: f["sentence"].split(" ")[-1],
    "count_words": lambda f: str(len(f["sentence"].split(" "))),
    "repeat_word": lambda f: " ".join(f["word"] for _ in range(f["n"])),
    "sort_words": lambda f: ", ".join(sorted(f["words"].split(", "))),
    "join_hyphen": lambda f: f["words"].replace(" ", "-"),
    "add": lambda f: str(f["a"] + f["b"]),
    "sub": lambda f: str(f["a"] - f["b"]),
    "mul": lambda f: str(f["a"] * f["b"]),
    "larger": lambda f: str(max(f["a"], f["b"])),
    "smaller": lambda f: str(min(f["a"], f["b"])),
    "even_odd": lambda f: ["even", "odd"][f["n"] % 2],
    "km_to_m": lambda f: str(f["n"] * 1000),
    "kg_to_g": lambda f: str(f["n"] * 1000),
    "m_to_cm": lambda f: str(f["n"] * 100),
    "liters_to_ml": lambda f: str(f["n"] * 1000),
}


def test_registry_size_and_phrasings():
    assert len(TASKS) >= 20
    assert len(TASKS) - len(HELD_OUT_TASKS) >= 20
    assert set(HELD_OUT_TASKS) <= set(TASKS)
    for task in TASKS.values():
        assert 3 <= len(set(task.phrasings)) <= 5, task.name


@pytest.mark.parametrize("name", sorted(TASKS))
def test_answers_are_verifiable(name):
    rng = random.Random(name)
    for _ in range(30):
        prompt, answer, fields = TASKS[name](rng)
        assert answer and answer == answer.strip() and len(answer) <= 40
        for value in fields.values():
            assert str(value) in prompt
        if name in CHECKS:
            assert answer == CHECKS[name](fields)
        elif name == "to_json":
            assert json.loads(answer) == {"name": fields["name"], "age": fields["age"]}
        elif name in ("sentiment", "animal_or_fruit"):
            assert answer in fields["labels"].split(" or ")
        else:  # extraction: the answer is a substring of the text
            assert name.startswith("extract_") and answer in fields["text"]


def phrasing_regex(phrasing: str) -> re.Pattern:
    parts = string.Formatter().parse(phrasing)
    return re.compile("".join(re.escape(text) + (".+" if field is not None else "")
                              for text, field, _, _ in parts))


def test_every_prompt_matches_a_phrasing_and_every_phrasing_is_used():
    splits = builtin_tasks(seed=3)
    used = {name: set() for name in TASKS}
    for e in splits.train + splits.test + splits.heldout:
        matches = {p for p in TASKS[e.task].phrasings if phrasing_regex(p).fullmatch(e.messages[0].content)}
        assert matches, e.messages[0].content
        used[e.task] |= matches
    for name, task in TASKS.items():
        assert used[name] == set(task.phrasings), name


def test_deterministic_by_seed():
    a, b, c = builtin_tasks(seed=1), builtin_tasks(seed=1), builtin_tasks(seed=2)
    assert a == b
    assert a.train != c.train


def test_split_shapes_and_examples():
    splits = builtin_tasks(seed=0, n_train=7, n_test=4)
    trained = [n for n in TASKS if n not in HELD_OUT_TASKS]
    assert len(splits.train) == 7 * len(trained)
    assert len(splits.test) == 4 * len(trained)
    assert len(splits.heldout) == 4 * len(HELD_OUT_TASKS)
    for e in splits.train + splits.test + splits.heldout:
        assert [m.role for m in e.messages] == ["user", "assistant"]
        assert e.source.startswith(f"builtin:tasks#{e.task}/")
    sources = [e.source for e in splits.train + splits.test + splits.heldout]
    assert len(set(sources)) == len(sources)


def test_heldout_tasks_never_in_train_and_test_prompts_unseen():
    splits = builtin_tasks(seed=0)
    assert {e.task for e in splits.heldout} == set(HELD_OUT_TASKS)
    assert not {e.task for e in splits.train + splits.test} & set(HELD_OUT_TASKS)
    train_prompts = {e.messages[0].content for e in splits.train}
    assert not train_prompts & {e.messages[0].content for e in splits.test}
    assert len(train_prompts) == len(splits.train)


def test_too_many_examples_is_a_config_error():
    with pytest.raises(ConfigError, match="too few distinct inputs"):
        builtin_tasks(n_train=5000)
