import json

import pytest

from tuneforge.errors import DataError
from tuneforge.eval.items import auto_choices
from tuneforge.eval.sources import load_items


def write(tmp_path, records, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


def test_any_training_format_gives_prompt_and_reference(tmp_path):
    items = load_items(write(tmp_path, [
        {"prompt": "Say hi\n", "completion": "hi<|endoftext|>", "task": "greet"},
    ]))
    assert items[0].prompt[-1].content == "Say hi" and items[0].reference == "hi" and items[0].task == "greet"
    items = load_items(write(tmp_path, [{"messages": [{"role": "user", "content": "a"},
                                                      {"role": "assistant", "content": "b"}]}], "m.jsonl"))
    assert items[0].reference == "b"


def test_multiple_choice_records(tmp_path):
    items = load_items(write(tmp_path, [
        {"question": "2+3?", "choices": ["4", "5"], "answer": 1},
        {"prompt": "Sky?", "choices": ["blue", "red"], "answer": "blue", "schema": {"type": "string"}},
    ]))
    assert [i.answer_index for i in items] == [1, 0]
    assert items[0].reference == "5" and items[1].schema == {"type": "string"}


@pytest.mark.parametrize("record, message", [
    ({"question": "q", "choices": ["a", "b"], "answer": 2}, "outside choices"),
    ({"question": "q", "choices": ["a", "b"], "answer": "c"}, "not one of the choices"),
    ({"question": "q", "choices": ["a"], "answer": 0}, "at least 2"),
    ({"choices": ["a", "b"], "answer": 0}, "no prompt"),
    ({"question": "q", "choices": ["a", "b"]}, "correct answer"),
    ({"prompt": "p", "should_refuse": "yes"}, "true or false"),
])
def test_bad_records_name_their_line(tmp_path, record, message):
    with pytest.raises(DataError, match=message) as e:
        load_items(write(tmp_path, [{"prompt": "ok", "completion": "fine"}, record]))
    assert "d.jsonl:2" in str(e.value)


def test_refusal_prompts_need_no_reference(tmp_path):
    items = load_items(write(tmp_path, [{"prompt": "bad thing", "should_refuse": True}]))
    assert items[0].reference is None and items[0].should_refuse is True


def test_auto_choices_use_the_task_label_set(tmp_path):
    items = load_items(write(tmp_path, [
        {"prompt": "x1", "completion": "Sports", "task": "news"},
        {"prompt": "x2", "completion": "World", "task": "news"},
        {"prompt": "x3", "completion": "Sports", "task": "news"},
        {"prompt": "y", "completion": "unique answer", "task": "other"},
    ]))
    out = auto_choices(items)
    assert out[0].choices == ["Sports", "World"] and out[1].answer_index == 1
    assert out[3].choices is None  # a single distinct answer is no closed label set


def test_builtin_sources():
    assert len(load_items("builtin:probes")) >= 500
    refusal = load_items("builtin:refusal")
    assert {i.should_refuse for i in refusal} == {True, False}
    with pytest.raises(DataError, match="unknown builtin"):
        load_items("builtin:nope")


def test_limit_spreads_over_the_file_and_task_defaults_to_the_file_name(tmp_path):
    path = write(tmp_path, [{"prompt": f"p{i}", "completion": "A" if i < 5 else "B"} for i in range(10)],
                 "ag_news.jsonl")
    items = load_items(path, limit=4)
    assert [i.prompt[0].content for i in items] == ["p0", "p2", "p5", "p7"]
    assert {i.reference for i in items} == {"A", "B"} and items[0].task == "ag_news"
