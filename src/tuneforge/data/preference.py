"""Preference pairs: read, validate, tokenize and batch (prompt, chosen answer, rejected answer).

Formats (``PREFERENCE_FORMATS``), detected from the first record like the SFT formats:

- ``prompt_chosen_rejected``: ``prompt``, ``chosen``, ``rejected`` strings (TRL's standard form), plus an
  optional ``system`` string.
- ``messages_pairs``: ``chosen`` and ``rejected`` as message lists ``[{role, content}]`` (TRL's
  conversational form, UltraFeedback-binarized). With a ``prompt`` list the two lists are the answers;
  without one, the longest shared prefix of the two lists is the prompt.
- ``hh_rlhf``: Anthropic HH-style ``chosen`` and ``rejected`` strings holding whole transcripts
  ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``, split at the last assistant turn; the two must agree before it.

A pair is tokenized as two conversations (prompt + chosen, prompt + rejected) with the chat template of
:mod:`tuneforge.data.template`, so the labels are the SFT ones: -100 on the prompt, the answer and its
end-of-turn token trained. A batch holds both answers of each pair, ``[chosen_0, rejected_0, chosen_1, ...]``,
one per row or packed into rows with document ids (:mod:`tuneforge.data.packing`), in one forward; or, sharing
the prompt, each pair as one document ``[prompt | chosen answer | rejected answer]`` whose ``branch_ids`` let the
attention mask keep the answers apart (:mod:`tuneforge.train.attention`), so the prompt is computed once.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tuneforge.data.conversation import ROLES, Example, Message, Tokenized
from tuneforge.data.formats import (
    RecordError,
    _string,
    _type_name,
    check_format_args,
    check_same_shape,
    map_fields,
    strip_end_of_text,
)
from tuneforge.data.packing import PAD_SEQ_ID, PackedRow, collate
from tuneforge.data.readers import read_records
from tuneforge.data.template import IGNORE, TooLongError, encode, render_masked
from tuneforge.errors import DataError

PREFERENCE_FORMATS = ("prompt_chosen_rejected", "messages_pairs", "hh_rlhf")
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected", "system", "task", "dataset")
EXPECTED_PREFERENCE_FIELDS = {
    "prompt_chosen_rejected": "prompt, chosen, rejected strings (+ system)",
    "messages_pairs": "chosen, rejected: [{role, content}] (+ prompt: [{role, content}])",
    "hh_rlhf": "chosen, rejected: transcripts '\\n\\nHuman: ...\\n\\nAssistant: ...'",
}
# HH transcripts: a turn starts at a blank line followed by the speaker's name.
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
PROMPT, CHOSEN, REJECTED = 0, 1, 2
"""``branch_ids`` of a pair sharing its prompt: the prompt's tokens (and padding), the chosen, the rejected answer's."""


@dataclass
class PreferencePair:
    """A prompt (shared turns) and two alternative answers (the turns after it), ``chosen`` preferred."""

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    source: str = ""
    task: str | None = None

    def conversations(self) -> tuple[Example, Example]:
        """prompt + chosen and prompt + rejected as SFT examples."""
        return (Example(messages=self.prompt + self.chosen, source=self.source, task=self.task),
                Example(messages=self.prompt + self.rejected, source=self.source, task=self.task))


@dataclass
class PairLoadResult:
    """Pairs of one file and the ``(location, reason)`` of the records skipped (``skip_bad``)."""

    pairs: list[PreferencePair]
    skipped: list[tuple[str, str]]
    format: str
    path: Path


@dataclass
class TokenizedPair:
    """Both answers of a pair tokenized with their prompt; the first ``prompt_len`` ids are shared.

    ``ref_logps`` holds the reference model's summed log-probs of (chosen, rejected) once precomputed.
    """

    chosen: Tokenized
    rejected: Tokenized
    prompt_len: int
    source: str = ""
    task: str | None = None
    ref_logps: tuple[float, float] | None = None

    def __len__(self) -> int:
        return len(self.chosen.input_ids) + len(self.rejected.input_ids)

    @property
    def shared_len(self) -> int:
        """Tokens of the pair with its prompt once: ``[prompt | chosen answer | rejected answer]``."""
        return len(self) - self.prompt_len


@dataclass
class PreferenceData:
    """Tokenized pairs ready for a preference objective, plus what a user should be told about the data."""

    train_pairs: list[TokenizedPair]
    val_pairs: list[TokenizedPair]
    held_out: list[PreferencePair] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    per_source: dict[str, int] = field(default_factory=dict)

    @property
    def n_train_tokens(self) -> int:
        return sum(len(p) for p in self.train_pairs)


# --- records -> pairs ---------------------------------------------------------------------------


def detect_preference_format(record: dict, location: str) -> str:
    """The preference format of ``record`` from its fields and their types; ``RecordError`` if none fits."""
    chosen, rejected, prompt = record.get("chosen"), record.get("rejected"), record.get("prompt")
    if chosen is not None and rejected is not None:
        if isinstance(chosen, list) or isinstance(rejected, list) or isinstance(prompt, list):
            return "messages_pairs"
        if "prompt" in record:
            return "prompt_chosen_rejected"
        return "hh_rlhf"
    expected = "; ".join(f"{name}: {f}" for name, f in EXPECTED_PREFERENCE_FIELDS.items())
    raise RecordError(location, f"cannot tell the preference format from the fields {sorted(record)}: a pair "
                                f"needs 'chosen' and 'rejected'. Expected one of: {expected}. Set `format:` to "
                                f"one of {', '.join(PREFERENCE_FORMATS)}, or map your column names with "
                                f"`fields:`, e.g. fields: {{chosen: better, rejected: worse}}")


def _label(key: str, fields: dict | None) -> str:
    column = (fields or {}).get(key, key)
    return f"'{key}'" if column == key else f"'{column}' (mapped to '{key}')"


def _text(r: dict, key: str, loc: str, fields: dict | None, **kw) -> str | None:
    column = (fields or {}).get(key, key)
    fix = (f"add it to every record, or map your column to it with fields: {{{key}: <your column>}}"
           if column == key else f"add the column '{column}', or fix the fields: mapping")
    return _string(r, key, loc, _label(key, fields), fix=fix, **kw)


def _check_differ(pair: PreferencePair, loc: str) -> PreferencePair:
    if [(m.role, m.content) for m in pair.chosen] == [(m.role, m.content) for m in pair.rejected]:
        raise RecordError(loc, "'chosen' and 'rejected' are the same answer, so there is nothing to prefer; "
                               "fix the record or drop it (skip_bad skips such records)")
    return pair


def _prompt_chosen_rejected(r: dict, loc: str, fields: dict | None, task: str | None) -> PreferencePair:
    prompt = _text(r, "prompt", loc, fields).rstrip("\r\n")
    chosen = _text(r, "chosen", loc, fields, assistant=True)
    rejected = _text(r, "rejected", loc, fields, assistant=True)
    system = _text(r, "system", loc, fields, required=False, allow_empty=True)
    head = [Message("system", system)] if system and system.strip() else []
    return _check_differ(PreferencePair(head + [Message("user", prompt)], [Message("assistant", chosen)],
                                        [Message("assistant", rejected)], loc, task), loc)


def _message_list(r: dict, key: str, loc: str, fields: dict | None) -> list[Message]:
    turns, column = r.get(key), (fields or {}).get(key, key)
    if not isinstance(turns, list) or not turns:
        got = "it is missing" if turns is None else f"got {_type_name(turns)}"
        raise RecordError(loc, f"field {_label(key, fields)} must be a non-empty list of {{role, content}} "
                               f"messages ({got})")
    out = []
    for i, turn in enumerate(turns):
        where = f"{column}[{i}]"
        if not isinstance(turn, dict):
            raise RecordError(loc, f"{where} must be an object {{role, content}}, got {_type_name(turn)}")
        role = turn.get("role")
        if role not in ROLES:
            got = "it is missing" if role is None else f"got {role!r}"
            raise RecordError(loc, f"{where}.role: unknown role ({got}); use one of {', '.join(ROLES)}")
        out.append(Message(role, _string(turn, "content", loc, f"{where}.content", assistant=role == "assistant")))
    return out


def _same(a: Message, b: Message) -> bool:
    return (a.role, a.content) == (b.role, b.content)


def _messages_pairs(r: dict, loc: str, fields: dict | None, task: str | None) -> PreferencePair:
    chosen = _message_list(r, "chosen", loc, fields)
    rejected = _message_list(r, "rejected", loc, fields)
    if r.get("prompt") is not None:
        prompt = _message_list(r, "prompt", loc, fields)
    else:
        n = 0
        while n < min(len(chosen), len(rejected)) and _same(chosen[n], rejected[n]):
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if not prompt:
            raise RecordError(loc, f"{_label('chosen', fields)} and {_label('rejected', fields)} share no "
                                   "leading turns, so there is no prompt; start both with the same user turn, "
                                   "or give the prompt as a 'prompt' list")
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if not answer or answer[0].role != "assistant":
            raise RecordError(loc, f"the {name} answer must start with an assistant turn after the prompt; "
                                   "end the shared prompt with a user turn")
    if prompt[-1].role == "assistant":
        raise RecordError(loc, "the prompt ends with an assistant turn; the answers must follow a user turn")
    return _check_differ(PreferencePair(prompt, chosen, rejected, loc, task), loc)


def split_hh_transcript(text: str, loc: str, label: str) -> tuple[list[Message], Message]:
    """An HH transcript as (turns before the last assistant turn, the last assistant turn)."""
    parts = _HH_TURN.split(text if text.startswith("\n\n") else "\n\n" + text)
    if parts[0].strip() or len(parts) < 3:
        raise RecordError(loc, f"{label} is not an HH transcript: it must consist of turns "
                               "'\\n\\nHuman: ...' and '\\n\\nAssistant: ...'; for a plain prompt and answers "
                               "use the prompt/chosen/rejected fields")
    turns = [Message(_HH_ROLES[speaker], body.strip())
             for speaker, body in zip(parts[1::2], parts[2::2], strict=True)]
    if turns[-1].role != "assistant":
        raise RecordError(loc, f"{label} does not end with an '\\n\\nAssistant:' turn, so there is no answer")
    answer = strip_end_of_text(turns[-1].content)
    if not answer:
        raise RecordError(loc, f"{label}: the last assistant turn is empty; write the answer or drop the record "
                               "(skip_bad skips such records)")
    return turns[:-1], Message("assistant", answer)


def _hh_rlhf(r: dict, loc: str, fields: dict | None, task: str | None) -> PreferencePair:
    chosen_text = _text(r, "chosen", loc, fields)
    rejected_text = _text(r, "rejected", loc, fields)
    prompt, chosen = split_hh_transcript(chosen_text, loc, _label("chosen", fields))
    other, rejected = split_hh_transcript(rejected_text, loc, _label("rejected", fields))
    if len(prompt) != len(other) or not all(map(_same, prompt, other)):
        raise RecordError(loc, "the chosen and rejected transcripts differ before their last assistant turn; "
                               "both must hold the same conversation up to the answer")
    if not prompt or prompt[-1].role != "user":
        raise RecordError(loc, "the last assistant turn must follow a '\\n\\nHuman:' turn")
    return _check_differ(PreferencePair(prompt, [chosen], [rejected], loc, task), loc)


_NORMALIZERS = {"prompt_chosen_rejected": _prompt_chosen_rejected, "messages_pairs": _messages_pairs,
                "hh_rlhf": _hh_rlhf}


def _task(record: dict, task: str | None) -> str | None:
    if task is not None:
        return task
    for key in ("task", "dataset"):
        value = record.get(key)
        if isinstance(value, str) and value.strip():
            return value
    return None


def normalize_pair(record: dict, format: str, location: str, task: str | None = None,
                   fields: dict[str, str] | None = None) -> PreferencePair:
    """One (already field-mapped) record as a :class:`PreferencePair`; ``RecordError`` if bad."""
    return _NORMALIZERS[format](record, location, fields, _task(record, task))


def _pairs(path: str | Path, format: str, fields: dict | None, skip_bad: bool, task: str | None,
           skipped: list[tuple[str, str]], chosen: list[str]) -> Iterator[PreferencePair]:
    fmt = None if format == "auto" else format
    first = ""
    for loc, raw in read_records(path, errors=skipped if skip_bad else None):
        record = map_fields(raw, fields)
        try:
            if fmt is None:
                fmt, first = detect_preference_format(record, loc), loc
                chosen.append(fmt)
            elif format == "auto":
                check_same_shape(record, loc, fmt, first, detect_preference_format)
            yield normalize_pair(record, fmt, loc, task, fields)
        except RecordError as e:
            if not skip_bad:
                raise
            skipped.append((e.location, e.reason))


def is_pair_file(path: str | Path, format: str = "auto", fields: dict[str, str] | None = None) -> bool:
    """Whether ``path`` holds preference pairs: ``format`` names a preference format, or (auto) the first readable
    record has ``chosen`` and ``rejected``."""
    if format != "auto":
        return format in PREFERENCE_FORMATS
    for _, raw in read_records(path, errors=[]):
        record = map_fields(raw, {k: v for k, v in (fields or {}).items() if k in PREFERENCE_FIELDS})
        return "chosen" in record and "rejected" in record
    return False


def load_pairs(path: str | Path, format: str = "auto", fields: dict[str, str] | None = None,
               skip_bad: bool = False, task: str | None = None) -> PairLoadResult:
    """Read a preference file into pairs.

    ``format="auto"`` detects the format from the first record and then requires every record to have
    that shape. ``fields`` maps canonical names (``PREFERENCE_FIELDS``) to the file's columns. A bad
    record raises ``DataError`` naming ``file:line``; with ``skip_bad`` it is listed in ``skipped``
    instead, but a file with no usable pair still raises.
    """
    check_format_args(format, fields, PREFERENCE_FORMATS, PREFERENCE_FIELDS, "preference format",
                      "preference field")
    skipped: list[tuple[str, str]] = []
    chosen: list[str] = [] if format == "auto" else [format]
    pairs = list(_pairs(path, format, fields, skip_bad, task, skipped, chosen))
    if not pairs:
        first = f"; the first: {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
        hint = f" (your fields: mapping is {fields})" if fields else ""
        raise DataError(f"{path}: no usable preference pairs: all {len(skipped)} records were left out{first}. "
                        f"Fix the records, or check `format:` and `fields:`{hint}")
    return PairLoadResult(pairs=pairs, skipped=skipped, format=chosen[0], path=Path(path))


# --- pairs -> tokens ----------------------------------------------------------------------------


def _shared_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = 0
    while n < min(len(a), len(b), limit) and a[n] == b[n]:
        n += 1
    return n


def encode_pair(pair: PreferencePair, tokenizer: Any, max_len: int) -> TokenizedPair:
    """Both conversations of ``pair`` tokenized with the chat template; SFT labels on each answer.

    Raises :class:`TooLongError` naming the record and the answer when either side exceeds ``max_len``.
    """
    sides = []
    for name, example in zip(("chosen", "rejected"), pair.conversations(), strict=True):
        try:
            (tok,) = encode(example, tokenizer, max_len)
        except TooLongError as e:
            raise TooLongError(f"{pair.source or '<pair>'} ({name} answer)", e.n_tokens, e.max_len) from None
        sides.append(tok)
    chosen, rejected = sides
    first_trained = min(next(i for i, x in enumerate(t.labels) if x != IGNORE) for t in sides)
    prompt_len = _shared_prefix(chosen.input_ids, rejected.input_ids, first_trained)
    return TokenizedPair(chosen, rejected, prompt_len, pair.source, pair.task)


def encode_pairs(pairs: list[PreferencePair], tokenizer: Any, max_len: int,
                 skip_bad: bool = False) -> tuple[list[TokenizedPair], list[tuple[str, str]]]:
    """Tokenize every pair; with ``skip_bad`` a pair that fails (too long, nothing trained) is listed, not raised."""
    out: list[TokenizedPair] = []
    skipped: list[tuple[str, str]] = []
    for pair in pairs:
        try:
            out.append(encode_pair(pair, tokenizer, max_len))
        except DataError as e:
            if not skip_bad:
                raise
            msg = str(e)
            prefix = f"{pair.source}: "
            skipped.append((pair.source, msg[len(prefix):] if pair.source and msg.startswith(prefix) else msg))
    return out, skipped


def render_pair(pair: TokenizedPair, tokenizer: Any, color: bool = False) -> str:
    """The shared prompt once, then each answer with its trained span marked (⟦ ⟧, or green)."""
    prompt = tokenizer.decode(pair.chosen.input_ids[:pair.prompt_len], skip_special_tokens=False)
    lines = [f"prompt: {prompt}"]
    for name, tok in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        tail = Tokenized(tok.input_ids[pair.prompt_len:], tok.labels[pair.prompt_len:])
        lines.append(f"{name}: {render_masked(tail, tokenizer, color=color)}")
    return "\n".join(lines)


# --- batches: both answers of each pair in one forward ------------------------------------------


@dataclass
class _Rows:
    rows: list[PackedRow] = field(default_factory=list)
    index: list[list[int]] = field(default_factory=list)  # per row: each token's sequence in the batch
    branch: list[list[int]] = field(default_factory=list)  # per row, sharing the prompt: each token's branch

    def new_row(self) -> int:
        self.rows.append(PackedRow())
        self.index.append([])
        self.branch.append([])
        return len(self.rows) - 1


def _add_answer(rows: _Rows, row: int, tok: Tokenized, index: int) -> None:
    """One answer with its own copy of the prompt, as a document."""
    rows.rows[row].add(tok)
    rows.index[row] += [index] * len(tok.input_ids)


def _add_shared(rows: _Rows, row: int, pair: TokenizedPair, i: int) -> None:
    """Pair ``i`` as one document ``[prompt | chosen answer | rejected answer]``.

    Each answer's positions continue the prompt's, and its labels are those it has in its own row (whose first
    label is masked, as :meth:`PackedRow.add` does), so both answers are scored as in two documents.
    """
    p, chosen, rejected = pair.prompt_len, pair.chosen, pair.rejected
    packed = rows.rows[row]
    n = len(chosen.input_ids) + len(rejected.input_ids) - p
    packed.input_ids += chosen.input_ids + rejected.input_ids[p:]
    packed.labels += [IGNORE] + chosen.labels[1:] + ([IGNORE] + rejected.labels[1:])[p:]
    packed.position_ids += list(range(len(chosen.input_ids))) + list(range(p, len(rejected.input_ids)))
    packed.seq_ids += [len(packed.lengths)] * n
    packed.lengths.append(n)
    packed.sources.append(pair.source)
    rows.index[row] += [2 * i] * len(chosen.input_ids) + [2 * i + 1] * (len(rejected.input_ids) - p)
    rows.branch[row] += ([PROMPT] * p + [CHOSEN] * (len(chosen.input_ids) - p)
                         + [REJECTED] * (len(rejected.input_ids) - p))


def _pack(pairs: list[TokenizedPair], pack_len: int | None, share_prompt: bool) -> _Rows:
    """Rows in order; with ``pack_len`` each pair goes first-fit into one row of at most that many tokens."""
    out = _Rows()
    for i, pair in enumerate(pairs):
        size = pair.shared_len if share_prompt else len(pair)
        if pack_len is not None and size > pack_len:
            what = "the prompt once and both answers" if share_prompt else "chosen + rejected with their prompts"
            raise DataError(f"{pair.source or '<pair>'}: the pair is {size} tokens ({what}), more than the packed "
                            f"row length {pack_len}. Raise `data.max_seq_len`, or pass `--skip-bad` to skip such "
                            "pairs.")
        row = None if pack_len is None else next(
            (r for r, packed in enumerate(out.rows) if len(packed) + size <= pack_len), None)
        if row is None:
            row = out.new_row()
        if share_prompt:
            _add_shared(out, row, pair, i)
            continue
        _add_answer(out, row, pair.chosen, 2 * i)
        _add_answer(out, row if pack_len is not None else out.new_row(), pair.rejected, 2 * i + 1)
    return out


def _padded(per_row: list[list[int]], length: int, fill: int) -> torch.Tensor:
    out = torch.full((len(per_row), length), fill, dtype=torch.long)
    for b, values in enumerate(per_row):
        out[b, :len(values)] = torch.tensor(values, dtype=torch.long)
    return out


def collate_pairs(pairs: list[TokenizedPair], pad_id: int, pack_len: int | None = None,
                  share_prompt: bool = False) -> dict[str, torch.Tensor]:
    """One batch holding both answers of every pair, for one forward.

    Without ``pack_len``: rows ``[chosen_0, rejected_0, chosen_1, ...]`` padded to the longest. With it:
    pairs packed first-fit into rows of at most ``pack_len`` tokens, a pair never split across rows.
    With ``share_prompt`` each pair is one document ``[prompt | chosen answer | rejected answer]`` (one per row
    without ``pack_len``), and the batch has ``branch_ids`` [B, L] (``PROMPT``, ``CHOSEN``, ``REJECTED``).
    Keys: those of :func:`tuneforge.data.packing.collate`, plus ``sequence_index`` [B, L] (the token's
    sequence, ``2i`` chosen and ``2i + 1`` rejected of pair ``i``, a shared prompt's with its chosen answer;
    -1 on padding) and, when every pair has them, ``ref_logps`` [2 * pairs] in that order.
    """
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    packed = _pack(pairs, pack_len, share_prompt)
    batch = collate(packed.rows, pad_id)
    length = batch["input_ids"].shape[1]
    batch["sequence_index"] = _padded(packed.index, length, PAD_SEQ_ID)
    if share_prompt:
        batch["branch_ids"] = _padded(packed.branch, length, PROMPT)
    if all(p.ref_logps is not None for p in pairs):
        batch["ref_logps"] = torch.tensor([x for p in pairs for x in p.ref_logps], dtype=torch.float32)
    return batch
