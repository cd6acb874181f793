import json

import pytest

from tuneforge.cli import main
from tuneforge.data.conversation import Message
from tuneforge.eval.advise import (
    AdviseOptions,
    StrategyResult,
    break_even,
    few_shot_prompt,
    recommend,
    run_advise,
    split_items,
    user_prompt,
    wilson,
)
from tuneforge.eval.items import EvalItem


def strat(name, acc, cost=100.0, latency=0.1, training=0.0, tokens=50.0):
    return StrategyResult(name=name, accuracy=acc, accuracy_ci=(0, 1), prompt_tokens=tokens, output_tokens=3,
                          latency_s=latency, cost_per_million=cost, training_cost=training)


def item(q, a):
    return EvalItem(prompt=[Message("user", q)], reference=a)


def test_wilson_interval():
    lo, hi = wilson(5, 10)
    assert lo < 0.5 < hi and hi - lo == pytest.approx(0.53, abs=0.02)
    assert wilson(0, 10)[0] == 0.0


def test_break_even_volume():
    ft, prompt = strat("fine-tune", 0.5, cost=20.0, training=8.0), strat("5-shot", 0.5, cost=100.0)
    assert break_even(ft, prompt) == pytest.approx(8.0 / (80.0 / 1e6))
    assert break_even(strat("fine-tune", 0.5, cost=120.0, training=1.0), prompt) is None


@pytest.mark.parametrize("ft, n_train, metric, expected, why", [
    (strat("fine-tune", 0.80, cost=100), 500, "exact", "fine-tune", "more accurate"),
    (strat("fine-tune", 0.40, cost=1), 500, "exact", "prompt", "worse"),
    # comparable accuracy: cost at the expected volume decides
    (strat("fine-tune", 0.62, cost=10, training=1.0), 500, "exact", "fine-tune", "saving exceeds"),
    (strat("fine-tune", 0.62, cost=99.99, training=1000.0), 500, "exact", "prompt", "no measured gain"),
    (strat("fine-tune", 0.62, cost=120, latency=0.05), 500, "exact", "fine-tune", "faster"),
    (strat("fine-tune", 0.62, cost=120), 2000, "json", "fine-tune", "strict output format"),
    (strat("fine-tune", 0.62, cost=120), 2000, "contains", "prompt", "no measured gain"),
    # fewer than 100 examples: an 8-point gain is not enough
    (strat("fine-tune", 0.68, cost=120), 50, "exact", "prompt", "rule of thumb"),
    (strat("fine-tune", 0.68, cost=120), 500, "exact", "fine-tune", "more accurate"),
])
def test_recommendation_follows_the_numbers(ft, n_train, metric, expected, why):
    prompts = [strat("zero-shot", 0.1, cost=20), strat("3-shot", 0.6, cost=100), strat("5-shot", 0.6, cost=150,
                                                                                          tokens=90)]
    rec, best, reasons, _ = recommend(prompts + [ft], n_train, metric, expected_requests=1e6)
    assert best == "3-shot"  # the most accurate prompt, fewer tokens on a tie
    assert rec == expected
    assert why in " ".join(reasons)


def test_prompts():
    demos = [item("a", "A"), item("b", "B")]
    msgs = few_shot_prompt(demos, item("c", "C"))
    assert [(m.role, m.content) for m in msgs] == [("user", "a"), ("assistant", "A"), ("user", "b"),
                                                   ("assistant", "B"), ("user", "c")]
    msgs, system = user_prompt("Answer in capitals.\n\n{input}", item("c", "C"))
    assert msgs[0].content == "Answer in capitals.\n\nc" and system is None
    msgs, system = user_prompt("Be terse.", item("c", "C"))
    assert msgs[0].content == "c" and system == "Be terse."


def test_split_keeps_test_and_train_apart():
    items = [item(str(i), str(i)) for i in range(20)]
    test, pool = split_items(items, 50, seed=0)
    assert len(test) == 10 and len(pool) == 10  # at most half for testing
    assert not {i.reference for i in test} & {i.reference for i in pool}


def test_run_advise_end_to_end(tiny_model_dir, alpaca_file, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Reply with the word in upper case only.\n\n{input}")
    opts = AdviseOptions(data=str(alpaca_file), model=str(tiny_model_dir), shots=(1, 3), prompt_file=str(prompt),
                         metric="exact", n_test=6, train_steps=3, lr=1e-2, lora_r=4, latency_requests=2,
                         max_new_tokens=4, output=str(tmp_path / "adv"), threads=1, max_seq_len=128)
    advice = run_advise(opts, log=lambda *a: None)
    names = [s.name for s in advice.strategies]
    assert names == ["zero-shot", "1-shot", "3-shot", "your prompt", "fine-tune"]
    by = {s.name: s for s in advice.strategies}
    assert by["zero-shot"].prompt_tokens < by["1-shot"].prompt_tokens < by["3-shot"].prompt_tokens
    assert by["fine-tune"].prompt_tokens == by["zero-shot"].prompt_tokens
    z = by["zero-shot"]
    assert z.cost_per_million == pytest.approx((z.prompt_tokens + z.output_tokens) * 0.0005 / 1000 * 1e6)
    assert by["fine-tune"].training_s > 0
    assert by["fine-tune"].training_cost == pytest.approx(by["fine-tune"].training_s / 3600 * 2.0)
    assert advice.recommendation in ("prompt", "fine-tune") and advice.n_test == 6 and advice.n_train == 34
    saved = json.loads((tmp_path / "adv" / "advise.json").read_text())
    assert saved["recommendation"] == advice.recommendation
    assert (tmp_path / "adv" / "crossover.png").stat().st_size > 0
    assert "Recommendation" in (tmp_path / "adv" / "advise.md").read_text()


def test_cli_advise_rejects_bad_shots(tmp_path, capsys):
    assert main(["advise", "--data", "x.jsonl", "--shots", "a,b"]) == 2
    assert "--shots" in capsys.readouterr().err
