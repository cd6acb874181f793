"""read_records: every supported file type, its locations, and every file-level mistake."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tuneforge.data.readers import SUPPORTED_EXTENSIONS, read_records
from tuneforge.errors import DataError


def write(tmp_path, name: str, content: str | bytes):
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def records(path, **kw):
    return list(read_records(path, **kw))


def error(path, **kw) -> str:
    with pytest.raises(DataError) as e:
        records(path, **kw)
    return str(e.value)


# --- happy paths ----------------------------------------------------------------------------------


def test_jsonl_locations_skip_blank_lines(tmp_path):
    p = write(tmp_path, "train.jsonl", '{"a": 1}\n\n  \n{"a": 2}\r\n{"a": 3}')
    assert records(p) == [(f"{p}:1", {"a": 1}), (f"{p}:4", {"a": 2}), (f"{p}:5", {"a": 3})]


def test_jsonl_bom_is_ignored(tmp_path):
    p = write(tmp_path, "bom.jsonl", b'\xef\xbb\xbf{"a": 1}\n')
    assert records(p) == [(f"{p}:1", {"a": 1})]


def test_jsonl_gz(tmp_path):
    p = tmp_path / "t.jsonl.gz"
    p.write_bytes(gzip.compress(b'{"a": 1}\n\n{"a": 2}\n'))
    assert records(p) == [(f"{p}:1", {"a": 1}), (f"{p}:3", {"a": 2})]


def test_jsonl_streams_records_before_a_later_bad_line(tmp_path):
    p = write(tmp_path, "s.jsonl", '{"a": 1}\n{"a": 2}\nnot json\n')
    it = read_records(p)
    assert next(it) == (f"{p}:1", {"a": 1})
    assert next(it) == (f"{p}:2", {"a": 2})
    with pytest.raises(DataError, match=r"s\.jsonl:3"):
        next(it)


def test_json_array_locations_are_line_and_index(tmp_path):
    doc = '[\n  {"a": 1},\n\n  {"a": [1,\n 2]},\n  {"a": 3}\n]\n'
    p = write(tmp_path, "d.json", doc)
    assert records(p) == [(f"{p}:2 ([0])", {"a": 1}), (f"{p}:4 ([1])", {"a": [1, 2]}),
                          (f"{p}:6 ([2])", {"a": 3})]


def test_json_minified_array_keeps_item_index(tmp_path):
    p = write(tmp_path, "m.json", json.dumps([{"a": i} for i in range(3)]))
    assert [loc for loc, _ in records(p)] == [f"{p}:1 ([0])", f"{p}:1 ([1])", f"{p}:1 ([2])"]


def test_json_wrapper_object_with_one_list(tmp_path):
    doc = '{"version": "1.0", "meta": {"x": [1]},\n "data": [\n {"a": 1},\n {"a": 2}]}'
    p = write(tmp_path, "w.json", doc)
    assert records(p) == [(f"{p}:3 (.data[0])", {"a": 1}), (f"{p}:4 (.data[1])", {"a": 2})]


def test_csv_header_and_multiline_quoted_field(tmp_path):
    p = write(tmp_path, "t.csv", 'instruction,output\nhi,"a, b"\n\n"multi\nline",x\nlast,y\n')
    assert records(p) == [
        (f"{p}:2", {"instruction": "hi", "output": "a, b"}),
        (f"{p}:4", {"instruction": "multi\nline", "output": "x"}),
        (f"{p}:6", {"instruction": "last", "output": "y"}),
    ]


def test_parquet_rows_with_nested_lists(tmp_path):
    p = tmp_path / "t.parquet"
    msgs = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]] * 3
    pq.write_table(pa.table({"messages": msgs, "task": ["x", None, "z"]}), p)
    got = records(p)
    assert [loc for loc, _ in got] == [f"{p}:row 0", f"{p}:row 1", f"{p}:row 2"]
    assert got[1][1] == {"messages": msgs[1], "task": None}


@pytest.mark.parametrize("name", ["notes.txt", "README.MD"])
def test_plain_text_is_one_record(tmp_path, name):
    p = write(tmp_path, name, "line one\n\nline two\n")
    assert records(p) == [(f"{p}:1", {"text": "line one\n\nline two\n"})]


# --- file-level mistakes ----------------------------------------------------------------------------


def test_missing_file_suggests_a_close_name(tmp_path):
    write(tmp_path, "train.jsonl", '{"a": 1}\n')
    msg = error(tmp_path / "trian.jsonl")
    assert "trian.jsonl: no such file" in msg and "Did you mean" in msg and "train.jsonl" in msg


def test_directory(tmp_path):
    assert "is a directory" in error(tmp_path)


def test_unknown_extension_lists_supported(tmp_path):
    msg = error(write(tmp_path, "data.xlsx", "x"))
    assert "data.xlsx" in msg and "'.xlsx'" in msg
    assert all(ext in msg for ext in SUPPORTED_EXTENSIONS)


@pytest.mark.parametrize("name,content", [
    ("e.jsonl", ""), ("b.jsonl", "\n  \n\t\n"), ("e.json", "  \n"), ("e.csv", ""), ("h.csv", "a,b\n"),
    ("e.txt", "\n\n"), ("e.json", "[]"),
])
def test_empty_files(tmp_path, name, content):
    msg = error(write(tmp_path, name, content))
    assert name in msg and "empty" in msg


def test_empty_parquet(tmp_path):
    p = tmp_path / "e.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), p)
    assert "e.parquet" in error(p) and "empty" in error(p)


def test_non_utf8_jsonl_names_line_offset_and_iconv(tmp_path):
    p = write(tmp_path, "l1.jsonl", b'{"a": "ok"}\n{"a": "caf\xe9"}\n')
    msg = error(p)
    assert "l1.jsonl:2" in msg and "0xe9" in msg and "column 11" in msg and "byte offset 22" in msg
    assert "iconv -f latin1 -t utf-8" in msg


@pytest.mark.parametrize("name", ["l1.csv", "l1.json", "l1.txt"])
def test_non_utf8_whole_file_formats_name_the_line(tmp_path, name):
    body = {"l1.csv": b"text\nok\ncaf\xe9\n", "l1.json": b'[{"text": "ok"},\n{"text": "caf\xe9"}]',
            "l1.txt": b"ok\ncaf\xe9\n"}[name]
    msg = error(write(tmp_path, name, body))
    line = 3 if name == "l1.csv" else 2
    assert f"{name}:{line}" in msg and "0xe9" in msg and "iconv" in msg


def test_malformed_jsonl_line_names_line_column_and_json_error(tmp_path):
    msg = error(write(tmp_path, "bad.jsonl", '{"a": 1}\n{"a": 1,, "b": 2}\n'))
    assert "bad.jsonl:2" in msg and "column 9" in msg and "Expecting property name" in msg


def test_two_objects_on_one_line(tmp_path):
    msg = error(write(tmp_path, "two.jsonl", '{"a": 1} {"a": 2}\n'))
    assert "two.jsonl:1" in msg and "own line" in msg


def test_pretty_printed_json_in_jsonl_suggests_json(tmp_path):
    msg = error(write(tmp_path, "pretty.jsonl", '[\n {"a": 1}\n]\n'))
    assert "pretty.jsonl:1" in msg and "rename the file to .json" in msg


def test_jsonl_line_that_is_not_an_object(tmp_path):
    msg = error(write(tmp_path, "arr.jsonl", '{"a": 1}\n[1, 2]\n'))
    assert "arr.jsonl:2" in msg and "got an array" in msg


def test_malformed_json_document_names_line(tmp_path):
    msg = error(write(tmp_path, "bad.json", '[\n {"a": 1},\n {"a": }\n]'))
    assert "bad.json:3" in msg and "column 8" in msg


def test_jsonl_content_in_a_json_file_suggests_jsonl(tmp_path):
    msg = error(write(tmp_path, "lines.json", '{"a": 1}\n{"a": 2}\n'))
    assert "lines.json:2" in msg and "rename it to .jsonl" in msg


@pytest.mark.parametrize("doc,expect", [
    ('{"messages": [{"role": "user", "content": "x"}]}', "single record"),
    ('{"instruction": "x", "output": "y"}', "single record"),
    ('{"train": [], "test": []}', "several lists"),
    ('"text"', "expected an array"),
])
def test_json_top_level_shapes(tmp_path, doc, expect):
    msg = error(write(tmp_path, "top.json", doc))
    assert "top.json:1" in msg and expect in msg


def test_json_item_that_is_not_an_object(tmp_path):
    msg = error(write(tmp_path, "items.json", '[\n{"a": 1},\n"oops"\n]'))
    assert "items.json:3 ([1])" in msg and "got a string" in msg


def test_csv_row_with_wrong_number_of_values(tmp_path):
    msg = error(write(tmp_path, "rows.csv", "a,b\n1,2\n1,2,3\n"))
    assert "rows.csv:3" in msg and "3 values" in msg and "quote" in msg


def test_csv_duplicate_header(tmp_path):
    msg = error(write(tmp_path, "dup.csv", "a,a\n1,2\n"))
    assert "dup.csv:1" in msg and "'a'" in msg


def test_invalid_parquet_and_gzip(tmp_path):
    assert "not a readable Parquet file" in error(write(tmp_path, "x.parquet", "not parquet"))
    assert "not a valid gzip file" in error(write(tmp_path, "x.jsonl.gz", "not gzip"))


def test_error_sink_collects_bad_lines_and_keeps_good_ones(tmp_path):
    p = write(tmp_path, "mixed.jsonl", b'{"a": 1}\n{oops\n[1]\n{"a": "caf\xe9"}\n{"a": 5}\n')
    sink: list[tuple[str, str]] = []
    assert [loc for loc, _ in records(p, errors=sink)] == [f"{p}:1", f"{p}:5"]
    assert [loc for loc, _ in sink] == [f"{p}:2", f"{p}:3", f"{p}:4"]
    assert "invalid JSON" in sink[0][1] and "array" in sink[1][1] and "UTF-8" in sink[2][1]


# --- inputs that used to crash even with skip_bad (issue 12) ----------------------------------------


def test_lone_surrogate_is_a_bad_record_named_by_line(tmp_path):
    p = write(tmp_path, "s.jsonl", '{"text": "ok"}\n{"text": "a\\ud800b"}\n{"text": "fine \\u00e9"}\n')
    assert "s.jsonl:2: a string holds a lone UTF-16 surrogate" in error(p)
    skipped: list = []
    assert [loc for loc, _ in records(p, errors=skipped)] == [f"{p}:1", f"{p}:3"]
    assert [loc for loc, _ in skipped] == [f"{p}:2"]
    doc = write(tmp_path, "s.json", '[{"text": "ok"},\n {"text": "\\udc00"}]')
    assert "s.json:2 ([1]): a string holds a lone UTF-16 surrogate" in error(doc)


def test_deeply_nested_json_is_a_bad_record(tmp_path):
    deep = '{"text": "x", "extra": ' + "[" * 5000 + "]" * 5000 + "}"
    less = '{"text": "x", "extra": ' + "[" * 300 + "]" * 300 + "}"
    p = write(tmp_path, "deep.jsonl", f'{deep}\n{less}\n{{"text": "ok"}}\n')
    assert "deep.jsonl:1: the JSON is nested deeper than 200 levels" in error(p)
    skipped: list = []
    assert len(records(p, errors=skipped)) == 1 and [loc for loc, _ in skipped] == [f"{p}:1", f"{p}:2"]
    assert "nested too deeply" in error(write(tmp_path, "deep.json", "[" + deep + "]"))


def test_huge_integer_is_a_bad_record(tmp_path):
    p = write(tmp_path, "big.jsonl", '{"text": "ok"}\n{"text": "x", "n": ' + "9" * 5000 + "}\n")
    assert "big.jsonl:2: invalid JSON" in error(p)


def test_corrupt_deflate_stream_names_the_file_and_lines_read_even_with_skip_bad(tmp_path):
    data = bytearray(gzip.compress(b"".join(b'{"text": "line %d"}\n' % i for i in range(50))))
    data[10] = 0xFF  # the first deflate block header: an invalid block type
    p = write(tmp_path, "c.jsonl.gz", bytes(data))
    for errors in (None, []):
        msg = error(p, errors=errors)
        assert msg.startswith(f"{p}: ") and "gzip -t" in msg and "invalid block type" in msg
    good = gzip.compress(b"".join(b'{"text": "line %d"}\n' % i for i in range(5000)))
    cut = write(tmp_path, "cut.jsonl.gz", good[: len(good) // 2])
    msg = error(cut, errors=[])
    assert "damaged after line" in msg and "cannot skip them" in msg


def test_csv_unterminated_quote_is_refused_at_its_line(tmp_path):
    p = write(tmp_path, "q.csv", 'prompt,completion\na,b\nc,"d\ne,f\ng,h\n')
    for errors in (None, []):
        assert error(p, errors=errors).startswith(f"{p}:3: a quoted value opened on this line is never closed")


def test_csv_quote_closed_late_is_refused_not_skipped_as_one_row(tmp_path):
    p = write(tmp_path, "late.csv", 'prompt,completion\na,b\n"c,d\ne,f\ng,"h\ni,j\n')
    assert error(p, errors=[]).startswith(f"{p}:3:")
    p = write(tmp_path, "late1.csv", 'prompt,completion\na,b\nx,"c\nd,e\nf",g\ni,j\n')
    assert error(p, errors=[]).startswith(f"{p}:3: a quoted value opened here runs to line 5, making one row of 3")
    p = write(tmp_path, "late2.csv", 'prompt,completion\na,b\nc,"d\ne,f\ng" x,h\n')
    assert error(p, errors=[]).startswith(f"{p}:3:")
