"""Evaluation items: a prompt, its reference answer, and what a record says about scoring it.

Any training format works (the last assistant turn is the reference). Extra record fields add
scoring information:

- ``choices`` (list of strings) + ``answer`` (index or the choice's text; else ``label``,
  ``completion`` or ``output``): a multiple-choice item; the prompt is ``prompt``, ``question`` or
  ``instruction`` (+ ``input``) when the record has no conversation.
- ``schema`` (a JSON Schema object): the ``json_schema`` metric checks the output against it.
- ``pattern`` (a regular expression): the ``regex`` metric checks the whole output against it.
- ``should_refuse`` (bool): the prompt should (or should not) be declined; a record with only a
  prompt and ``should_refuse`` has no reference answer.
- ``task`` / ``dataset``: the per-task breakdown.

Where items come from (files, builtin sources): :mod:`tuneforge.eval.sources`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from tuneforge.data.conversation import Example, Message
from tuneforge.data.formats import detect_format, normalize_record, strip_end_of_text
from tuneforge.errors import DataError

PROMPT_KEYS = ("prompt", "question", "instruction", "query")
ANSWER_KEYS = ("answer", "label", "completion", "output")
MAX_AUTO_CHOICES = 20


@dataclass
class EvalItem:
    """One prompt to evaluate, with its reference and optional scoring information."""

    prompt: list[Message]
    reference: str | None = None
    task: str | None = None
    source: str = ""
    choices: list[str] | None = None
    answer_index: int | None = None
    schema: dict | None = None
    pattern: str | None = None
    should_refuse: bool | None = None
    text: str | None = None  # plain-text records: perplexity only

    @property
    def example(self) -> Example:
        """The prompt plus the reference as an assistant turn (for loss and training)."""
        return Example(messages=self.prompt + [Message("assistant", self.reference or "")],
                       source=self.source, task=self.task)


def item_from_example(example: Example) -> EvalItem:
    """An item from a normalized example: everything before the last assistant turn is the prompt."""
    if example.text is not None:
        return EvalItem(prompt=[], text=example.text, task=example.task, source=example.source)
    msgs = example.messages
    if msgs and msgs[-1].role == "assistant":
        return EvalItem(prompt=msgs[:-1], reference=msgs[-1].content, task=example.task, source=example.source)
    return EvalItem(prompt=msgs, task=example.task, source=example.source)


def _prompt_text(record: dict, loc: str) -> str:
    key = next((k for k in PROMPT_KEYS if isinstance(record.get(k), str) and record[k].strip()), None)
    if key is None:
        raise DataError(f"{loc}: no prompt: give one of the fields {', '.join(PROMPT_KEYS)} (a non-empty string)")
    text = record[key].rstrip("\n")
    if isinstance(record.get("input"), str) and record["input"].strip():
        text += "\n\n" + record["input"]
    return text


def _choice_item(record: dict, loc: str) -> EvalItem:
    choices = record["choices"]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise DataError(f"{loc}: 'choices' must be a list of at least 2 non-empty strings")
    choices = [strip_end_of_text(c) for c in choices]
    key = next((k for k in ANSWER_KEYS if k in record), None)
    if key is None:
        raise DataError(f"{loc}: a multiple-choice record needs the correct answer in one of "
                        f"{', '.join(ANSWER_KEYS)} (an index into choices or the choice's text)")
    answer = record[key]
    if isinstance(answer, bool) or not isinstance(answer, int | str):
        raise DataError(f"{loc}: '{key}' must be an index into choices or the text of a choice")
    if isinstance(answer, str):
        answer = strip_end_of_text(answer)
        if answer not in choices:
            raise DataError(f"{loc}: the answer {answer!r} is not one of the choices {choices}")
        index = choices.index(answer)
    elif not 0 <= answer < len(choices):
        raise DataError(f"{loc}: answer index {answer} is outside choices (0..{len(choices) - 1})")
    else:
        index = answer
    if "messages" in record or "conversations" in record:
        prompt = item_from_example(normalize_record(record, detect_format(record, loc), loc)).prompt
    else:
        prompt = [Message("user", _prompt_text(record, loc))]
    return EvalItem(prompt=prompt, reference=choices[index], choices=choices, answer_index=index, source=loc)


def item_from_record(record: dict, loc: str, format: str = "auto", task: str | None = None) -> EvalItem:
    """One raw record as an item (see the module docstring for the fields)."""
    if "choices" in record:
        item = _choice_item(record, loc)
    elif "should_refuse" in record and not any(k in record for k in ("completion", "output", "messages",
                                                                     "conversations", "response")):
        item = EvalItem(prompt=[Message("user", _prompt_text(record, loc))], source=loc)
    else:
        fmt = detect_format(record, loc) if format == "auto" else format
        item = item_from_example(normalize_record(record, fmt, loc))
    item.task = task or record.get("task") or record.get("dataset") or item.task
    if "schema" in record:
        if not isinstance(record["schema"], dict):
            raise DataError(f"{loc}: 'schema' must be a JSON Schema object")
        item.schema = record["schema"]
    if "pattern" in record:
        item.pattern = str(record["pattern"])
    if "should_refuse" in record:
        if not isinstance(record["should_refuse"], bool):
            raise DataError(f"{loc}: 'should_refuse' must be true or false")
        item.should_refuse = record["should_refuse"]
    return item


def spread(items: list, limit: int | None) -> list:
    """At most ``limit`` items evenly spaced over the list (files are often sorted by label or task)."""
    if not limit or limit >= len(items):
        return items
    return [items[i * len(items) // limit] for i in range(limit)]


def auto_choices(items: list[EvalItem]) -> list[EvalItem]:
    """Give items without ``choices`` the closed label set of their task: its distinct references.

    Used for multiple choice on classification data whose records carry only the right label
    (e.g. P3's ag_news: World/Sports/Business/Sci/Tech). A task with more than
    ``MAX_AUTO_CHOICES`` distinct answers, or where no answer occurs twice, is not a classification
    task and gets none.
    """
    labels: dict[str | None, list[str]] = defaultdict(list)
    counts: dict[str | None, int] = defaultdict(int)
    for it in items:
        if it.choices is None and it.reference is not None:
            counts[it.task] += 1
            if it.reference not in labels[it.task]:
                labels[it.task].append(it.reference)
    out = []
    for it in items:
        opts = labels.get(it.task, [])
        closed = 2 <= len(opts) <= MAX_AUTO_CHOICES and len(opts) < counts[it.task]  # some label repeats
        if it.choices is None and it.reference is not None and closed:
            it = EvalItem(**{**it.__dict__, "choices": sorted(opts), "answer_index": sorted(opts).index(it.reference)})
        out.append(it)
    return out


@dataclass
class ItemSummary:
    """What kinds of items a set holds (decides the default metrics)."""

    n: int
    with_reference: int
    with_choices: int
    with_schema: int
    with_pattern: int
    with_refusal_label: int
    plain_text: int
    tasks: list[str] = field(default_factory=list)


def summarize(items: list[EvalItem]) -> ItemSummary:
    return ItemSummary(n=len(items), with_reference=sum(i.reference is not None for i in items),
                       with_choices=sum(i.choices is not None for i in items),
                       with_schema=sum(i.schema is not None for i in items),
                       with_pattern=sum(i.pattern is not None for i in items),
                       with_refusal_label=sum(i.should_refuse is not None for i in items),
                       plain_text=sum(i.text is not None for i in items),
                       tasks=sorted({i.task or "default" for i in items}))
