"""Packing tokenized examples into rows and batching rows into tensors.

Packing is first-fit in input order: each example goes into the earliest row that still has room,
else opens a new row. It is deterministic, never drops or splits an example, keeps the data order
roughly intact (rows come out in the order they were opened), and fills rows nearly as well as
best-fit-decreasing on real length distributions. A segment tree over the rows' free space finds
the first fitting row in O(log rows), so packing stays fast on large datasets.

Inside a row, position ids restart at 0 for each example, ``seq_ids`` let the attention mask
(``tuneforge.train.attention``) keep attention inside each example, and the first label of each
example is -100 so that no token is trained to predict across an example boundary. Computed that
way, a packed example's logits equal its logits computed alone. For a model whose attention cannot keep
examples apart that way (ALiBi from a padding mask, for one), :func:`unpack` turns a packed batch back
into one example per row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tuneforge.data.conversation import Tokenized
from tuneforge.errors import DataError

IGNORE = -100
PAD_SEQ_ID = -1
"""``seq_ids`` value of padding: a sequence of its own, attending only to padding."""


@dataclass
class PackedRow:
    """One training row: one or more examples laid end to end."""

    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    seq_ids: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    def add(self, example: Tokenized) -> None:
        """Append an example: positions restart, its first label is masked."""
        n = len(example.input_ids)
        self.input_ids.extend(example.input_ids)
        self.labels.append(IGNORE)
        self.labels.extend(example.labels[1:])
        self.position_ids.extend(range(n))
        self.seq_ids.extend([len(self.lengths)] * n)
        self.lengths.append(n)
        self.sources.append(example.source)


def pack(examples: list[Tokenized], max_len: int) -> list[PackedRow]:
    """Pack examples first-fit in order into rows of at most ``max_len`` tokens."""
    _check_lengths(examples, max_len)
    rows: list[PackedRow] = []
    free = _FreeSpace(len(examples))
    for ex in examples:
        n = len(ex.input_ids)
        i = free.first_fit(n)
        if i is None:
            i = len(rows)
            rows.append(PackedRow())
            free.set(i, max_len)
        rows[i].add(ex)
        free.set(i, max_len - len(rows[i]))
    return rows


def no_pack(examples: list[Tokenized], max_len: int | None = None) -> list[PackedRow]:
    """One example per row (packing off); batches are padded to their longest row by :func:`collate`."""
    if max_len is not None:
        _check_lengths(examples, max_len)
    rows = []
    for ex in examples:
        row = PackedRow()
        row.add(ex)
        rows.append(row)
    return rows


def collate(rows: list[PackedRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad rows to the longest one: ``input_ids``, ``labels``, ``position_ids``, ``seq_ids`` [B, L].

    Padding has ``pad_id`` inputs, -100 labels, positions counting from 0 and ``seq_ids`` -1.
    """
    if not rows:
        raise ValueError("collate needs at least one row")
    length = max(len(r) for r in rows)
    batch = {k: torch.empty(len(rows), length, dtype=torch.long)
             for k in ("input_ids", "labels", "position_ids", "seq_ids")}
    for b, row in enumerate(rows):
        pad = length - len(row)
        batch["input_ids"][b] = torch.tensor(row.input_ids + [pad_id] * pad)
        batch["labels"][b] = torch.tensor(row.labels + [IGNORE] * pad)
        batch["position_ids"][b] = torch.tensor(row.position_ids + list(range(pad)))
        batch["seq_ids"][b] = torch.tensor(row.seq_ids + [PAD_SEQ_ID] * pad)
    return batch


def unpack(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A collated batch with one example per row, padded to the longest: the packed ``batch``'s examples in order.

    The loss over it is the packed batch's: labels and positions of each example are unchanged.
    """
    pieces = [(b, seq_ids == s) for b, seq_ids in enumerate(batch["seq_ids"])
              for s in seq_ids[seq_ids >= 0].unique_consecutive().tolist()]
    length = max(int(keep.sum()) for _, keep in pieces)
    fill = {"input_ids": 0, "labels": IGNORE, "seq_ids": PAD_SEQ_ID}  # padding is masked: any valid id will do
    out = {k: torch.full((len(pieces), length), v, dtype=torch.long) for k, v in fill.items()}
    out["position_ids"] = torch.zeros(len(pieces), length, dtype=torch.long)
    for row, (b, keep) in enumerate(pieces):
        n = int(keep.sum())
        for key in ("input_ids", "labels", "position_ids"):
            out[key][row, :n] = batch[key][b][keep]
        out["seq_ids"][row, :n] = 0
        out["position_ids"][row, n:] = torch.arange(length - n)  # padding as collate lays it out
    return out


def _check_lengths(examples: list[Tokenized], max_len: int) -> None:
    for ex in examples:
        if len(ex.input_ids) > max_len:
            raise DataError(f"{ex.source or '<example>'}: the example is {len(ex.input_ids)} tokens, longer "
                            f"than max_len {max_len}. Raise `data.max_seq_len`, or pass `--skip-bad` to "
                            "skip such examples.")
        if not ex.input_ids:
            raise DataError(f"{ex.source or '<example>'}: the example has no tokens; fix the record or "
                            "pass `--skip-bad` to skip it.")


class _FreeSpace:
    """Max segment tree over rows' free space: the first row with room for n tokens in O(log rows)."""

    def __init__(self, capacity: int):
        self.size = 1
        while self.size < max(capacity, 1):
            self.size *= 2
        self.tree = [0] * (2 * self.size)

    def set(self, i: int, free: int) -> None:
        i += self.size
        self.tree[i] = free
        while i > 1:
            i //= 2
            self.tree[i] = max(self.tree[2 * i], self.tree[2 * i + 1])

    def first_fit(self, n: int) -> int | None:
        if self.tree[1] < n:
            return None
        i = 1
        while i < self.size:
            i = 2 * i if self.tree[2 * i] >= n else 2 * i + 1
        return i - self.size
