import pytest

import tuneforge.eval.metrics as metrics_module
from tuneforge.data.builtin_tasks import builtin_tasks
from tuneforge.data.conversation import Example, Message
from tuneforge.errors import DataError
from tuneforge.eval.metrics import EvalResult, evaluate_tasks, exact_match, normalized_match, score


def ex(prompt: str, answer: str, task: str | None = "t") -> Example:
    return Example(messages=[Message("user", prompt), Message("assistant", answer)], task=task)


def test_exact_match_strips_only_surrounding_whitespace():
    assert exact_match(" APPLE\n", "APPLE")
    assert not exact_match("apple", "APPLE")
    assert not exact_match("APPLE.", "APPLE")
    assert not exact_match("The answer is 5", "5")


def test_normalized_match_ignores_case_punctuation_whitespace():
    assert normalized_match("Apple.", "apple")
    assert normalized_match('{"name":  "Ann",\n"age": 3}', '{"name": "Ann", "age": 3}')
    assert not normalized_match("apple pie", "apple")
    assert not normalized_match("5", "6")


def test_score_overall_and_per_task():
    examples = [ex("a", "1", "x"), ex("b", "2", "x"), ex("c", "Yes", "y"), ex("d", "4", None)]
    s = score(["1", "3", "yes!", "4"], examples)
    assert s["n"] == 4
    assert s["exact_match"] == pytest.approx(0.5)
    assert s["per_task"] == {"default": 1.0, "x": 0.5, "y": 0.0}
    assert s["normalized_match"] == pytest.approx(0.75)
    assert s["per_task_normalized"]["y"] == 1.0


def test_score_rejects_bad_input():
    with pytest.raises(ValueError):
        score(["1"], [ex("a", "1"), ex("b", "2")])
    with pytest.raises(DataError, match="assistant"):
        score(["1"], [Example(messages=[Message("user", "hi")], source="f.jsonl:3")])


def test_evaluate_tasks_prompts_without_answer(monkeypatch):
    examples = builtin_tasks(n_train=1, n_test=2).test[:6]
    seen = {}

    def fake_generate(model, tokenizer, prompts, **kwargs):
        seen["prompts"], seen["kwargs"] = prompts, kwargs
        return [p[-1].content if i % 2 else e.messages[-1].content
                for i, (p, e) in enumerate(zip(prompts, examples, strict=True))]

    monkeypatch.setattr(metrics_module, "generate", fake_generate)
    result = evaluate_tasks(None, None, examples, max_new_tokens=7, batch_size=3)
    assert seen["prompts"] == [e.messages[:-1] for e in examples]
    assert seen["kwargs"] == {"max_new_tokens": 7, "batch_size": 3}
    assert isinstance(result, EvalResult)
    assert result.n == 6 and result.accuracy == pytest.approx(0.5)
    assert set(result.per_task) == {e.task for e in examples}
    row = result.samples[0]
    assert row == {"task": examples[0].task, "prompt": examples[0].messages[0].content,
                   "pred": examples[0].messages[1].content, "ref": examples[0].messages[1].content}
    assert len({r["task"] for r in result.samples}) == len(result.per_task)  # one row per task first


def test_evaluate_tasks_with_tiny_model(tiny_model, tiny_tokenizer):
    examples = [ex("Hello world", "x", "a"), ex("Upper-case the word: apple", "APPLE", "b")]
    result = evaluate_tasks(tiny_model, tiny_tokenizer, examples, max_new_tokens=4)
    preds = [r["pred"] for r in result.samples]
    assert result.accuracy == score(preds, examples)["exact_match"]
    assert result.per_task.keys() == {"a", "b"}
