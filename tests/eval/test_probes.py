from collections import Counter

import pytest

from tuneforge.eval.forgetting import score_probes
from tuneforge.eval.probes import Probe, all_probes, probe_items, sample_probes


def test_several_hundred_probes_in_every_category():
    probes = all_probes()
    assert len(probes) >= 500
    counts = Counter(p.category for p in probes)
    assert len(counts) >= 8 and min(counts.values()) >= 15
    assert len({(p.cloze, p.answer) for p in probes}) == len(probes)


def test_distractors_are_three_distinct_wrong_answers():
    for p in all_probes():
        assert len(p.distractors) == 3 and len(set(p.distractors)) == 3, p
        assert p.answer not in p.distractors, p
        assert p.cloze[0].isupper() or p.cloze[0].isdigit(), p


def test_deterministic_and_sampled_by_category():
    assert all_probes() == all_probes()
    sample = sample_probes(100)
    assert len(sample) == 100 and sample == sample_probes(100)
    assert len({p.category for p in sample}) == len({p.category for p in all_probes()})


def test_probe_items_carry_the_options():
    item = probe_items([Probe("c", "The capital of France is", "Paris", ("Rome", "Oslo", "Bern"))])[0]
    assert item.reference == "Paris" and item.choices[item.answer_index] == "Paris" and len(item.choices) == 4


def test_score_probes_counts_a_hit_only_when_the_answer_wins(tiny_model, tiny_tokenizer, monkeypatch):
    import tuneforge.eval.forgetting as fg
    from tuneforge.eval.scoring import ContinuationScore

    probes = [Probe("a", "x is", "yes", ("no", "maybe", "never")), Probe("b", "y is", "yes", ("no", "maybe", "never"))]
    # first probe: the answer scores best; second: a distractor ties it (not a hit)
    values = iter([-1.0, -2.0, -3.0, -4.0, -2.0, -2.0, -3.0, -4.0])

    def fake(model, pairs, pad_id=0, batch_size=32):
        return [ContinuationScore(next(values), 2, False) for _ in pairs]

    monkeypatch.setattr(fg, "continuation_logprobs", fake)
    r = score_probes(tiny_model, tiny_tokenizer, probes)
    assert r.accuracy == 0.5 and r.per_category == {"a": 1.0, "b": 0.0}
    assert r.answer_nll == pytest.approx((1.0 + 2.0) / 4)
