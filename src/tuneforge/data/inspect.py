"""``data inspect``: what the trainer would see of each data file, before any training.

Per file: the format detected, records read and skipped (and why), token-length statistics, the
share of tokens that are trained, a histogram of token lengths (PNG), how many packed rows the file
fills, and a few examples with their trained spans marked. A preference file (pairs) is shown the same way, each
pair as its prompt and both answers with their trained spans marked; its rows hold whole pairs (two answers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tuneforge.data.conversation import Tokenized
from tuneforge.data.formats import load_examples
from tuneforge.data.packing import pack
from tuneforge.data.preference import collate_pairs, encode_pairs, is_pair_file, load_pairs, render_pair
from tuneforge.data.template import TooLongError, encode, render_masked
from tuneforge.errors import DataError
from tuneforge.plotting import pyplot, save_figure

_MAX_REASONS = 5


@dataclass
class LengthStats:
    """Token lengths of the tokenized examples (text chunks count one each)."""

    min: int
    mean: float
    median: float
    p95: float
    max: int
    total_tokens: int
    trained_tokens: int

    @property
    def trained_share(self) -> float:
        return self.trained_tokens / self.total_tokens if self.total_tokens else 0.0


@dataclass
class FileInspection:
    """What one data file gives the trainer."""

    path: str
    format: str
    n_records: int
    n_kept: int
    skipped: list[tuple[str, str]]
    n_sequences: int
    stats: LengthStats | None
    packed_rows: int
    histogram: Path | None
    too_long: list[int] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)


@dataclass
class InspectReport:
    """One :class:`FileInspection` per file, at one ``max_len``."""

    files: list[FileInspection]
    max_len: int


def inspect_data(paths: list[str], tokenizer: Any, max_len: int, out_dir: Path, n_show: int = 3,
                 format: str = "auto", fields: dict[str, str] | None = None, skip_bad: bool = True,
                 train_on_prompt: bool = False, color: bool = False) -> InspectReport:
    """Load, tokenize and pack each file as training would, writing a length histogram per file.

    Records that cannot be read or are longer than ``max_len`` are listed as skipped with their
    reason (``skip_bad=True``) or raise :class:`DataError` at the first one.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    used: set[str] = set()
    for path in paths:
        if is_pair_file(path, format, fields):
            files.append(_inspect_pairs(path, tokenizer, max_len, out_dir, used, n_show, format, fields, skip_bad,
                                        color))
            continue
        loaded = load_examples(path, format=format, fields=fields, skip_bad=skip_bad)
        skipped = list(loaded.skipped)
        tokenized: list[Tokenized] = []
        samples: list[str] = []
        n_kept = 0
        too_long: list[int] = []
        for ex in loaded.examples:
            try:
                parts = encode(ex, tokenizer, max_len, train_on_prompt)
            except DataError as e:
                if not skip_bad:
                    raise
                if isinstance(e, TooLongError):
                    too_long.append(e.n_tokens)
                skipped.append((ex.source, _reason(str(e), ex.source)))
                continue
            n_kept += 1
            tokenized.extend(parts)
            if len(samples) < n_show:
                samples.append(render_masked(parts[0], tokenizer, color=color))
        lengths = [len(t.input_ids) for t in tokenized]
        stats = _stats(tokenized) if tokenized else None
        hist = (_histogram(lengths, too_long, max_len, path, _png_path(out_dir, path, used))
                if lengths or too_long else None)
        files.append(FileInspection(
            path=str(path), format=loaded.format, n_records=len(loaded.examples) + len(loaded.skipped),
            n_kept=n_kept, skipped=skipped, n_sequences=len(tokenized), stats=stats,
            packed_rows=len(pack(tokenized, max_len)), histogram=hist, too_long=too_long,
            samples=samples))
    return InspectReport(files=files, max_len=max_len)


def _inspect_pairs(path: str, tokenizer: Any, max_len: int, out_dir: Path, used: set[str], n_show: int,
                   format: str, fields: dict[str, str] | None, skip_bad: bool, color: bool) -> FileInspection:
    """A pair file as training reads it: both answers of a pair tokenized, pairs packed in rows of ``2 * max_len``."""
    loaded = load_pairs(path, format=format, fields=fields, skip_bad=skip_bad)
    pairs, bad = encode_pairs(loaded.pairs, tokenizer, max_len, skip_bad)
    skipped = list(loaded.skipped) + bad
    tokenized = [t for p in pairs for t in (p.chosen, p.rejected)]
    lengths = [len(t.input_ids) for t in tokenized]
    rows = collate_pairs(pairs, tokenizer.pad_token_id, 2 * max_len)["input_ids"].shape[0] if pairs else 0
    return FileInspection(
        path=str(path), format=loaded.format, n_records=len(loaded.pairs) + len(loaded.skipped), n_kept=len(pairs),
        skipped=skipped, n_sequences=len(tokenized), stats=_stats(tokenized) if tokenized else None,
        packed_rows=rows, histogram=_histogram(lengths, [], max_len, path, _png_path(out_dir, path, used))
        if lengths else None, samples=[render_pair(p, tokenizer, color=color) for p in pairs[:n_show]])


def format_report(report: InspectReport) -> str:
    """The text ``tuneforge data inspect`` prints: a summary table, then skips, plots and samples."""
    head = ("file", "format", "records", "kept", "skipped", "min", "mean", "median", "p95", "max",
            "trained", f"rows@{report.max_len}")
    table = [head]
    for f in report.files:
        s = f.stats
        nums = (("-",) * 6 if s is None else
                (str(s.min), f"{s.mean:.1f}", f"{s.median:.0f}", f"{s.p95:.0f}", str(s.max),
                 f"{100 * s.trained_share:.1f}%"))
        table.append((f.path, f.format, str(f.n_records), str(f.n_kept), str(len(f.skipped)), *nums,
                      str(f.packed_rows)))
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    # Names left-aligned, numbers right-aligned.
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths, strict=True))) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("token lengths in tokens; 'trained' is the share of tokens with a loss; a pair counts its two "
                 "answers (each with the prompt) and fills rows of twice max_len")
    for f in report.files:
        lines.append("")
        lines.append(f"== {f.path}")
        if f.histogram is not None:
            lines.append(f"length histogram: {f.histogram}")
        if f.too_long:
            lines.append(f"{len(f.too_long)} over max_len {report.max_len} (longest {max(f.too_long)} "
                         "tokens): raise `data.max_seq_len` to keep them")
        if f.skipped:
            lines.append(f"skipped {len(f.skipped)}:")
            lines.extend(f"  {loc}: {why}" for loc, why in f.skipped[:_MAX_REASONS])
            if len(f.skipped) > _MAX_REASONS:
                lines.append(f"  ... and {len(f.skipped) - _MAX_REASONS} more")
        for i, sample in enumerate(f.samples, 1):
            lines.append(f"-- example {i} (trained spans in ⟦ ⟧)")
            lines.append(sample)
    return "\n".join(lines)


def _reason(message: str, source: str) -> str:
    prefix = f"{source}: "
    return message[len(prefix):] if source and message.startswith(prefix) else message


def _stats(tokenized: list[Tokenized]) -> LengthStats:
    arr = np.array([len(t.input_ids) for t in tokenized])
    return LengthStats(min=int(arr.min()), mean=float(arr.mean()), median=float(np.median(arr)),
                       p95=float(np.percentile(arr, 95)), max=int(arr.max()), total_tokens=int(arr.sum()),
                       trained_tokens=sum(t.n_trained for t in tokenized))


def _png_path(out_dir: Path, path: str, used: set[str]) -> Path:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).name)
    name, i = f"{stem}.lengths.png", 2
    while name in used:  # the same file name in two folders
        name, i = f"{stem}.{i}.lengths.png", i + 1
    used.add(name)
    return out_dir / name


def _histogram(lengths: list[int], too_long: list[int], max_len: int, title: str, out: Path) -> Path:
    """Kept sequences in blue, conversations skipped as too long in orange, ``max_len`` in red."""
    fig, ax = pyplot().subplots(figsize=(7, 4))
    both = lengths + too_long
    bins = np.histogram_bin_edges(both, bins=min(50, max(5, len(set(both)))))
    ax.hist([lengths, too_long], bins=bins, stacked=True, color=["tab:blue", "tab:orange"],
            label=["kept", "too long (skipped)"])
    longest = max(both, default=0)
    note = ""
    if max_len <= 1.5 * longest:
        ax.axvline(max_len, color="tab:red", linestyle="--", label=f"max_len {max_len}")
    else:  # scaled to the data: a far-away max_len line would squeeze every bar into the left edge
        note = f"; max_len {max_len} is {max_len / max(longest, 1):.0f}× the longest"
        ax.set_xlim(0, longest * 1.05 + 1)
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("examples")
    ax.set_title(f"{Path(title).name}: {len(lengths)} kept, {len(too_long)} over max_len{note}", fontsize=10)
    ax.legend()
    return save_figure(fig, out)
