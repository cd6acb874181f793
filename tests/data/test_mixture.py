"""Mixtures, validation splits and held-out tasks."""

from __future__ import annotations

from collections import Counter

import pytest

from tuneforge.data.conversation import Example, Message
from tuneforge.data.mixture import MixSource, hold_out_tasks, mix, split_validation
from tuneforge.errors import ConfigError, DataError


def _data(name: str, n: int, task: str | None = None) -> list[Example]:
    return [Example(messages=[Message("user", f"{name} {i}"), Message("assistant", "ok")],
                    source=f"{name}.jsonl:{i + 1}", task=task) for i in range(n)]


def _sources(result) -> list[str]:
    return [ex.source for ex in result.examples]


def test_mix_is_deterministic_by_seed_and_shuffled():
    ds = [MixSource("a", _data("a", 30)), MixSource("b", _data("b", 20), weight=0.5)]
    first, again, other = mix(ds, seed=1), mix(ds, seed=1), mix(ds, seed=2)
    assert _sources(first) == _sources(again)
    assert _sources(first) != _sources(other)
    assert sorted(_sources(first)) != _sources(first)
    # Only the order changes with the seed when nothing is subsampled.
    assert sorted(_sources(mix([ds[0]], 1))) == sorted(_sources(mix([ds[0]], 2)))


def test_weights_subsample_and_repeat():
    ds = [MixSource("a", _data("a", 40), weight=0.25), MixSource("b", _data("b", 10), weight=2.5),
          MixSource("c", _data("c", 7))]
    result = mix(ds, seed=0)
    assert result.counts == {"a": 10, "b": 25, "c": 7}
    per = Counter(ex.source for ex in result.examples)
    assert len({s for s in per if s.startswith("a")}) == 10 and max(per[s] for s in per if s[0] == "a") == 1
    b = [per[f"b.jsonl:{i + 1}"] for i in range(10)]
    assert sorted(b) == [2] * 5 + [3] * 5  # two whole copies plus half of it once more
    assert all(per[f"c.jsonl:{i + 1}"] == 1 for i in range(7))


def test_cap_applies_before_weight():
    examples, counts = mix([MixSource("a", _data("a", 100), weight=2.0, max_examples=10)], seed=3)
    assert counts == {"a": 20} and len(examples) == 20
    assert len({ex.source for ex in examples}) == 10
    assert Counter(ex.source for ex in examples).most_common()[-1][1] == 2


def test_adding_a_source_leaves_other_samples_unchanged():
    a = MixSource("a", _data("a", 50), weight=0.2)
    alone = set(_sources(mix([a], seed=5)))
    both = {s for s in _sources(mix([a, MixSource("b", _data("b", 5))], seed=5)) if s.startswith("a")}
    assert alone == both


def test_task_defaults_to_source_name_without_changing_inputs():
    data = _data("a", 3) + _data("t", 2, task="trec")
    result = mix([MixSource("mine", data)], seed=0)
    assert Counter(ex.task for ex in result.examples) == {"mine": 3, "trec": 2}
    assert all(ex.task is None for ex in data[:3])


def test_mix_errors():
    with pytest.raises(ConfigError, match="weight"):
        mix([MixSource("a", _data("a", 3), weight=0)], seed=0)
    with pytest.raises(ConfigError, match="more than once"):
        mix([MixSource("a", _data("a", 3)), MixSource("a", _data("a", 3))], seed=0)
    with pytest.raises(DataError, match="empty_set"):
        mix([MixSource("empty_set", [])], seed=0)


def test_split_validation_count():
    data = _data("a", 100)
    train, val = split_validation(data, 10, seed=0)
    assert len(val) == 10 and len(train) == 90
    assert {e.source for e in train} | {e.source for e in val} == {e.source for e in data}
    assert not {e.source for e in train} & {e.source for e in val}
    assert train == [e for e in data if e in train]  # input order kept
    assert split_validation(data, 10, seed=0) == (train, val)
    assert split_validation(data, 10, seed=1)[1] != val
    assert split_validation(data, 0, seed=0) == (data, [])


def test_split_validation_that_leaves_nothing_to_train_is_refused():
    with pytest.raises(ConfigError, match="leaves no training examples"):
        split_validation(_data("a", 5), 5, seed=0)


def test_hold_out_tasks_by_name_and_pattern():
    data = _data("a", 4, "ag_news_classify") + _data("b", 3, "ag_news_recommend") + _data("c", 5, "trec")
    kept, held = hold_out_tasks(data, ["trec"])
    assert {e.task for e in held} == {"trec"} and len(held) == 5 and len(kept) == 7
    kept, held = hold_out_tasks(data, ["ag_news*"])
    assert len(held) == 7 and {e.task for e in kept} == {"trec"}
    assert kept == [e for e in data if e.task == "trec"]


def test_hold_out_unknown_task_lists_tasks_present():
    data = _data("a", 2, "trec") + _data("b", 2, "samsum")
    with pytest.raises(ConfigError, match=r"\['gigaword'\].*\['samsum', 'trec'\]"):
        hold_out_tasks(data, ["trec", "gigaword"])


def test_first_per_task_keeps_order_and_caps_each_task():
    from tuneforge.data.conversation import Example
    from tuneforge.data.mixture import first_per_task

    exs = [Example(text=str(i), task="ab"[i % 2]) for i in range(7)]
    assert [e.text for e in first_per_task(exs, 2)] == ["0", "1", "2", "3"]
