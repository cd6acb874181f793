"""Labels from the chat template: what is trained and what is masked."""

from __future__ import annotations

import pytest

from tuneforge.data.conversation import Example, Message
from tuneforge.data.template import CHATML_TEMPLATE, IGNORE, TooLongError, encode, render_masked
from tuneforge.errors import DataError


def _conv(*turns: tuple[str, str], **kw) -> Example:
    return Example(messages=[Message(r, c) for r, c in turns], source="train.jsonl:7", **kw)


def _trained_text(tok, tokenized) -> str:
    ids = [t for t, lab in zip(tokenized.input_ids, tokenized.labels, strict=True) if lab != IGNORE]
    return tok.decode(ids, skip_special_tokens=False)


def _trained_runs(tok, tokenized) -> list[str]:
    """Decoded runs of consecutive trained tokens."""
    runs, cur = [], []
    for t, lab in zip(tokenized.input_ids, tokenized.labels, strict=True):
        if lab != IGNORE:
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur, skip_special_tokens=False))
            cur = []
    if cur:
        runs.append(tok.decode(cur, skip_special_tokens=False))
    return runs


@pytest.fixture(params=["tiny", "smollm"])
def tok(request, tiny_tokenizer):
    return tiny_tokenizer if request.param == "tiny" else request.getfixturevalue("smollm_tokenizer")


def test_single_turn_trains_assistant_content_and_end_of_turn(tok):
    ex = _conv(("system", "Be brief."), ("user", "What is 2 + 3?"), ("assistant", "The answer is 5."))
    [t] = encode(ex, tok, 256)
    assert _trained_text(tok, t) == "The answer is 5.<|im_end|>"
    assert len(t.labels) == len(t.input_ids)
    # Labels are aligned (not shifted): each trained label is the token at its position.
    assert all(lab in (IGNORE, i) for i, lab in zip(t.input_ids, t.labels, strict=True))
    # Everything before the assistant content, header included, is masked; the final newline too.
    ids = tok.apply_chat_template([{"role": m.role, "content": m.content} for m in ex.messages],
                                  tokenize=False)
    assert t.input_ids == tok(ids, add_special_tokens=False)["input_ids"]
    first = next(i for i, lab in enumerate(t.labels) if lab != IGNORE)
    assert tok.decode(t.input_ids[:first], skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    assert t.labels[-1] == IGNORE and tok.decode(t.input_ids[-1:]) == "\n"
    assert t.labels[-2] == tok.convert_tokens_to_ids("<|im_end|>")


def test_multi_turn_trains_each_assistant_turn_only(tok):
    ex = _conv(("user", "Upper-case the word: apple"), ("assistant", "APPLE"),
               ("user", "And: fox"), ("assistant", "FOX"))
    [t] = encode(ex, tok, 256)
    assert _trained_runs(tok, t) == ["APPLE<|im_end|>", "FOX<|im_end|>"]


def test_message_train_flag_overrides_default(tok):
    ex = _conv(("user", "What is 2 + 3?"), ("assistant", "The answer is 4."),
               ("user", "Wrong."), ("assistant", "The answer is 5."))
    ex.messages[1].train = False
    ex.messages[2].train = True
    [t] = encode(ex, tok, 256)
    assert _trained_runs(tok, t) == ["Wrong.<|im_end|>", "The answer is 5.<|im_end|>"]


def test_smollm_default_system_prompt_is_masked(smollm_tokenizer):
    ex = _conv(("user", "hi"), ("assistant", "Hello there"))
    [t] = encode(ex, smollm_tokenizer, 256)
    full = smollm_tokenizer.decode(t.input_ids, skip_special_tokens=False)
    assert "You are a helpful AI assistant named SmolLM" in full
    assert _trained_text(smollm_tokenizer, t) == "Hello there<|im_end|>"
    assert t.input_ids.count(smollm_tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3  # no extra BOS


def test_fallback_template_when_tokenizer_has_none(tiny_tokenizer):
    tok = tiny_tokenizer
    tok.chat_template = None
    ex = _conv(("user", "What is 2 + 3?"), ("assistant", "The answer is 5."))
    [t] = encode(ex, tok, 256)
    rendered = tok.apply_chat_template([{"role": m.role, "content": m.content} for m in ex.messages],
                                       tokenize=False, chat_template=CHATML_TEMPLATE)
    assert tok.decode(t.input_ids, skip_special_tokens=False) == rendered
    assert _trained_text(tok, t) == "The answer is 5.<|im_end|>"


def test_template_without_end_of_turn_token_trains_an_eos(tiny_tokenizer):
    tiny_tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}"
                                    "{% endfor %}")
    [t] = encode(_conv(("user", "What is 2 + 3?"), ("assistant", "The answer is 5.")), tiny_tokenizer, 256)
    # " The" straddles header and content: a token overlapping the content is trained.
    assert _trained_text(tiny_tokenizer, t) == " The answer is 5." + tiny_tokenizer.eos_token
    assert tiny_tokenizer.decode(t.input_ids, skip_special_tokens=False).startswith("user: What is")


def test_train_on_prompt_trains_all_but_train_false_turns(tiny_tokenizer):
    ex = _conv(("user", "What is 2 + 3?"), ("assistant", "The answer is 4."), ("user", "Wrong."),
               ("assistant", "The answer is 5."))
    ex.messages[1].train = False
    [t] = encode(ex, tiny_tokenizer, 256, train_on_prompt=True)
    runs = _trained_runs(tiny_tokenizer, t)
    assert runs == ["<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n",
                    "<|im_start|>user\nWrong.<|im_end|>\n<|im_start|>assistant\nThe answer is 5.<|im_end|>\n"]


def test_too_long_conversation_names_source_length_and_fix(tiny_tokenizer):
    ex = _conv(("user", "What is 2 + 3? " * 20), ("assistant", "The answer is 5."))
    n = len(encode(ex, tiny_tokenizer, 10_000)[0].input_ids)
    with pytest.raises(DataError) as e:
        encode(ex, tiny_tokenizer, n - 1)
    assert isinstance(e.value, TooLongError) and e.value.n_tokens == n
    msg = str(e.value)
    assert "train.jsonl:7" in msg and str(n) in msg and str(n - 1) in msg
    assert "data.max_seq_len" in msg and "--skip-bad" in msg
    assert len(encode(ex, tiny_tokenizer, n)[0].input_ids) == n


def test_conversation_without_trained_tokens_is_an_error(tiny_tokenizer):
    with pytest.raises(DataError, match="train.jsonl:7.*no token is trained"):
        encode(_conv(("user", "hello")), tiny_tokenizer, 256)


def test_empty_example_is_an_error(tiny_tokenizer):
    with pytest.raises(DataError, match="train.jsonl:7"):
        encode(Example(source="train.jsonl:7"), tiny_tokenizer, 256)


def test_text_is_chunked_with_eos_and_fully_trained(tok):
    text = "The quick brown fox jumps over the lazy dog. " * 6
    chunks = encode(Example(text=text, source="corpus.txt:1", task="lm"), tok, 16)
    ids = [i for c in chunks for i in c.input_ids]
    assert ids == tok(text)["input_ids"] + [tok.eos_token_id]
    assert [len(c.input_ids) for c in chunks[:-1]] == [16] * (len(chunks) - 1)
    assert 0 < len(chunks[-1].input_ids) <= 16 and len(chunks) >= 3
    assert all(c.labels == c.input_ids and c.source == "corpus.txt:1" and c.task == "lm" for c in chunks)


def test_render_masked_brackets_trained_spans(tiny_tokenizer):
    [t] = encode(_conv(("user", "What is 2 + 3?"), ("assistant", "The answer is 5.")), tiny_tokenizer, 256)
    shown = render_masked(t, tiny_tokenizer)
    assert shown == ("<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
                     "⟦The answer is 5.<|im_end|>⟧\n")
    coloured = render_masked(t, tiny_tokenizer, color=True)
    assert "\x1b[32mThe answer is 5.<|im_end|>\x1b[0m" in coloured and "⟦" not in coloured
