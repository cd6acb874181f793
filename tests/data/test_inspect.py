"""``data inspect``: counts, skipped records, length stats, histogram and samples."""

from __future__ import annotations

import json

import pytest

from tuneforge.data.conversation import Example, Message
from tuneforge.data.inspect import format_report, inspect_data
from tuneforge.data.template import encode
from tuneforge.errors import DataError


def _write(path, records: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


@pytest.fixture
def small_file(tmp_path) -> str:
    return _write(tmp_path / "small.jsonl", [
        {"prompt": "What is 2 + 3?", "completion": "5"},
        {"prompt": "Upper-case the word: apple", "completion": "APPLE"},
        "{not json",
        {"prompt": "The quick brown fox " * 60, "completion": "dog"},
        {"prompt": "Classify: I love it", "completion": "positive"},
    ])


def test_inspect_small_file_counts_skips_and_stats(small_file, tmp_path, tiny_tokenizer):
    report = inspect_data([small_file], tiny_tokenizer, max_len=80, out_dir=tmp_path / "out", n_show=2)
    [f] = report.files
    assert f.format == "prompt_completion"
    assert (f.n_records, f.n_kept, f.n_sequences) == (4 + 1, 3, 3)
    reasons = dict(f.skipped)
    assert set(reasons) == {f"{small_file}:3", f"{small_file}:4"}
    assert "max_len 80" in reasons[f"{small_file}:4"] and "invalid JSON" in reasons[f"{small_file}:3"]
    assert not reasons[f"{small_file}:4"].startswith(small_file)
    long_ex = Example([Message("user", "The quick brown fox " * 60), Message("assistant", "dog")])
    assert f.too_long == [len(encode(long_ex, tiny_tokenizer, 10_000)[0].input_ids)]
    s = f.stats
    assert s.min <= s.median <= s.p95 <= s.max <= 80 and s.min <= s.mean <= s.max
    answers = ["5<|im_end|>", "APPLE<|im_end|>", "positive<|im_end|>"]
    assert s.trained_tokens == sum(len(tiny_tokenizer(a)["input_ids"]) for a in answers)
    assert 0 < s.trained_share < 0.5
    assert f.packed_rows == 1  # 20 + 28 + 24 tokens fit one row of 80
    assert f.histogram.exists() and f.histogram.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(f.samples) == 2 and "⟦5<|im_end|>⟧" in f.samples[0]
    text = format_report(report)
    assert "small.jsonl" in text and "prompt_completion" in text and "rows@80" in text
    assert f"{small_file}:4:" in text and str(f.histogram) in text and "1 over max_len 80" in text


def test_inspect_without_skip_bad_raises_at_first_bad_record(small_file, tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match=r"small.jsonl:3"):
        inspect_data([small_file], tiny_tokenizer, 64, tmp_path / "out", skip_bad=False)


def test_inspect_too_long_error_without_skip_bad(tmp_path, tiny_tokenizer):
    path = _write(tmp_path / "long.jsonl", [{"prompt": "fox " * 50, "completion": "dog"}])
    with pytest.raises(DataError, match=r"long.jsonl:1.*max_len 16.*--skip-bad"):
        inspect_data([path], tiny_tokenizer, 16, tmp_path / "out", skip_bad=False)


def test_inspect_ag_news_with_smollm(shared_data, smollm_tokenizer, tmp_path):
    path = str(shared_data / "p3" / "ag_news_classify.jsonl")
    other = str(shared_data / "p3" / "ag_news_classify_question_first.jsonl")
    report = inspect_data([path, other], smollm_tokenizer, max_len=256, out_dir=tmp_path, n_show=1)
    f = report.files[0]
    assert (f.format, f.n_records) == ("prompt_completion", 200)
    assert f.n_kept + len(f.skipped) == 200 and f.n_sequences == f.n_kept > 150
    assert all("max_len 256" in why for _, why in f.skipped)
    assert f.stats.max <= 256 and f.stats.trained_share < 0.1
    assert f.histogram.exists() and f.histogram.stat().st_size > 1000
    assert report.files[1].histogram.exists() and report.files[1].histogram != f.histogram
    # Packing at 256 fits more than one example per row, and loses none.
    assert f.packed_rows < f.n_sequences
    assert "<|im_end|>⟧" in f.samples[0] and "SmolLM" in f.samples[0]
    # The same counts as encoding the file directly.
    from tuneforge.data.formats import load_examples

    lengths = []
    for ex in load_examples(path).examples:
        try:
            lengths.append(len(encode(ex, smollm_tokenizer, 256)[0].input_ids))
        except DataError:
            pass
    assert len(lengths) == f.n_kept and max(lengths) == f.stats.max
    table = format_report(report).splitlines()
    assert table[0].split()[:5] == ["file", "format", "records", "kept", "skipped"]
    assert table[2].split()[:5] == [path, "prompt_completion", "200", str(f.n_kept), str(len(f.skipped))]
