"""Read data files into raw records: ``(location, dict)`` pairs, with errors that say where and how to fix.

Locations name the file as given plus a position: ``train.jsonl:12`` (1-based line) for JSONL and
CSV, ``data.json:7 ([3])`` (line, then the jq path of the array item) for JSON, ``t.parquet:row 4``
(0-based, as ``df.iloc[4]``) for Parquet, ``notes.txt:1`` for a plain text file.
"""

from __future__ import annotations

import csv
import difflib
import gzip
import io
import json
import os
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tuneforge.errors import DataError

SUPPORTED_EXTENSIONS = (".jsonl", ".jsonl.gz", ".json", ".csv", ".parquet", ".txt", ".md")

Record = tuple[str, dict]
ErrorSink = list[tuple[str, str]] | None

_BOM = b"\xef\xbb\xbf"
_WS = re.compile(r"[ \t\n\r]*")
# A single-record file is not a wrapper {"data": [...]}, even though its one list value looks like one.
_RECORD_LIST_KEYS = ("messages", "conversations")
_CSV_FIELD_LIMIT = 2**31 - 1  # long articles exceed csv's 128 KiB default
# Deeper JSON is no record any format describes, and recursive code further on (repr, oasst trees) would fail.
MAX_DEPTH = 200


def read_records(path: str | Path, errors: ErrorSink = None) -> Iterator[Record]:
    """Yield ``(location, record)`` for each record of a data file, by its extension.

    File-level problems (missing, a directory, unknown extension, empty, not UTF-8, malformed
    JSON document) always raise ``DataError``. Problems confined to one line or item (bad JSON on a
    JSONL line, a line that is not an object, a CSV row with the wrong number of values) raise too,
    unless ``errors`` is a list: then ``(location, reason)`` is appended and the line is skipped.
    """
    p = Path(path).expanduser()
    name = str(path)
    kind = _check_path(p, name)
    return _READERS[kind](p, name, errors)


def _check_path(p: Path, name: str) -> str:
    if not p.exists():
        hint = ""
        if p.parent.is_dir():
            close = difflib.get_close_matches(p.name, [c.name for c in p.parent.iterdir()], n=1)
            if close:
                hint = f" Did you mean '{p.parent / close[0]}'?"
        raise DataError(f"{name}: no such file. Check the path (relative paths start from "
                        f"{Path.cwd()}).{hint}")
    if p.is_dir():
        raise DataError(f"{name}: is a directory, not a data file. Give one file "
                        f"({', '.join(SUPPORTED_EXTENSIONS)}); list several files as several datasets.")
    if not os.access(p, os.R_OK):
        raise DataError(f"{name}: permission denied; make the file readable (chmod +r) or copy it")
    lower = p.name.lower()
    for ext in sorted(SUPPORTED_EXTENSIONS, key=len, reverse=True):
        if lower.endswith(ext):
            return ext
    raise DataError(f"{name}: unsupported file type '{''.join(p.suffixes) or p.name}'. Supported: "
                    f"{', '.join(SUPPORTED_EXTENSIONS)}. Rename or convert the file.")


def _line_error(errors: ErrorSink, location: str, reason: str) -> None:
    if errors is None:
        raise DataError(f"{location}: {reason}")
    errors.append((location, reason))


def _iconv_hint(p: Path) -> str:
    return (f"the file is probably in another encoding; convert it to UTF-8, e.g. "
            f"`iconv -f latin1 -t utf-8 {p.name} > utf8-{p.name}`")


def _empty(name: str, what: str) -> DataError:
    return DataError(f"{name}: the file is empty (no records). Add {what}, or remove it from the data list.")


def _kind_of(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _decode_file(data: bytes, p: Path, name: str) -> str:
    """Whole-file UTF-8 decode (a leading BOM is dropped); bad bytes raise with line and offset."""
    if data.startswith(_BOM):
        data = data[len(_BOM):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{name}:{line}: byte 0x{data[e.start]:02x} at column {col} (byte offset "
                        f"{e.start}) is not valid UTF-8; {_iconv_hint(p)}") from None


# --- JSON Lines -------------------------------------------------------------------------------


def _read_jsonl(p: Path, name: str, errors: ErrorSink) -> Iterator[Record]:
    opener = gzip.open if p.name.lower().endswith(".gz") else open
    seen = False
    offset = 0
    lineno = 0
    try:
        with opener(p, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                start, offset = offset, offset + len(raw)
                if lineno == 1 and raw.startswith(_BOM):
                    raw, start = raw[len(_BOM):], start + len(_BOM)
                if not raw.strip():
                    continue  # blank lines separate nothing; they are not records
                seen = True
                record = _parse_line(raw, f"{name}:{lineno}", start, p, errors)
                if record is not None:
                    yield f"{name}:{lineno}", record
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        # A corrupt stream hides how many records follow it, so it is never skipped, even with skip_bad.
        where = (f"the compressed data is damaged after line {lineno} ({lineno} lines were read before it; "
                 "the records after it cannot be read or counted, so --skip-bad cannot skip them)"
                 if lineno else "not a valid gzip file")
        raise DataError(f"{name}: {where} ({e}); check it with `gzip -t {p.name}` and re-create it, "
                        f"or rename it without '.gz' if it is not compressed") from None
    if not seen:
        raise _empty(name, "one JSON object per line")


def _parse_line(raw: bytes, loc: str, start: int, p: Path, errors: ErrorSink) -> dict | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        _line_error(errors, loc, f"byte 0x{raw[e.start]:02x} at column {e.start + 1} (byte offset "
                                 f"{start + e.start} in the file) is not valid UTF-8; {_iconv_hint(p)}")
        return None
    try:
        value = json.loads(text)
    except RecursionError:
        _line_error(errors, loc, f"the JSON is nested deeper than {MAX_DEPTH} levels; a record is an object of "
                                 "text fields and turns")
        return None
    except json.JSONDecodeError as e:
        hint = "each line must be one complete JSON object"
        if e.msg == "Extra data":
            hint = "a line holds more than one JSON value; put each object on its own line"
        elif text.lstrip().startswith("[") or text.strip() == "{":
            hint = ("this looks like a pretty-printed JSON document; rename the file to .json, "
                    "or write one object per line")
        _line_error(errors, loc, f"invalid JSON at column {e.colno}: {e.msg}; {hint}")
        return None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        _line_error(errors, loc, f"invalid JSON: {e}")
        return None
    if not isinstance(value, dict):
        _line_error(errors, loc, f"expected a JSON object {{...}} on each line, got {_kind_of(value)}; "
                                 f"write each record as an object such as {{\"text\": \"...\"}}")
        return None
    # Only an escape can make a lone surrogate, and only that many brackets can nest too deep: skip the walk.
    problem = _bad_value(value) if b"\\u" in raw or raw.count(b"[") + raw.count(b"{") > MAX_DEPTH else None
    if problem:
        _line_error(errors, loc, problem)
        return None
    return value


def _bad_value(value: object) -> str | None:
    """Why a parsed JSON record cannot be used: nested deeper than ``MAX_DEPTH``, or a string holding a lone
    UTF-16 surrogate (``"\\ud800"``: valid JSON, but no tokenizer can encode it); None when fine."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > MAX_DEPTH:
            return f"the JSON is nested deeper than {MAX_DEPTH} levels; a record is an object of text fields and turns"
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                return (f"a string holds a lone UTF-16 surrogate ({v[e.start]!r} at character {e.start} of "
                        f"{v[max(0, e.start - 20):e.start + 1]!r}), which is not text; fix the escape or remove it")
        elif isinstance(v, dict):
            stack.extend((x, depth + 1) for x in (*v.keys(), *v.values()))
        elif isinstance(v, list):
            stack.extend((x, depth + 1) for x in v)
    return None


# --- JSON document ----------------------------------------------------------------------------


def _read_json(p: Path, name: str, errors: ErrorSink) -> Iterator[Record]:
    text = _decode_file(p.read_bytes(), p, name)
    if not text.strip():
        raise _empty(name, "an array of objects [{...}, ...]")
    try:
        doc = json.loads(text)
    except RecursionError:
        raise DataError(f"{name}: the JSON is nested too deeply to read; a .json file holds an array of "
                        "records") from None
    except json.JSONDecodeError as e:
        hint = "fix the JSON (a .json file holds one array of objects)"
        if e.msg == "Extra data":
            hint = "the file holds several JSON values; if it is one object per line, rename it to .jsonl"
        raise DataError(f"{name}:{e.lineno}: invalid JSON at column {e.colno}: {e.msg}; {hint}") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise DataError(f"{name}: invalid JSON: {e}") from None
    key = _records_key(doc, name)
    n = 0
    for i, (line, item) in enumerate(_array_items(text, key)):
        n += 1
        loc = f"{name}:{line} ({'.' + key if key else ''}[{i}])"
        problem = _bad_value(item) if isinstance(item, dict) else None
        if problem:
            _line_error(errors, loc, problem)
        elif isinstance(item, dict):
            yield loc, item
        else:
            _line_error(errors, loc, f"expected an object {{...}} for each record, got {_kind_of(item)}")
    if n == 0:
        raise _empty(name, "records to the array")


def _records_key(doc: object, name: str) -> str | None:
    """None for a top-level array; the key of the one list in a wrapper object like {"data": [...]}."""
    if isinstance(doc, list):
        return None
    if isinstance(doc, dict):
        lists = [k for k, v in doc.items() if isinstance(v, list)]
        if len(lists) == 1 and lists[0] not in _RECORD_LIST_KEYS:
            return lists[0]
        if not lists or lists[0] in _RECORD_LIST_KEYS:
            raise DataError(f"{name}:1: the top-level object looks like a single record; a .json file holds "
                            f"an array of records: wrap it in [ ... ], or use .jsonl with one per line")
        raise DataError(f"{name}:1: the top-level object has several lists ({', '.join(lists)}); "
                        f"keep one list of records, like {{\"data\": [...]}}, or a top-level array")
    raise DataError(f"{name}:1: expected an array of objects, got {_kind_of(doc)}; "
                    f"write the records as [{{...}}, {{...}}]")


def _array_items(text: str, key: str | None) -> Iterator[tuple[int, object]]:
    """(1-based line, value) of each item of the records array; ``text`` is known-valid JSON."""
    dec = json.JSONDecoder()
    idx = _WS.match(text, 0).end()
    if key is not None:  # walk the wrapper object to the array under `key`
        idx = _WS.match(text, idx + 1).end()
        while True:
            k, idx = dec.raw_decode(text, idx)
            idx = _WS.match(text, _WS.match(text, idx).end() + 1).end()  # past ':'
            if k == key:
                break
            _, idx = dec.raw_decode(text, idx)
            idx = _WS.match(text, _WS.match(text, idx).end() + 1).end()  # past ','
    idx = _WS.match(text, idx + 1).end()  # past '['
    line, counted = 1, 0
    while text[idx] != "]":
        line += text.count("\n", counted, idx)
        counted = idx
        value, idx = dec.raw_decode(text, idx)
        yield line, value
        idx = _WS.match(text, idx).end()
        if text[idx] == ",":
            idx = _WS.match(text, idx + 1).end()


# --- CSV, Parquet, plain text -----------------------------------------------------------------


def _read_csv(p: Path, name: str, errors: ErrorSink) -> Iterator[Record]:
    text = _decode_file(p.read_bytes(), p, name)
    if not text.strip():
        raise _empty(name, "a header row and one row per record")
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    # strict: a quote never closed is an error at the end of the file, not a value swallowing the rest of it
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header = _csv_row(reader, text, name, 1)
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes or any(not h.strip() for h in header):
        raise DataError(f"{name}:1: the header row needs unique, non-empty column names "
                        f"(duplicated: {dupes or 'none'}); fix the first line")
    rows = 0
    while True:
        start = reader.line_num + 1
        row = _csv_row(reader, text, name, start)
        if row is None:
            break
        if not row:
            continue  # blank line
        rows += 1
        if len(row) != len(header) and reader.line_num > start:
            # One row over several lines with the wrong count: a quote opened and closed late swallowed the lines
            # between, so skipping "one row" would silently drop the records in them.
            opened = start + sum(v.count("\n") for v in row[:next(i for i, v in enumerate(row) if "\n" in v)])
            raise DataError(f"{name}:{opened}: a quoted value opened here runs to line "
                            f"{reader.line_num}, making one row of {len(row)} values (the header has "
                            f"{len(header)}); close the quote on its line (write a quote inside a value as \"\")")
        if len(row) != len(header):
            _line_error(errors, f"{name}:{start}", f"{len(row)} values but the header has {len(header)} "
                                                   f"columns; quote values that contain commas")
            continue
        yield f"{name}:{start}", dict(zip(header, row, strict=True))
    if rows == 0:
        raise _empty(name, "rows below the header")


def _csv_row(reader: Any, text: str, name: str, start: int) -> list[str] | None:
    """The next row, None at the end; a malformed row is a DataError naming the line."""
    try:
        return next(reader)
    except StopIteration:
        return None
    except csv.Error as e:
        if "unexpected end of data" in str(e):
            raise DataError(f"{name}:{_open_quote_line(text, start)}: a quoted value opened on this line is never "
                            "closed, so the rest of the file would be read as one value; close the quote (write a "
                            "quote inside a value as \"\")") from None
        raise DataError(f"{name}:{start}: malformed CSV ({e}); quote values that contain commas, "
                        "quotes or newlines, and write a quote inside a quoted value as \"\"") from None


def _open_quote_line(text: str, start: int) -> int:
    """The line of the quote still open after reading from line ``start`` (1-based)."""
    pos = 0
    for _ in range(start - 1):
        pos = text.index("\n", pos) + 1
    opened, inside = pos, False
    for i in range(pos, len(text)):
        if text[i] == '"':
            inside = not inside
            if inside:
                opened = i
    return text.count("\n", 0, opened) + 1


def _read_parquet(p: Path, name: str, errors: ErrorSink) -> Iterator[Record]:
    # start-up time: pyarrow takes ~0.4 s to import and only Parquet files need it
    import pyarrow as pa

    # start-up time: as above
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(p)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{name}: not a readable Parquet file ({e}); re-export it, e.g. with "
                        f"pandas `df.to_parquet(...)`") from None
    if pf.metadata.num_rows == 0:
        raise _empty(name, "rows")
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            yield f"{name}:row {row}", record
            row += 1


def _read_text(p: Path, name: str, errors: ErrorSink) -> Iterator[Record]:
    text = _decode_file(p.read_bytes(), p, name)
    if not text.strip():
        raise _empty(name, "text")
    yield f"{name}:1", {"text": text}


_READERS = {
    ".jsonl": _read_jsonl, ".jsonl.gz": _read_jsonl, ".json": _read_json, ".csv": _read_csv,
    ".parquet": _read_parquet, ".txt": _read_text, ".md": _read_text,
}
