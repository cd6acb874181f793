"""Preference pairs: formats detected, bad records named, skip accounting, tokenization, batching."""

from __future__ import annotations

import json

import pytest

from tuneforge.data.builtin_preferences import OPENERS, builtin_preferences, pair_kind
from tuneforge.data.builtin_tasks import HELD_OUT_TASKS
from tuneforge.data.preference import (
    collate_pairs,
    encode_pair,
    encode_pairs,
    load_pairs,
    render_pair,
)
from tuneforge.data.template import IGNORE, TooLongError
from tuneforge.errors import ConfigError, DataError


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _roles(messages):
    return [(m.role, m.content) for m in messages]


STANDARD = {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "The answer is 6."}
CONVERSATIONAL = {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
                  "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}]}
HH = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Name a fruit.\n\nAssistant: An apple.",
      "rejected": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Name a fruit.\n\nAssistant: No."}


@pytest.mark.parametrize(("record", "fmt"), [(STANDARD, "prompt_chosen_rejected"), (CONVERSATIONAL, "messages_pairs"),
                                             (HH, "hh_rlhf")])
def test_formats_are_detected(tmp_path, record, fmt):
    result = load_pairs(_write(tmp_path / "p.jsonl", [record, record]))
    assert result.format == fmt
    assert len(result.pairs) == 2 and not result.skipped
    assert result.pairs[1].source == f"{tmp_path / 'p.jsonl'}:2"


def test_standard_pair_fields(tmp_path):
    pair = load_pairs(_write(tmp_path / "p.jsonl", [{**STANDARD, "system": "Be brief."}])).pairs[0]
    assert _roles(pair.prompt) == [("system", "Be brief."), ("user", "What is 2 + 3?")]
    assert _roles(pair.chosen) == [("assistant", "5")]
    assert _roles(pair.rejected) == [("assistant", "The answer is 6.")]


def test_conversational_shared_prefix_and_explicit_prompt(tmp_path):
    pair = load_pairs(_write(tmp_path / "p.jsonl", [CONVERSATIONAL])).pairs[0]
    assert _roles(pair.prompt) == [("user", "Hi")]
    assert _roles(pair.chosen) == [("assistant", "Hello!")]
    explicit = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Yo"}],
                "rejected": [{"role": "assistant", "content": "No"}]}
    pair = load_pairs(_write(tmp_path / "q.jsonl", [explicit])).pairs[0]
    assert _roles(pair.prompt) == [("user", "Hi")] and _roles(pair.rejected) == [("assistant", "No")]


def test_hh_split_at_last_assistant_turn(tmp_path):
    pair = load_pairs(_write(tmp_path / "p.jsonl", [HH])).pairs[0]
    assert _roles(pair.prompt) == [("user", "Hi"), ("assistant", "Hello."), ("user", "Name a fruit.")]
    assert _roles(pair.chosen) == [("assistant", "An apple.")]
    assert _roles(pair.rejected) == [("assistant", "No.")]


def test_field_mapping(tmp_path):
    record = {"question": "Q?", "good": "A", "bad": "B"}
    result = load_pairs(_write(tmp_path / "p.jsonl", [record]),
                        fields={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert result.format == "prompt_chosen_rejected"
    assert _roles(result.pairs[0].chosen) == [("assistant", "A")]
    with pytest.raises(ConfigError, match="fields.answer"):
        load_pairs(tmp_path / "p.jsonl", fields={"answer": "good"})


@pytest.mark.parametrize(("bad", "reason"), [
    ({"prompt": "Q", "chosen": "A"}, "cannot tell the preference format"),
    ({"prompt": "Q", "chosen": "A", "rejected": "A"}, "the same answer"),
    ({"prompt": "Q", "chosen": "A", "rejected": 3}, "'rejected' must be a string"),
    ({"chosen": "just text", "rejected": "other text"}, "not an HH transcript"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}, "differ before"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
      "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]}, "share no leading"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "bot", "content": "x"}],
      "rejected": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "y"}]}, r"chosen\[1\].role"),
])
def test_bad_record_named_with_file_and_line(tmp_path, bad, reason):
    path = _write(tmp_path / "p.jsonl", [bad])
    with pytest.raises(DataError, match=rf"p\.jsonl:1: .*{reason}"):
        load_pairs(path)


def test_skip_bad_counts_exact(tmp_path):
    records = [STANDARD, {"prompt": "Q", "chosen": "A", "rejected": "A"}, "{not json", STANDARD,
               {"prompt": "Q", "chosen": "", "rejected": "B"}, CONVERSATIONAL, STANDARD]
    path = _write(tmp_path / "p.jsonl", records)
    with pytest.raises(DataError, match=r"p\.jsonl:2: .*the same answer"):
        load_pairs(path)
    result = load_pairs(path, skip_bad=True)
    assert len(result.pairs) == 3
    assert [loc.rsplit(":", 1)[1] for loc, _ in result.skipped] == ["2", "3", "5", "6"]
    assert "looks like 'messages_pairs'" in result.skipped[3][1]


def test_file_without_usable_pair_raises(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": "A", "rejected": "A"}])
    with pytest.raises(DataError, match="no usable preference pairs: all 1 records"):
        load_pairs(path, skip_bad=True)


def test_encode_pair_labels_and_prompt(tiny_tokenizer):
    pair = load_pair_from(STANDARD)
    tp = encode_pair(pair, tiny_tokenizer, 128)
    end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    for tok, answer in ((tp.chosen, "5"), (tp.rejected, "The answer is 6.")):
        assert all(x == IGNORE for x in tok.labels[:tp.prompt_len])
        trained = [t for t, x in zip(tok.input_ids, tok.labels, strict=True) if x != IGNORE]
        assert trained[-1] == end
        assert tiny_tokenizer.decode(trained[:-1]) == answer
    assert tp.chosen.input_ids[:tp.prompt_len] == tp.rejected.input_ids[:tp.prompt_len]
    assert tiny_tokenizer.decode(tp.chosen.input_ids[:tp.prompt_len]).endswith("<|im_start|>assistant\n")


def load_pair_from(record):
    from tuneforge.data.preference import normalize_pair

    return normalize_pair(record, "prompt_chosen_rejected", "f.jsonl:1")


def test_too_long_names_record_answer_and_fix(tiny_tokenizer):
    pair = load_pair_from({**STANDARD, "rejected": "word " * 200})
    with pytest.raises(TooLongError, match=r"f\.jsonl:1 \(rejected answer\): .*max_len 64.*max_seq_len"):
        encode_pair(pair, tiny_tokenizer, 64)
    kept, skipped = encode_pairs([load_pair_from(STANDARD), pair], tiny_tokenizer, 64, skip_bad=True)
    assert len(kept) == 1 and [loc for loc, _ in skipped] == ["f.jsonl:1"]


def test_render_pair_marks_both_answers(tiny_tokenizer):
    text = render_pair(encode_pair(load_pair_from(STANDARD), tiny_tokenizer, 128), tiny_tokenizer)
    prompt = text.split("\nchosen: ")[0]
    assert prompt.startswith("prompt: <|im_start|>user\nWhat is 2 + 3?") and "⟦" not in prompt
    assert "chosen: ⟦5<|im_end|>⟧" in text
    assert "rejected: ⟦The answer is 6.<|im_end|>⟧" in text


def _tokenized(tokenizer, n=3):
    pairs = [load_pair_from({"prompt": f"Upper-case: word{i}", "chosen": "APPLE" * (i + 1), "rejected": "no"})
             for i in range(n)]
    return [encode_pair(p, tokenizer, 256) for p in pairs]


def test_collate_rows_alternate_chosen_rejected(tiny_tokenizer):
    pairs = _tokenized(tiny_tokenizer)
    batch = collate_pairs(pairs, pad_id=0)
    assert batch["input_ids"].shape[0] == 6
    for i, p in enumerate(pairs):
        for k, tok in enumerate((p.chosen, p.rejected)):
            row = 2 * i + k
            n = len(tok.input_ids)
            assert batch["input_ids"][row, :n].tolist() == tok.input_ids
            assert batch["sequence_index"][row, :n].eq(row).all()
            assert batch["sequence_index"][row, n:].eq(-1).all()
    assert "ref_logps" not in batch


def test_collate_packed_keeps_pairs_together(tiny_tokenizer):
    pairs = _tokenized(tiny_tokenizer)
    longest = max(len(p) for p in pairs)
    batch = collate_pairs(pairs, pad_id=0, pack_len=longest + len(pairs[0]))
    assert batch["input_ids"].shape[0] < 6
    index, seq = batch["sequence_index"], batch["seq_ids"]
    for s in range(6):
        where = (index == s).nonzero()
        assert where[:, 0].unique().numel() == 1  # one row
        assert where[:, 0].unique() == (index == s - s % 2).nonzero()[:, 0].unique()  # with its pair
        row, cols = where[0, 0], where[:, 1]
        assert seq[row, cols].unique().numel() == 1
        assert batch["position_ids"][row, cols].tolist() == list(range(cols.numel()))
    with pytest.raises(DataError, match="packed row length"):
        collate_pairs(pairs, pad_id=0, pack_len=longest - 1)


def test_collate_shared_prompt_lays_out_prompt_once():
    from tuneforge.data.conversation import Tokenized
    from tuneforge.data.preference import CHOSEN, PROMPT, REJECTED, TokenizedPair

    def side(answer):
        return Tokenized([1, 2, 3] + answer, [IGNORE] * 3 + answer)

    pairs = [TokenizedPair(side([10, 11]), side([20, 21, 22]), 3), TokenizedPair(side([30]), side([40]), 3)]
    assert [p.shared_len for p in pairs] == [8, 5]
    batch = collate_pairs(pairs, pad_id=0, pack_len=13, share_prompt=True)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 10, 11, 20, 21, 22, 1, 2, 3, 30, 40]]
    assert batch["labels"].tolist() == [[IGNORE] * 3 + [10, 11, 20, 21, 22] + [IGNORE] * 3 + [30, 40]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4, 5, 0, 1, 2, 3, 3]]
    assert batch["seq_ids"].tolist() == [[0] * 8 + [1] * 5]
    assert batch["sequence_index"].tolist() == [[0] * 5 + [1] * 3 + [2] * 4 + [3]]
    assert batch["branch_ids"].tolist() == [[PROMPT] * 3 + [CHOSEN] * 2 + [REJECTED] * 3 + [PROMPT] * 3
                                            + [CHOSEN, REJECTED]]
    unpacked = collate_pairs(pairs, pad_id=0, share_prompt=True)
    assert unpacked["input_ids"].shape == (2, 8) and unpacked["seq_ids"][1, 5:].eq(-1).all()
    assert "branch_ids" not in collate_pairs(pairs, pad_id=0, pack_len=13)
    with pytest.raises(DataError, match="the prompt once and both answers"):
        collate_pairs(pairs, pad_id=0, pack_len=7, share_prompt=True)


def test_collate_carries_reference_logps(tiny_tokenizer):
    from dataclasses import replace

    pairs = [replace(p, ref_logps=(-1.0 - i, -2.0 - i)) for i, p in enumerate(_tokenized(tiny_tokenizer, 2))]
    assert collate_pairs(pairs, 0)["ref_logps"].tolist() == [-1.0, -2.0, -2.0, -3.0]


def test_builtin_preferences_deterministic_and_held_out():
    a, b = builtin_preferences(seed=3, n_train=6, n_test=3), builtin_preferences(seed=3, n_train=6, n_test=3)
    assert [(p.source, _roles(p.rejected)) for p in a.train] == [(p.source, _roles(p.rejected)) for p in b.train]
    other = builtin_preferences(seed=4, n_train=6, n_test=3)
    assert [_roles(p.prompt) for p in other.train] != [_roles(p.prompt) for p in a.train]
    train_prompts = {p.prompt[0].content for p in a.train}
    assert not train_prompts & {p.prompt[0].content for p in a.test}
    assert {p.task for p in a.heldout} == set(HELD_OUT_TASKS)
    assert not {p.task for p in a.train} & set(HELD_OUT_TASKS)
    kinds = {pair_kind(p) for p in a.train}
    assert kinds == {"wrong", "chatty"}
    for p in a.train + a.test + a.heldout:
        chosen, rejected = p.chosen[0].content, p.rejected[0].content
        assert chosen != rejected
        if pair_kind(p) == "chatty":
            assert chosen in rejected and len(rejected) > len(chosen) + 20
        else:
            assert not any(rejected.startswith(o) for o in OPENERS)
