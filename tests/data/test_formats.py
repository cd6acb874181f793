"""Normalizing dataset formats to Examples: each format, detection, mapping, validation, oasst."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tuneforge.data.conversation import Example, Message
from tuneforge.data.formats import (
    END_OF_TEXT_LITERALS,
    FORMATS,
    detect_format,
    load_examples,
    map_fields,
    strip_end_of_text,
)
from tuneforge.errors import ConfigError, DataError


def jsonl(tmp_path, rows: list, name: str = "d.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def turns(ex: Example) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in ex.messages]


def load_error(path, **kw) -> str:
    with pytest.raises(DataError) as e:
        load_examples(path, **kw)
    return str(e.value)


# --- end-of-text literals ----------------------------------------------------------------------------


@pytest.mark.parametrize("lit", END_OF_TEXT_LITERALS)
def test_strip_each_literal_and_the_space_before_it(lit):
    assert strip_end_of_text(f"Business {lit}") == "Business"
    assert strip_end_of_text(f"Business\n{lit}\n") == "Business"


def test_strip_leaves_other_text_alone():
    assert strip_end_of_text("  keep leading and trailing  \n") == "  keep leading and trailing  \n"
    assert strip_end_of_text("a <|endoftext|> in the middle") == "a <|endoftext|> in the middle"
    assert strip_end_of_text("x</s><|endoftext|>") == "x"


# --- each format -------------------------------------------------------------------------------------


def test_alpaca(tmp_path):
    p = jsonl(tmp_path, [
        {"instruction": "Add.", "input": "2 + 3", "output": " 5<|endoftext|>"},
        {"instruction": "Greet.", "input": "", "output": "Hi", "system": "Be brief."},
    ])
    r = load_examples(p)
    assert r.format == "alpaca" and r.skipped == [] and r.path == p
    assert turns(r.examples[0]) == [("user", "Add.\n\n2 + 3"), ("assistant", " 5")]
    assert turns(r.examples[1]) == [("system", "Be brief."), ("user", "Greet."), ("assistant", "Hi")]
    assert r.examples[1].source == f"{p}:2" and r.examples[1].task is None


def test_dolly_context_and_category_as_task(tmp_path):
    p = jsonl(tmp_path, [
        {"instruction": "Who?", "context": "Ann wrote it.", "response": "Ann", "category": "closed_qa"},
        {"instruction": "Why?", "context": "", "response": "Because", "category": "open_qa"},
    ])
    r = load_examples(p)
    assert r.format == "dolly"
    assert turns(r.examples[0]) == [("user", "Who?\n\nAnn wrote it."), ("assistant", "Ann")]
    assert [e.task for e in r.examples] == ["closed_qa", "open_qa"]
    assert load_examples(p, task="mine").examples[0].task == "mine"


def test_prompt_completion_trims_prompt_newlines_and_end_of_text(tmp_path):
    p = jsonl(tmp_path, [{"prompt": "Label this:\n", "completion": "Sports<|endoftext|>", "task": "news"}])
    ex = load_examples(p).examples[0]
    assert turns(ex) == [("user", "Label this:"), ("assistant", "Sports")] and ex.task == "news"


def test_messages_with_weights_and_task(tmp_path):
    p = jsonl(tmp_path, [{"task": "chat", "messages": [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1", "weight": 0},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2<|im_end|>", "weight": 1},
    ]}])
    ex = load_examples(p).examples[0]
    assert ex.messages == [Message("system", "S"), Message("user", "Q1"), Message("assistant", "A1", False),
                           Message("user", "Q2"), Message("assistant", "A2", True)]
    assert ex.task == "chat"


def test_sharegpt_roles_system_and_weight(tmp_path):
    p = jsonl(tmp_path, [
        {"system": "Sys", "conversations": [{"from": "human", "value": "Hi"},
                                            {"from": "gpt", "value": "Hello</s>", "weight": 1}]},
        {"conversations": [{"from": "system", "value": "S2"}, {"from": "user", "value": "Q"},
                           {"from": "assistant", "value": "A"}]},
    ])
    r = load_examples(p)
    assert r.format == "sharegpt"
    assert r.examples[0].messages == [Message("system", "Sys"), Message("user", "Hi"),
                                      Message("assistant", "Hello", True)]
    assert turns(r.examples[1]) == [("system", "S2"), ("user", "Q"), ("assistant", "A")]


def test_text_jsonl_and_plain_text_file(tmp_path):
    p = jsonl(tmp_path, [{"text": "Once upon a time </s>"}])
    assert load_examples(p).examples == [Example(text="Once upon a time </s>", source=f"{p}:1")]
    md = tmp_path / "notes.md"
    md.write_text("# Title\n\nBody.\n")
    r = load_examples(md)
    assert r.format == "text" and [e.text for e in r.examples] == ["# Title\n\nBody.\n"]


def test_csv_json_and_parquet_inputs(tmp_path):
    csv_path = tmp_path / "a.csv"
    csv_path.write_text("instruction,input,output\nAdd,1+1,2\n")
    assert turns(load_examples(csv_path).examples[0]) == [("user", "Add\n\n1+1"), ("assistant", "2")]
    json_path = tmp_path / "a.json"
    json_path.write_text(json.dumps({"data": [{"prompt": "P", "completion": "C"}]}))
    assert load_examples(json_path).examples[0].source == f"{json_path}:1 (.data[0])"
    pq_path = tmp_path / "m.parquet"
    msgs = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]
    pq.write_table(pa.table({"messages": msgs}), pq_path)
    ex = load_examples(pq_path).examples[0]
    assert turns(ex) == [("user", "q"), ("assistant", "a")] and ex.source == f"{pq_path}:row 0"


# --- detection and mapping -----------------------------------------------------------------------------


@pytest.mark.parametrize("record,fmt", [
    ({"instruction": "", "input": "", "output": ""}, "alpaca"),
    ({"instruction": "", "context": "", "response": ""}, "dolly"),
    ({"prompt": "", "completion": ""}, "prompt_completion"),
    ({"messages": []}, "messages"),
    ({"conversations": []}, "sharegpt"),
    ({"message_tree_id": "t", "prompt": {"role": "prompter"}}, "oasst"),
    ({"message_id": "m", "parent_id": None, "role": "prompter", "text": ""}, "oasst"),
    ({"text": "", "meta": {}}, "text"),
])
def test_detect_format(record, fmt):
    assert detect_format(record, "x.jsonl:1") == fmt


def test_detect_failure_lists_fields_and_fixes():
    with pytest.raises(DataError) as e:
        detect_format({"question": "q", "answer": "a"}, "qa.jsonl:7")
    msg = str(e.value)
    assert msg.startswith("qa.jsonl:7") and "['answer', 'question']" in msg
    assert "format:" in msg and "fields:" in msg and "instruction, output" in msg
    assert all(f in msg for f in FORMATS)


def test_field_mapping(tmp_path):
    p = jsonl(tmp_path, [{"question": "Q?", "answer": "A", "instruction": "ignored"}])
    r = load_examples(p, fields={"instruction": "question", "output": "answer"})
    assert r.format == "alpaca" and turns(r.examples[0]) == [("user", "Q?"), ("assistant", "A")]
    assert map_fields({"q": 1, "x": 2}, {"prompt": "q"}) == {"prompt": 1, "x": 2}


def test_field_mapping_to_a_missing_column_names_the_users_column(tmp_path):
    p = jsonl(tmp_path, [{"question": "Q?", "answer": "A"}, {"question": "Q2", "output": "A2"}])
    msg = load_error(p, fields={"instruction": "question", "output": "answer"})
    assert f"{p}:2" in msg and "'answer' (mapped to 'output')" in msg


def test_bad_format_and_fields_arguments(tmp_path):
    p = jsonl(tmp_path, [{"text": "x"}])
    with pytest.raises(ConfigError, match="format: 'jsonl'.*alpaca"):
        load_examples(p, format="jsonl")
    with pytest.raises(ConfigError, match="fields.answer"):
        load_examples(p, fields={"answer": "a"})


def test_auto_requires_one_shape_explicit_format_does_not_detect(tmp_path):
    p = jsonl(tmp_path, [{"prompt": "P", "completion": "C"}, {"instruction": "I", "output": "O"}])
    msg = load_error(p)
    assert f"{p}:2" in msg and "'alpaca'" in msg and "'prompt_completion'" in msg and f"{p}:1" in msg
    r = load_examples(jsonl(tmp_path, [{"text": "a", "prompt": "p", "completion": "c"}], "t.jsonl"),
                      format="text")
    assert r.format == "text" and r.examples[0].text == "a"


# --- validation ------------------------------------------------------------------------------------------

BAD = [
    ({"instruction": "I"}, "missing field 'output'"),
    ({"instruction": "I", "output": 5}, "field 'output' must be a string, got int"),
    ({"instruction": "  ", "output": "O"}, "field 'instruction' is empty"),
    ({"instruction": "I", "output": "<|eot_id|>"}, "empty once the trailing end-of-text marker"),
    ({"messages": "hi"}, "field 'messages' must be a list"),
    ({"messages": ["hi"]}, "messages[0] must be an object"),
    ({"messages": [{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "a"}]},
     "field 'messages[0].content' must be a string, got a list"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\n"}]},
     "field 'messages[1].content' is empty"),
    ({"messages": [{"role": "tool", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "messages[0].role: unknown role (got 'tool'); use one of system, user, assistant"),
    ({"messages": [{"role": "user", "content": "q"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 2}]},
     "messages[1].weight must be 0 (not trained) or 1 (trained), got 2"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]},
     "every assistant turn has weight 0"),
    ({"conversations": [{"from": "bot", "value": "q"}]}, "conversations[0].from: unknown role (got 'bot')"),
    ({"prompt": "p", "completion": "c", "task": 3}, "field 'task' must be a string"),
]


@pytest.mark.parametrize("record,expect", BAD, ids=[b[1][:30] for b in BAD])
def test_bad_record_names_file_line_and_problem(tmp_path, record, expect):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    if "instruction" in record:
        good = {"instruction": "i", "output": "o"}
    elif "conversations" in record:
        good = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    elif "prompt" in record:
        good = {"prompt": "p", "completion": "c"}
    p = jsonl(tmp_path, [good, record], name="bad.jsonl")
    msg = load_error(p)
    assert msg.startswith(f"{p}:2: ") and expect in msg


def test_strict_stops_at_first_bad_record(tmp_path):
    p = jsonl(tmp_path, [{"text": "ok"}, {"text": ""}, {"text": 1}])
    assert load_error(p).startswith(f"{p}:2: ")


def test_skip_bad_reports_count_and_locations(tmp_path):
    rows = [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2"}, "{broken", "",
            {"prompt": "p5", "completion": "c5"}, {"prompt": "p6", "completion": "<|endoftext|>"}]
    p = jsonl(tmp_path, rows)
    r = load_examples(p, skip_bad=True)
    assert [e.source for e in r.examples] == [f"{p}:1", f"{p}:5"]
    assert [loc for loc, _ in r.skipped] == [f"{p}:2", f"{p}:3", f"{p}:6"]
    assert "missing field 'completion'" in r.skipped[0][1] and "invalid JSON" in r.skipped[1][1]


def test_skip_bad_first_record_undetectable_detects_from_the_next(tmp_path):
    p = jsonl(tmp_path, [{"q": 1}, {"text": "fine"}])
    r = load_examples(p, skip_bad=True)
    assert r.format == "text" and [loc for loc, _ in r.skipped] == [f"{p}:1"]


def test_skip_bad_still_raises_when_every_record_is_bad(tmp_path):
    p = jsonl(tmp_path, [{"prompt": "p"}, {"prompt": "p", "completion": " "}])
    msg = load_error(p, skip_bad=True)
    assert str(p) in msg and "all 2 records" in msg and f"{p}:1" in msg


# --- real data (P3) ------------------------------------------------------------------------------------


def test_p3_end_of_text_is_stripped(shared_data):
    r = load_examples(shared_data / "p3" / "ag_news_classify.jsonl")
    assert r.format == "prompt_completion" and len(r.examples) == 200 and r.skipped == []
    assistant = [m.content for e in r.examples for m in e.messages if m.role == "assistant"]
    assert len(assistant) == 200 and all(a.strip() for a in assistant)
    assert not any(a.endswith(END_OF_TEXT_LITERALS) for a in assistant)
    assert not any(e.messages[0].content.endswith("\n") for e in r.examples)


def test_p3_file_of_empty_completions_is_refused(shared_data):
    msg = load_error(shared_data / "p3" / "trec_trec1.jsonl", skip_bad=True)
    assert "trec_trec1.jsonl" in msg and "all 200 records" in msg and "end-of-text" in msg


# --- OpenAssistant -------------------------------------------------------------------------------------


def msg(mid, role, text, rank=None, replies=(), deleted=False):
    return {"message_id": mid, "role": role, "text": text, "rank": rank, "deleted": deleted,
            "lang": "en", "replies": list(replies)}


TREE = msg("m1", "prompter", "2+2?", replies=[
    # two unanswered follow-ups: both trim to the same conversation, which is kept once
    msg("m2", "assistant", "Four.", rank=1,
        replies=[msg("m4", "prompter", "Why?"), msg("m4b", "prompter", "?")]),
    msg("m3", "assistant", "4", rank=0, replies=[msg("m5", "prompter", "And 3+3?", replies=[
        msg("m6", "assistant", "Six", rank=None), msg("m7", "assistant", "6<|endoftext|>", rank=0)])]),
    msg("m8", "assistant", "rude", rank=2, deleted=True, replies=[msg("m9", "prompter", "?")]),
])
UNANSWERED = msg("u1", "prompter", "Anyone?")
EXPECTED = [
    [("user", "2+2?"), ("assistant", "4"), ("user", "And 3+3?"), ("assistant", "6")],
    [("user", "2+2?"), ("assistant", "4"), ("user", "And 3+3?"), ("assistant", "Six")],
    [("user", "2+2?"), ("assistant", "Four.")],
]


def flatten(node, parent=None, tree="t1"):
    row = {k: v for k, v in node.items() if k != "replies"} | {"parent_id": parent, "message_tree_id": tree}
    return [row] + [r for c in node["replies"] for r in flatten(c, node["message_id"], tree)]


def test_oasst_trees_export(tmp_path):
    p = jsonl(tmp_path, [{"message_tree_id": "t1", "tree_state": "ready_for_export", "prompt": TREE},
                         {"message_tree_id": "t2", "prompt": UNANSWERED}])
    r = load_examples(p)
    assert r.format == "oasst" and [turns(e) for e in r.examples] == EXPECTED
    assert [e.source for e in r.examples] == [f"{p}:1 (message m7)", f"{p}:1 (message m6)",
                                              f"{p}:1 (message m2)"]
    assert r.skipped == [
        (f"{p}:1 (message m8)", "deleted in oasst export (1 message under it left out too)"),
        (f"{p}:2 (message u1)", "oasst tree has no assistant reply (unanswered prompt), left out"),
    ]


def test_oasst_flat_export_in_any_order_matches_trees(tmp_path):
    rows = flatten(TREE) + flatten(UNANSWERED, tree="t2")
    random.Random(0).shuffle(rows)
    p = jsonl(tmp_path, rows)
    r = load_examples(p)
    assert r.format == "oasst" and [turns(e) for e in r.examples] == EXPECTED
    line_of = {row["message_id"]: i + 1 for i, row in enumerate(rows)}
    assert [e.source for e in r.examples] == [f"{p}:{line_of[m]}" for m in ("m7", "m6", "m2")]
    assert sorted(loc for loc, _ in r.skipped) == sorted([f"{p}:{line_of['m8']}", f"{p}:{line_of['u1']}"])


def test_oasst_flat_orphan_and_bad_role(tmp_path):
    rows = flatten(TREE) + [{"message_id": "x", "parent_id": "gone", "role": "assistant", "text": "hi"}]
    p = jsonl(tmp_path, rows)
    msg_ = load_error(p)
    assert f"{p}:{len(rows)}" in msg_ and "parent message gone is not in the file" in msg_
    r = load_examples(p, skip_bad=True)
    assert len(r.examples) == 3 and any("gone" in why for _, why in r.skipped)
    bad = [dict(flatten(TREE)[0], role="moderator")] + flatten(TREE)[1:]
    assert "unknown oasst role (got 'moderator')" in load_error(jsonl(tmp_path, bad, "role.jsonl"))


def test_oasst_tree_with_bad_node_names_its_path(tmp_path):
    tree = msg("m1", "prompter", "q", replies=[msg("m2", "assistant", 7)])
    msg_ = load_error(jsonl(tmp_path, [{"message_tree_id": "t", "prompt": tree}], "tree.jsonl"))
    assert "tree.jsonl:1" in msg_ and "prompt.replies[0].text" in msg_ and "must be a string" in msg_


@pytest.mark.parametrize(("turns_", "expect"), [
    ([("user", "q"), ("user", "q2"), ("assistant", "a")], "messages[1] is a user turn where a assistant turn belongs "
                                                           "(two user turns in a row)"),
    ([("user", "q"), ("assistant", "a"), ("assistant", "b")], "(two assistant turns in a row)"),
    ([("assistant", "a"), ("user", "q"), ("assistant", "b")], "(it starts with an assistant turn)"),
    ([("user", "q"), ("system", "s"), ("assistant", "a")], "messages[1] is a system turn after other turns"),
    ([("user", "q"), ("assistant", "a"), ("user", "more?")], "ends with a user turn (messages[2]) that has no answer"),
])
def test_malformed_conversations_are_bad_records_with_the_fix(tmp_path, turns_, expect):
    record = {"messages": [{"role": r, "content": c} for r, c in turns_]}
    p = jsonl(tmp_path, [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
                         record])
    msg = load_error(p)
    assert msg.startswith(f"{p}:2: ") and expect in msg
    assert load_examples(p, skip_bad=True).skipped[0][0] == f"{p}:2"


def test_sharegpt_turn_order_and_a_leading_system_turn(tmp_path):
    ok = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                            {"from": "gpt", "value": "a"}, {"from": "human", "value": "q2"},
                            {"from": "gpt", "value": "a2"}]}
    bad = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"},
                             {"from": "gpt", "value": "b"}]}
    p = jsonl(tmp_path, [ok, bad])
    result = load_examples(p, skip_bad=True)
    assert len(result.examples) == 1 and "conversations[2]" in result.skipped[0][1]
