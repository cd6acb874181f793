"""General text: reading a prefix of a plain-text file, and mixing it into training (replay).

Replay trains on general-text rows beside the task rows, a mitigation for catastrophic forgetting;
the same file (a disjoint prefix of it) is where forgetting is measured as perplexity.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace
from pathlib import Path

from tuneforge.data.conversation import Tokenized
from tuneforge.data.packing import PackedRow, no_pack
from tuneforge.errors import ConfigError, DataError


def read_text_prefix(path: str | Path, max_chars: int) -> str:
    """The first ``max_chars`` characters of a UTF-8 text file (a DataError names a missing file)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"general text file '{path}' does not exist; give a plain-text file (.txt)")
    with p.open(encoding="utf-8", errors="replace") as f:
        text = f.read(max_chars)
    if not text.strip():
        raise DataError(f"{path}: the file is empty; give general text to measure perplexity on")
    return text


def text_token_ids(tokenizer, text: str, max_tokens: int) -> list[int]:
    """At most ``max_tokens`` token ids of ``text`` (tokenized without special tokens)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]


def replay_rows(tokenizer, path: str | Path, n_rows: int, row_len: int, seed: int = 0,
                skip_tokens: int = 0) -> list[PackedRow]:
    """``n_rows`` rows of general text (``row_len`` tokens each, all trained) for replay.

    Chunks come from the file after its first ``skip_tokens`` tokens (keep the prefix that measures
    perplexity out of training), in a seeded order, so the same seed gives the same rows.
    """
    if n_rows <= 0:
        return []
    budget = skip_tokens + row_len * n_rows * 4
    ids = text_token_ids(tokenizer, read_text_prefix(path, max_chars=8 * budget + 4096), budget)[skip_tokens:]
    starts = list(range(0, max(len(ids) - row_len, 1), row_len))
    random.Random(f"replay/{seed}").shuffle(starts)
    chunks = [ids[s:s + row_len] for s in starts[:n_rows]]
    return no_pack([Tokenized(input_ids=c, labels=list(c), source=f"{path}#replay", task="replay")
                    for c in chunks if len(c) >= 2])


def with_replay(data, tokenizer, path: str | Path, ratio: float, row_len: int, seed: int = 0,
                skip_tokens: int = 0):
    """A copy of ``TrainData`` with general-text rows added: ``ratio`` replay rows per task row."""
    if not 0 < ratio <= 1:
        raise ConfigError(f"replay ratio {ratio}: give a share in (0, 1], e.g. 0.2 for one general row per 5")
    extra = replay_rows(tokenizer, path, math.ceil(ratio * len(data.train_rows)), row_len, seed, skip_tokens)
    rows = list(data.train_rows) + extra
    random.Random(f"replay/order/{seed}").shuffle(rows)
    return replace(data, train_rows=rows, per_source={**data.per_source, f"{path} (replay)": len(extra)})
