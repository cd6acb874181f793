"""From the data config to packed training and validation rows (the whole data flow in one place)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tuneforge.config import DataConfig, DatasetSpec
from tuneforge.data.builtin_preferences import builtin_preferences
from tuneforge.data.builtin_tasks import builtin_tasks
from tuneforge.data.conversation import Example, Tokenized
from tuneforge.data.formats import load_examples
from tuneforge.data.mixture import MixSource, hold_out_tasks, mix, split_validation
from tuneforge.data.packing import PackedRow, no_pack, pack
from tuneforge.data.preference import PreferenceData, PreferencePair, encode_pairs, load_pairs
from tuneforge.data.replay import with_replay
from tuneforge.data.template import encode
from tuneforge.errors import DataError

BUILTIN_TASKS = "builtin:tasks"
BUILTIN_PREFERENCES = "builtin:preferences"


@dataclass
class TrainData:
    """Rows ready for the trainer, plus what a user should be told about the data."""

    train_rows: list[PackedRow]
    val_rows: list[PackedRow]
    n_train_examples: int
    n_val_examples: int
    held_out: list[Example] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    per_source: dict[str, int] = field(default_factory=dict)

    @property
    def n_train_tokens(self) -> int:
        return sum(len(r.input_ids) for r in self.train_rows)


def read_spec(spec: DatasetSpec, skip_bad: bool, seed: int) -> tuple[list[Example], list[tuple[str, str]]]:
    """Examples of one dataset spec (a file or ``builtin:tasks``), filtered to ``spec.tasks``, and the
    records skipped."""
    if spec.path == BUILTIN_TASKS:
        examples, skipped = builtin_tasks(seed=seed).train, []
    else:
        result = load_examples(spec.path, format=spec.format, fields=spec.fields, skip_bad=skip_bad,
                               task=spec.task)
        examples, skipped = result.examples, list(result.skipped)
    if spec.tasks:
        _, examples = hold_out_tasks(examples, spec.tasks, key=f"data.train ({spec.path}).tasks")
    return examples, skipped


def encode_all(examples: list[Example], tokenizer, cfg: DataConfig,
               skipped: list[tuple[str, str]]) -> list[Tokenized]:
    """Tokenize examples; too-long or unrenderable ones stop the run unless ``skip_bad``."""
    out: list[Tokenized] = []
    for ex in examples:
        try:
            out.extend(encode(ex, tokenizer, cfg.max_seq_len, cfg.train_on_prompt))
        except DataError as e:
            if not cfg.skip_bad:
                raise
            skipped.append((ex.source, str(e)))
    return out


def rows_of(tokenized: list[Tokenized], cfg: DataConfig) -> list[PackedRow]:
    return pack(tokenized, cfg.max_seq_len) if cfg.packing else no_pack(tokenized)


def read_and_split(cfg: DataConfig, read: Callable[[DatasetSpec, bool, int], tuple[list, list]], seed: int,
                   skipped: list[tuple[str, str]]) -> tuple[list, list, list, dict]:
    """Read each training spec with ``read``, mix, hold out tasks, and take the validation set (``data.eval``
    files, else :func:`validation_count` of them): (train, val, held out, per-source counts); bad records land in
    ``skipped``. Examples and preference pairs go through the same steps."""
    sources = []
    for spec in cfg.train:
        items, bad = read(spec, cfg.skip_bad, seed)
        skipped.extend(bad)
        sources.append(MixSource(name=spec.path, examples=items, weight=spec.weight, max_examples=spec.max_examples))
    items, per_source = mix(sources, seed=seed)
    held_out: list = []
    if cfg.holdout_tasks:
        items, held_out = hold_out_tasks(items, cfg.holdout_tasks)
    if cfg.eval:
        val: list = []
        for spec in cfg.eval:
            more, bad = read(spec, cfg.skip_bad, seed)
            val.extend(more)
            skipped.extend(bad)
        return items, val, held_out, per_source
    n_val = validation_count(cfg.val_fraction, len(items))
    if n_val:
        return (*split_validation(items, n_val, seed), held_out, per_source)
    return items, [], held_out, per_source


# With data.val_fraction unset: small sets keep every example for training (a handful of validation examples
# only gives a noisy loss), large ones stop at a validation set that is already precise and cheap to run.
AUTO_VAL_MIN_EXAMPLES = 100
AUTO_VAL_RANGE = (10, 1000)


def validation_count(fraction: float | None, n: int) -> int:
    """How many of ``n`` training items become the validation set: ``fraction`` of 20+ items, or, when it is
    None, none under 100 items and otherwise 5% kept within 10..1000."""
    if fraction is None:
        if n < AUTO_VAL_MIN_EXAMPLES:
            return 0
        low, high = AUTO_VAL_RANGE
        return min(max(round(0.05 * n), low), high)
    if fraction == 0 or n < 20:
        return 0
    return max(1, round(fraction * n))


def build_training_data(cfg: DataConfig, tokenizer, seed: int = 0) -> TrainData:
    """Read, validate, mix, hold out, split, tokenize and pack the configured datasets."""
    skipped: list[tuple[str, str]] = []
    train, val, held_out, per_source = read_and_split(cfg, read_spec, seed, skipped)
    train_tok = encode_all(train, tokenizer, cfg, skipped)
    if not train_tok:
        raise DataError("no training examples are left after validation; check the data files "
                        f"({', '.join(s.path for s in cfg.train)})")
    val_tok = encode_all(val, tokenizer, cfg, skipped)
    data = TrainData(train_rows=rows_of(train_tok, cfg), val_rows=rows_of(val_tok, cfg),
                     n_train_examples=len(train_tok), n_val_examples=len(val_tok), held_out=held_out,
                     skipped=skipped, per_source=per_source)
    if cfg.replay:
        data = with_replay(data, tokenizer, cfg.replay.path, cfg.replay.ratio, cfg.max_seq_len, seed,
                           cfg.replay.skip_tokens)
    return data


def read_pair_spec(spec: DatasetSpec, skip_bad: bool, seed: int) -> tuple[list[PreferencePair], list[tuple[str, str]]]:
    """Preference pairs of one dataset spec (a pair file or ``builtin:preferences``), filtered to ``spec.tasks``,
    and the records skipped."""
    if spec.path == BUILTIN_TASKS:
        raise DataError(f"data.train: {BUILTIN_TASKS} has no preference pairs; a preference objective needs pair "
                        f"files (prompt/chosen/rejected) or {BUILTIN_PREFERENCES}")
    if spec.path == BUILTIN_PREFERENCES:
        pairs, skipped = builtin_preferences(seed=seed).train, []
    else:
        result = load_pairs(spec.path, format=spec.format, fields=spec.fields, skip_bad=skip_bad, task=spec.task)
        pairs, skipped = result.pairs, list(result.skipped)
    if spec.tasks:
        _, pairs = hold_out_tasks(pairs, spec.tasks, key=f"data.train ({spec.path}).tasks")
    return pairs, skipped


def build_preference_data(cfg: DataConfig, tokenizer, seed: int = 0) -> PreferenceData:
    """The preference branch of :func:`build_training_data`: read, validate, mix, hold out, split and tokenize
    pairs (batches are made per step, both answers of each pair in one forward)."""
    skipped: list[tuple[str, str]] = []
    train, val, held_out, per_source = read_and_split(cfg, read_pair_spec, seed, skipped)
    train_tok, bad = encode_pairs(train, tokenizer, cfg.max_seq_len, cfg.skip_bad)
    skipped.extend(bad)
    if not train_tok:
        raise DataError("no training pairs are left after validation; check the data files "
                        f"({', '.join(s.path for s in cfg.train)})")
    val_tok, bad = encode_pairs(val, tokenizer, cfg.max_seq_len, cfg.skip_bad)
    skipped.extend(bad)
    return PreferenceData(train_pairs=train_tok, val_pairs=val_tok, held_out=held_out, skipped=skipped,
                          per_source=per_source)
