"""Chat template → token ids and loss labels.

A conversation is rendered with the tokenizer's own chat template (or :data:`CHATML_TEMPLATE`
when it has none) and tokenized once. Which tokens are trained is decided on characters, not
tokens: each message's content span is found in the rendered text by rendering growing prefixes
of the conversation, then every token whose character offsets overlap a trained span is trained.
This works for any template that renders earlier turns the same whatever follows them, and never
re-tokenizes pieces separately (which would change the ids at piece boundaries).

Default labels: assistant content plus the end-of-turn marker right after it (``<|im_end|>`` for
ChatML, the eos token otherwise) are trained; role headers, the newline after the end-of-turn
marker, system and user turns are -100. ``Message.train`` overrides the default per message.

``train_on_prompt=True`` trains every token of the rendered conversation (headers, system and user
turns, a default system prompt the template injects) except the whole turn of a message marked
``train: false``.
"""

from __future__ import annotations

from typing import Any

from tuneforge.data.conversation import Example, Message, Tokenized
from tuneforge.errors import DataError

IGNORE = -100

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
"""Fallback template for tokenizers without ``chat_template``. When the tokenizer has no single
``<|im_end|>`` token, an eos token is inserted and trained after each trained turn instead, so the
model still learns to stop."""

# End-of-turn markers of common templates; the eos token is tried first.
EOT_MARKERS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")
_SENTINEL = "TFSENTINELq7Zx"
_OPEN, _CLOSE = "⟦", "⟧"
_GREEN, _RESET = "\x1b[32m", "\x1b[0m"


class TooLongError(DataError):
    """A conversation longer than ``max_len``; ``n_tokens`` says by how much (for ``data inspect``)."""

    def __init__(self, source: str, n_tokens: int, max_len: int):
        super().__init__(f"{source}: the conversation is {n_tokens} tokens, longer than max_len {max_len}. "
                         "Raise `data.max_seq_len`, or pass `--skip-bad` to skip such examples.")
        self.n_tokens = n_tokens
        self.max_len = max_len


def encode(example: Example, tokenizer: Any, max_len: int, train_on_prompt: bool = False) -> list[Tokenized]:
    """Token ids and aligned labels (-100 = no loss) of one example.

    A conversation gives one :class:`Tokenized` and raises :class:`TooLongError` when longer than
    ``max_len``; plain text (``example.text``) gets the eos token appended and is split into chunks
    of at most ``max_len`` tokens, all trained.
    """
    if example.messages:
        return [_encode_conversation(example, tokenizer, max_len, train_on_prompt)]
    if example.text is not None:
        return _encode_text(example, tokenizer, max_len)
    raise DataError(f"{_where(example)}: the example has neither messages nor text; "
                    "fix the record or pass `--skip-bad` to skip it.")


def render_masked(tokenized: Tokenized, tokenizer: Any, color: bool = False) -> str:
    """The decoded text with trained spans wrapped in ⟦ ⟧ (or green when ``color``).

    Special tokens stay visible, so a trained end-of-turn marker shows inside the brackets.
    """
    ids, labels = tokenized.input_ids, tokenized.labels
    out: list[str] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i < len(ids) and (labels[i] != IGNORE) == (labels[start] != IGNORE):
            continue
        text = tokenizer.decode(ids[start:i], skip_special_tokens=False)
        if labels[start] != IGNORE:
            text = f"{_GREEN}{text}{_RESET}" if color else f"{_OPEN}{text}{_CLOSE}"
        out.append(text)
        start = i
    return "".join(out)


def _where(example: Example) -> str:
    return example.source or "<example>"


def _encode_text(example: Example, tokenizer: Any, max_len: int) -> list[Tokenized]:
    # add_special_tokens=True: raw text gets whatever the model's tokenizer puts in front (e.g. BOS).
    ids = list(tokenizer(example.text, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    if not ids:
        raise DataError(f"{_where(example)}: the text is empty; fix the record or pass `--skip-bad`.")
    return [Tokenized(input_ids=ids[i:i + max_len], labels=ids[i:i + max_len], source=example.source,
                      task=example.task) for i in range(0, len(ids), max_len)]


def _render(tokenizer: Any, template: str | None, messages: list[Message]) -> str:
    dicts = [{"role": m.role, "content": m.content} for m in messages]
    return tokenizer.apply_chat_template(dicts, tokenize=False, chat_template=template)


def _eot_markers(tokenizer: Any) -> list[str]:
    """End-of-turn markers that are single tokens of this tokenizer (text markers teach no stop)."""
    eos = tokenizer.eos_token
    cands = ([eos] if eos else []) + [m for m in EOT_MARKERS if m != eos]
    unk = tokenizer.unk_token_id
    return [m for m in cands if tokenizer.convert_tokens_to_ids(m) not in (None, unk)]


def _is_trained(message: Message, train_on_prompt: bool) -> bool:
    if message.train is not None:
        return message.train
    return train_on_prompt or message.role == "assistant"


def _pieces(example: Example, tokenizer: Any, train_on_prompt: bool) -> list[tuple[str, bool]]:
    """The rendered conversation as consecutive (text, trained) pieces."""
    template = None if tokenizer.chat_template else CHATML_TEMPLATE  # None: the tokenizer's own
    msgs = example.messages
    try:
        prefixes = [_render(tokenizer, template, msgs[:i + 1]) for i in range(len(msgs))]
        probes = [_render(tokenizer, template, msgs[:i] + [Message(m.role, _SENTINEL)])
                  for i, m in enumerate(msgs)]
    except Exception as e:  # jinja raise_exception / TemplateError: the template rejects this conversation
        raise DataError(f"{_where(example)}: the chat template rejects this conversation ({e}); "
                        "fix the roles/order of its messages or pass `--skip-bad`.") from e
    full = prefixes[-1]
    eos = tokenizer.eos_token
    markers = _eot_markers(tokenizer)
    pieces: list[tuple[str, bool]] = []
    pos = 0
    for msg, prefix, probe in zip(msgs, prefixes, probes, strict=True):
        head_end = probe.find(_SENTINEL)
        if not full.startswith(prefix) or head_end < pos or probe[:head_end] != full[:head_end]:
            raise DataError(f"{_where(example)}: the tokenizer's chat template renders a turn differently "
                            "depending on the turns after it, so the loss mask cannot be located; "
                            "set a plain chat template on the tokenizer.")
        trained = _is_trained(msg, train_on_prompt)
        content = msg.content
        if full[head_end:head_end + len(content)] != content:
            content = content.strip()  # some templates trim content
            if full[head_end:head_end + len(content)] != content:
                raise DataError(f"{_where(example)}: the chat template does not render the {msg.role} "
                                "message verbatim, so its loss mask cannot be located; "
                                "set a plain chat template on the tokenizer.")
        end = head_end + len(content)
        seg_end = len(prefix)
        suffix = full[end:seg_end]
        eot = next((m for m in markers if suffix.lstrip(" \n").startswith(m)), None)
        eot_end = end + suffix.index(eot) + len(eot) if eot else end
        whole = train_on_prompt and trained
        pieces.append((full[pos:head_end], whole))
        pieces.append((full[head_end:eot_end], trained))
        if trained and eot is None and eos and msg.role == "assistant":
            # No end-of-turn token in the template: train an eos so the model learns to stop.
            pieces.append((eos, True))
        pieces.append((full[eot_end:seg_end], whole))
        pos = seg_end
    pieces.append((full[pos:], False))
    return [p for p in pieces if p[0]]


def _encode_conversation(example: Example, tokenizer: Any, max_len: int, train_on_prompt: bool) -> Tokenized:
    pieces = _pieces(example, tokenizer, train_on_prompt)
    text = "".join(p for p, _ in pieces)
    mark = bytearray(len(text))
    pos = 0
    for piece, trained in pieces:
        if trained:
            mark[pos:pos + len(piece)] = b"\x01" * len(piece)
        pos += len(piece)
    # The rendered text already holds any BOS the template wants: add no second one.
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [t if any(mark[s:e]) else IGNORE for t, (s, e) in zip(ids, enc["offset_mapping"], strict=True)]
    if len(ids) > max_len:
        raise TooLongError(_where(example), len(ids), max_len)
    if all(x == IGNORE for x in labels):
        raise DataError(f"{_where(example)}: no token is trained (no assistant message, or every one has "
                        "`train: false`); add an assistant reply or pass `--skip-bad` to skip it.")
    return Tokenized(input_ids=ids, labels=labels, source=example.source, task=example.task)
