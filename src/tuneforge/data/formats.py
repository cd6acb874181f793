"""Normalize records of common dataset formats into ``Example`` conversations.

Formats (``FORMATS``) and the fields they need:

- ``alpaca``: instruction, output (+ input, system). User turn = instruction, plus ``"\\n\\n" + input``
  when input is non-empty.
- ``dolly``: instruction, response (+ context, category). Context is appended like alpaca's input;
  category becomes ``Example.task`` when no task is given.
- ``prompt_completion``: prompt, completion. Trailing newlines of the prompt are dropped (P3-style
  prompts end with one; the chat template separates turns itself).
- ``messages``: OpenAI chat, ``messages: [{role, content, weight?}]`` with roles system/user/assistant.
- ``sharegpt``: ``conversations: [{from, value, weight?}]`` with from human/gpt/system (or
  user/assistant), plus an optional top-level ``system``.
- ``oasst``: OpenAssistant exports, trees or flat messages (see ``oasst_examples``).
- ``text``: ``{"text": ...}`` for continued pre-training; the text is kept exactly.

``weight`` (0 or 1) sets ``Message.train``. A trailing end-of-text literal (``END_OF_TEXT_LITERALS``)
is removed from assistant text: the chat template appends the real end-of-turn token, which is
trained. Nothing else in the content is changed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

from tuneforge.data.conversation import ROLES, Example, Message
from tuneforge.data.readers import read_records
from tuneforge.errors import ConfigError, DataError

FORMATS = ("alpaca", "dolly", "prompt_completion", "messages", "sharegpt", "oasst", "text")
END_OF_TEXT_LITERALS = ("<|endoftext|>", "</s>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>")

EXPECTED_FIELDS = {
    "alpaca": "instruction, output (+ input, system)",
    "dolly": "instruction, response (+ context, category)",
    "prompt_completion": "prompt, completion",
    "messages": "messages: [{role, content}]",
    "sharegpt": "conversations: [{from, value}]",
    "oasst": "message_tree_id, prompt: {role, text, replies} (trees) or message_id, parent_id, role, text",
    "text": "text",
}
CANONICAL_FIELDS = (
    "instruction", "input", "output", "system", "context", "response", "category", "prompt",
    "completion", "messages", "conversations", "text", "task", "dataset", "message_id", "parent_id",
    "role", "rank", "deleted", "message_tree_id",
)
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system"}
_MESSAGES_ROLES = {r: r for r in ROLES}
_OASST_ROLES = {"prompter": "user", "assistant": "assistant"}
_DELETED = "deleted in oasst export"


class RecordError(DataError):
    """A bad record: ``location`` and ``reason`` kept apart so skipped records can be listed."""

    def __init__(self, location: str, reason: str):
        super().__init__(f"{location}: {reason}")
        self.location = location
        self.reason = reason


@dataclass
class LoadResult:
    """Examples of one file and what was left out.

    ``skipped`` holds ``(location, reason)`` of bad records skipped with ``skip_bad=True``, and, for
    oasst, messages left out whatever ``skip_bad`` says (deleted ones, unanswered prompts).
    """

    examples: list[Example]
    skipped: list[tuple[str, str]]
    format: str
    path: Path


# --- small helpers ----------------------------------------------------------------------------


def strip_end_of_text(text: str) -> str:
    """Remove trailing end-of-text literals (and the whitespace before them); else return ``text``."""
    while True:
        trimmed = text.rstrip()
        for lit in END_OF_TEXT_LITERALS:
            if trimmed.endswith(lit):
                text = trimmed[: -len(lit)].rstrip()
                break
        else:
            return text


def map_fields(record: dict, fields: dict[str, str] | None) -> dict:
    """Rename the user's columns to canonical field names (``fields`` maps canonical -> user name).

    A mapped column missing from the record leaves the canonical field missing too, so the error
    names it rather than silently using another column.
    """
    if not fields:
        return record
    out = {k: v for k, v in record.items() if k not in fields.values()}
    for canonical, column in fields.items():
        if column in record:
            out[canonical] = record[column]
        else:
            out.pop(canonical, None)
    return out


def _field_hint(fields: dict[str, str] | None) -> str:
    return f" (your fields: mapping is {fields})" if fields else ""


def detect_format(record: dict, location: str) -> str:
    """The format name of ``record`` from the fields it has; ``RecordError`` if none fits."""
    keys = set(record)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if isinstance(record.get("prompt"), dict) or {"message_id", "parent_id", "role"} <= keys:
        return "oasst"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"instruction", "response"} <= keys:
        return "dolly"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    expected = "; ".join(f"{name}: {f}" for name, f in EXPECTED_FIELDS.items())
    raise RecordError(location, f"cannot tell the dataset format from the fields {sorted(keys)}. "
                                f"Expected one of: {expected}. Set `format:` to one of {', '.join(FORMATS)}, "
                                f"or map your column names with `fields:`, "
                                f"e.g. fields: {{instruction: question, output: answer}}")


def check_format_args(format: str, fields: dict[str, str] | None, formats: tuple[str, ...] = FORMATS,
                      field_names: tuple[str, ...] = CANONICAL_FIELDS, kind: str = "known dataset format",
                      field_kind: str = "field name tuneforge knows") -> None:
    """Refuse a ``format:`` outside ``formats`` and a ``fields:`` key outside ``field_names``, naming the key."""
    if format != "auto" and format not in formats:
        raise ConfigError(f"format: '{format}' is not a {kind}; use auto or one of {', '.join(formats)}")
    for key, column in (fields or {}).items():
        if key not in field_names:
            raise ConfigError(f"fields.{key}: '{key}' is not a {field_kind}; map one of "
                              f"{', '.join(field_names)} to your column name")
        if not isinstance(column, str) or not column:
            raise ConfigError(f"fields.{key}: the column name must be a non-empty string, got {column!r}")


def _type_name(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


def _string(obj: dict, key: str, loc: str, label: str, *, required: bool = True,
            allow_empty: bool = False, assistant: bool = False, fix: str = "add it") -> str | None:
    """A string field: present, a string, non-empty after strip (unless allowed). ``label`` names it."""
    label = label if label.startswith("'") else f"'{label}'"
    value = obj.get(key)
    if value is None:
        if required:
            raise RecordError(loc, f"missing field {label}; {fix}")
        return None
    if not isinstance(value, str):
        raise RecordError(loc, f"field {label} must be a string, got {_type_name(value)} "
                               f"({str(value)[:40]!r}); write it as text")
    if assistant:
        stripped = strip_end_of_text(value)
        if not stripped.strip() and value.strip():
            raise RecordError(loc, f"field {label} is empty once the trailing end-of-text marker is "
                                   f"removed ({value.strip()[-20:]!r}); write the answer before it, or "
                                   f"drop the record (skip_bad skips such records)")
        value = stripped
    if not allow_empty and not value.strip():
        raise RecordError(loc, f"field {label} is empty; write the text, or drop the record "
                               f"(skip_bad skips such records)")
    return value


def _field(r: dict, key: str, loc: str, fields: dict | None, **kw) -> str | None:
    """A top-level string field, named in errors by the user's column when ``fields`` maps it."""
    column = (fields or {}).get(key, key)
    label = f"'{key}'" if column == key else f"'{column}' (mapped to '{key}')"
    fix = (f"add it to every record, or map your column to it with fields: {{{key}: <your column>}}"
           if column == key else f"add the column '{column}', or fix the fields: mapping")
    return _string(r, key, loc, label, fix=fix, **kw)


def _column(key: str, fields: dict | None) -> str:
    return (fields or {}).get(key, key)


def _task(record: dict, loc: str, fmt: str, task: str | None) -> str | None:
    if task is not None:
        return task
    for key in ("task", "dataset") + (("category",) if fmt == "dolly" else ()):
        value = _field(record, key, loc, None, required=False, allow_empty=True)
        if value and value.strip():
            return value
    return None


def _weight(turn: dict, loc: str, where: str) -> bool | None:
    w = turn.get("weight")
    if w is None:
        return None
    if isinstance(w, int | float) and w in (0, 1):
        return bool(w)
    raise RecordError(loc, f"{where}.weight must be 0 (not trained) or 1 (trained), got {w!r}")


# --- one record -> one Example ------------------------------------------------------------------


def _joined(first: str, extra: str | None) -> str:
    return first + "\n\n" + extra if extra and extra.strip() else first


def _alpaca(r: dict, loc: str, fields: dict | None) -> list[Message]:
    instruction = _field(r, "instruction", loc, fields)
    extra = _field(r, "input", loc, fields, required=False, allow_empty=True)
    output = _field(r, "output", loc, fields, assistant=True)
    system = _field(r, "system", loc, fields, required=False, allow_empty=True)
    head = [Message("system", system)] if system and system.strip() else []
    return head + [Message("user", _joined(instruction, extra)), Message("assistant", output)]


def _dolly(r: dict, loc: str, fields: dict | None) -> list[Message]:
    instruction = _field(r, "instruction", loc, fields)
    context = _field(r, "context", loc, fields, required=False, allow_empty=True)
    response = _field(r, "response", loc, fields, assistant=True)
    return [Message("user", _joined(instruction, context)), Message("assistant", response)]


def _prompt_completion(r: dict, loc: str, fields: dict | None) -> list[Message]:
    prompt = _field(r, "prompt", loc, fields)
    completion = _field(r, "completion", loc, fields, assistant=True)
    return [Message("user", prompt.rstrip("\r\n")), Message("assistant", completion)]


def _turns(r: dict, key: str, loc: str, label: str, role_key: str, text_key: str,
           roles: dict[str, str]) -> list[Message]:
    turns = r.get(key)
    if turns is None:
        raise RecordError(loc, f"missing field '{label}'; add the list of turns, or map your column "
                               f"to it with fields: {{{key}: <your column>}}")
    if not isinstance(turns, list):
        raise RecordError(loc, f"field '{label}' must be a list of {{{role_key}, {text_key}}} objects, "
                               f"got {_type_name(turns)}")
    out = []
    for i, turn in enumerate(turns):
        where = f"{label}[{i}]"
        if not isinstance(turn, dict):
            raise RecordError(loc, f"{where} must be an object {{{role_key}, {text_key}}}, "
                                   f"got {_type_name(turn)}")
        role = turn.get(role_key)
        if role not in roles:
            got = "it is missing" if role is None else f"got {role!r}"
            raise RecordError(loc, f"{where}.{role_key}: unknown role ({got}); use one of "
                                   f"{', '.join(roles)}")
        role = roles[role]
        content = _string(turn, text_key, loc, f"{where}.{text_key}", assistant=role == "assistant")
        out.append(Message(role, content, _weight(turn, loc, where)))
    _check_conversation(out, loc, label)
    return out


def _check_conversation(messages: list[Message], loc: str, label: str) -> None:
    """The turn order every chat template assumes: an optional system turn first, then user and assistant
    alternating, ending on an assistant turn. Anything else would render as a conversation the model never
    sees at inference, so it is refused rather than trained."""
    assistant = [m for m in messages if m.role == "assistant"]
    if not assistant:
        raise RecordError(loc, f"'{label}' has no assistant turn, so there is nothing to learn; add the "
                               f"answer as an assistant turn")
    _check_order(messages, loc, label)
    if all(m.train is False for m in assistant):
        raise RecordError(loc, f"'{label}': every assistant turn has weight 0, so nothing is trained; "
                               f"set weight 1 on at least one")


def _check_order(messages: list[Message], loc: str, label: str) -> None:
    body = messages[1:] if messages and messages[0].role == "system" else messages
    for i, m in enumerate(body, len(messages) - len(body)):
        if m.role == "system":
            raise RecordError(loc, f"{label}[{i}] is a system turn after other turns; put the system prompt first "
                                   "(one per conversation)")
        want = "user" if (i - (len(messages) - len(body))) % 2 == 0 else "assistant"
        if m.role != want:
            what = "two user turns in a row" if m.role == "user" else (
                "two assistant turns in a row" if i > len(messages) - len(body) else "it starts with an assistant turn")
            raise RecordError(loc, f"{label}[{i}] is a {m.role} turn where a {want} turn belongs ({what}); user and "
                                   "assistant turns must alternate, starting with user: merge consecutive turns of "
                                   "one role, or add the missing turn")
    if body and body[-1].role == "user":
        raise RecordError(loc, f"'{label}' ends with a user turn ({label}[{len(messages) - 1}]) that has no answer, "
                               "so it teaches nothing; drop that turn or add the assistant's reply")


def _messages(r: dict, loc: str, fields: dict | None) -> list[Message]:
    return _turns(r, "messages", loc, _column("messages", fields), "role", "content", _MESSAGES_ROLES)


def _sharegpt(r: dict, loc: str, fields: dict | None) -> list[Message]:
    out = _turns(r, "conversations", loc, _column("conversations", fields), "from", "value",
                 _SHAREGPT_ROLES)
    system = _field(r, "system", loc, fields, required=False, allow_empty=True)
    if system and system.strip() and out[0].role != "system":
        out.insert(0, Message("system", system))
    return out


_NORMALIZERS = {"alpaca": _alpaca, "dolly": _dolly, "prompt_completion": _prompt_completion,
                "messages": _messages, "sharegpt": _sharegpt}


def normalize_record(record: dict, format: str, location: str, task: str | None = None,
                     fields: dict[str, str] | None = None) -> Example:
    """One record (already field-mapped) of a single-record format as an Example; ``RecordError`` if bad.

    ``fields`` only makes error messages name the user's columns. oasst needs whole trees: use
    ``oasst_examples`` or ``load_examples``.
    """
    if format == "text":
        text = _field(record, "text", location, fields)
        return Example(text=text, source=location, task=_task(record, location, format, task))
    if format not in _NORMALIZERS:
        raise ValueError(f"normalize_record does not handle format {format!r}")
    messages = _NORMALIZERS[format](record, location, fields)
    return Example(messages=messages, source=location, task=_task(record, location, format, task))


# --- OpenAssistant -------------------------------------------------------------------------------


@dataclass
class _Node:
    id: str
    role: str
    text: str
    rank: int | None
    deleted: bool
    loc: str
    children: list[_Node] = field(default_factory=list)


def _rank(value: object, loc: str, where: str) -> int | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None  # pandas exports write a missing rank as NaN
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0 and value == int(value):
        return int(value)
    raise RecordError(loc, f"{where}rank must be a whole number >= 0 (0 = best) or null, got {value!r}")


def _oasst_node(m: dict, loc: str, where: str) -> _Node:
    """One message (flat record or tree node, its replies not included); validated unless deleted."""
    mid = m.get("message_id")
    if mid is not None and not isinstance(mid, str):
        raise RecordError(loc, f"{where}message_id must be a string, got {_type_name(mid)}")
    deleted = m.get("deleted") is True
    role = m.get("role")
    if role not in _OASST_ROLES and not deleted:
        got = "it is missing" if role is None else f"got {role!r}"
        raise RecordError(loc, f"{where}role: unknown oasst role ({got}); use prompter or assistant")
    text = "" if deleted else _string(m, "text", loc, f"{where}text", assistant=role == "assistant")
    return _Node(mid or where.rstrip("."), role, text, _rank(m.get("rank"), loc, where), deleted, loc)


def _oasst_tree_nodes(record: dict, loc: str) -> _Node:
    """The nodes of one tree-export record, each located as ``file:line (message <id>)``."""
    def build(m: object, where: str) -> _Node:
        if not isinstance(m, dict):
            raise RecordError(loc, f"{where} must be an oasst message object, got {_type_name(m)}")
        node = _oasst_node(m, loc, where + "." if where else "")
        if m.get("message_id"):
            node.loc = f"{loc} (message {m['message_id']})"
        replies = m.get("replies") or []
        if not isinstance(replies, list):
            raise RecordError(loc, f"{where}.replies must be a list, got {_type_name(replies)}")
        node.children = [build(c, f"{where}.replies[{i}]") for i, c in enumerate(replies)]
        return node

    return build(record.get("prompt"), "prompt")


def _count(node: _Node) -> int:
    return sum(1 + _count(c) for c in node.children)


def _left_out(node: _Node, why: str) -> tuple[str, str]:
    n = _count(node)
    return node.loc, why + (f" ({n} message{'s' * (n > 1)} under it left out too)" if n else "")


def _oasst_paths(root: _Node, notes: list[tuple[str, str]]) -> list[list[_Node]]:
    """Root-to-leaf conversations, best-ranked replies first, each ending on an assistant turn."""
    if root.deleted:
        notes.append(_left_out(root, _DELETED))
        return []
    if root.role != "prompter":
        raise RecordError(root.loc, f"an oasst tree must start with a prompter message, got {root.role!r}")
    paths: list[list[_Node]] = []

    def visit(node: _Node, path: list[_Node]) -> None:
        live = []
        for child in sorted(node.children, key=lambda c: (c.rank is None, c.rank or 0)):
            if child.deleted:
                notes.append(_left_out(child, _DELETED))
            else:
                live.append(child)
        if not live:
            paths.append(path)
        for child in live:
            visit(child, path + [child])

    visit(root, [root])
    out, ends = [], set()
    for path in paths:
        while path and path[-1].role != "assistant":
            path = path[:-1]  # a prompter turn with no answer teaches nothing
        if path and id(path[-1]) not in ends:
            ends.add(id(path[-1]))
            out.append(path)
    if not out:
        notes.append((root.loc, "oasst tree has no assistant reply (unanswered prompt), left out"))
    return out


def _path_example(path: list[_Node], task: str | None) -> Example:
    messages = [Message(_OASST_ROLES[n.role], n.text) for n in path]
    return Example(messages=messages, source=path[-1].loc, task=task)


def oasst_examples(records: Iterable[tuple[str, dict]], task: str | None = None,
                   skip_bad: bool = False) -> tuple[list[Example], list[tuple[str, str]]]:
    """Examples and ``(location, reason)`` notes from OpenAssistant records of either export.

    Trees export: one record per tree, ``{"message_tree_id", "prompt": {message_id, role, text,
    rank, deleted, replies: [...]}}``. Flat export: one message per record with ``message_id``,
    ``parent_id`` (null at the root), ``role``, ``text``, ``rank``, ``deleted``. Each root-to-leaf
    path is one conversation (prompter -> user, assistant -> assistant); replies are ordered by rank
    (0 best, null last) so each tree's best path comes first. A trailing prompter turn is trimmed and
    paths that end on the same assistant message are kept once. Deleted messages (with what is under
    them), unanswered trees and, with ``skip_bad``, bad records and orphans (parent not in the file)
    are returned as notes. Example.source is the location of the path's last message.
    """
    notes: list[tuple[str, str]] = []
    roots: list[_Node] = []
    flat: dict[str, tuple[_Node, object]] = {}

    def bad(e: RecordError) -> None:
        if not skip_bad:
            raise e
        notes.append((e.location, e.reason))

    for loc, record in records:
        try:
            if "prompt" in record:
                roots.append(_oasst_tree_nodes(record, loc))
                continue
            if not record.get("message_id") or "parent_id" not in record:
                raise RecordError(loc, "an oasst flat-export message needs 'message_id' and 'parent_id' "
                                       "(null at a root); export whole messages, or use the trees export")
            node = _oasst_node(record, loc, "")
            if node.id in flat:
                raise RecordError(loc, f"message_id {node.id} is repeated (first at {flat[node.id][0].loc})")
            flat[node.id] = (node, record["parent_id"])
        except RecordError as e:
            bad(e)
    for node, parent in flat.values():
        if parent is None:
            roots.append(node)
        elif parent in flat:
            flat[parent][0].children.append(node)
    for node, parent in flat.values():
        if parent is not None and parent not in flat:
            n = _count(node)
            bad(RecordError(node.loc, f"parent message {parent} is not in the file"
                                      f"{f' ({n} messages under it left out too)' if n else ''}; "
                                      f"keep whole oasst trees when filtering the export"))
    examples = []
    for root in roots:
        try:
            examples.extend(_path_example(p, task) for p in _oasst_paths(root, notes))
        except RecordError as e:
            bad(e)
    return examples, notes


# --- a whole file --------------------------------------------------------------------------------


def _records(path: str | Path, format: str, fields: dict | None, skip_bad: bool,
             task: str | None, skipped: list[tuple[str, str]], chosen: list[str]) -> Iterator[Example]:
    """Examples of the file; ``chosen`` receives the format (detected or given)."""
    fmt = None if format == "auto" else format
    first = ""
    records = ((loc, map_fields(raw, fields))
               for loc, raw in read_records(path, errors=skipped if skip_bad else None))
    for loc, record in records:
        try:
            if fmt is None:
                fmt, first = detect_format(record, loc), loc
                chosen.append(fmt)
            elif format == "auto":
                check_same_shape(record, loc, fmt, first, detect_format)
            if fmt == "oasst":
                # Whole trees at once: a flat export may list replies before their parent.
                examples, notes = oasst_examples(chain([(loc, record)], records), task, skip_bad)
                skipped.extend(notes)
                yield from examples
                return
            yield normalize_record(record, fmt, loc, task, fields)
        except RecordError as e:
            if not skip_bad:
                raise
            skipped.append((e.location, e.reason))


def check_same_shape(record: dict, loc: str, fmt: str, first: str,
                     detect: Callable[[dict, str], str]) -> None:
    """Refuse a record whose shape (by ``detect``) differs from the file's format, detected at ``first``."""
    try:
        shape = detect(record, loc)
    except RecordError:
        return  # the format's own checks say which field is missing, more usefully
    if shape != fmt:
        raise RecordError(loc, f"this record looks like '{shape}' (fields {sorted(record)}) but the file's "
                               f"format is '{fmt}', detected at {first}; give every record the same "
                               f"shape, or set skip_bad to skip such records")


def load_examples(path: str | Path, format: str = "auto", fields: dict[str, str] | None = None,
                  skip_bad: bool = False, task: str | None = None) -> LoadResult:
    """Read a data file and normalize every record to an ``Example``.

    ``format="auto"`` detects the format from the first record and then requires every record to
    have that shape. ``fields`` maps canonical field names to the file's column names and is applied
    first. ``task`` overrides each record's ``task`` / ``dataset`` (/ dolly ``category``) field.
    A bad record raises ``DataError`` naming its location; with ``skip_bad`` bad records are listed in
    ``skipped`` instead, but a file with no usable record still raises.
    """
    check_format_args(format, fields)
    skipped: list[tuple[str, str]] = []
    chosen: list[str] = [] if format == "auto" else [format]
    examples = list(_records(path, format, fields, skip_bad, task, skipped, chosen))
    if not examples:
        first = f"; the first: {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
        raise DataError(f"{path}: no usable examples: all {len(skipped)} records were left out{first}. "
                        f"Fix the records, or check `format:` and `fields:`{_field_hint(fields)}")
    return LoadResult(examples=examples, skipped=skipped, format=chosen[0], path=Path(path))
