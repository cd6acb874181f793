"""Catastrophic forgetting: what a fine-tune costs the model outside its task, base vs tuned.

Two measures, both cheap enough to run during training:

- perplexity on general text the user gives (a prefix of ``max_tokens`` tokens, non-overlapping
  windows; see :func:`tuneforge.eval.scoring.token_perplexity`);
- the project's general-knowledge probes (:mod:`tuneforge.eval.probes`): 4-way accuracy by
  log-likelihood and the mean NLL of the right answers.

:class:`ForgettingCallback` plugs into ``train(callbacks=...)`` (it runs every
``train.eval_every`` steps and at the end) and warns or stops when perplexity rises by more than
``threshold_pct`` percent over the base model's, or probe accuracy falls by more than
``probe_drop_points``; :func:`forgetting_callback` builds it from a run's ``train.forgetting``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from tuneforge.config import ForgettingSettings
from tuneforge.data.replay import read_text_prefix, text_token_ids
from tuneforge.errors import ConfigError, StopTraining, TuneforgeError
from tuneforge.eval.probes import Probe, sample_probes
from tuneforge.eval.scoring import continuation_logprobs, token_perplexity
from tuneforge.log import get_logger
from tuneforge.models.load import pad_token_id
from tuneforge.train.callbacks import TrainCallback

logger = get_logger(__name__)


@dataclass
class ProbeResult:
    accuracy: float
    answer_nll: float
    n: int
    per_category: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def score_probes(model: torch.nn.Module, tokenizer, probes: list[Probe], batch_size: int = 64) -> ProbeResult:
    """4-way accuracy by summed log-likelihood on raw text, and the right answers' NLL per token."""
    pairs, owner = [], []
    for i, p in enumerate(probes):
        ctx = tokenizer(p.cloze)["input_ids"]
        for opt in p.options:
            pairs.append((ctx, tokenizer(" " + opt, add_special_tokens=False)["input_ids"]))
            owner.append(i)
    pad = pad_token_id(tokenizer)
    scores = continuation_logprobs(model, pairs, pad_id=pad, batch_size=batch_size)
    options: dict[int, list] = defaultdict(list)
    for i, s in zip(owner, scores, strict=True):
        options[i].append(s)
    hits: dict[str, list[bool]] = defaultdict(list)
    nll, n_tok = 0.0, 0
    for i, p in enumerate(probes):
        right, *wrong = options[i]
        hits[p.category].append(all(right.logprob > w.logprob for w in wrong))
        nll, n_tok = nll - right.logprob, n_tok + right.n_tokens
    flat = [h for hs in hits.values() for h in hs]
    return ProbeResult(accuracy=sum(flat) / max(len(flat), 1), answer_nll=nll / max(n_tok, 1), n=len(flat),
                       per_category={c: sum(h) / len(h) for c, h in sorted(hits.items())})


@dataclass
class ForgettingMeasure:
    """General-text perplexity and probe scores of one model state (None: not measured)."""

    general_ppl: float | None = None
    general_nll: float | None = None
    general_tokens: int = 0
    probe_accuracy: float | None = None
    probe_answer_nll: float | None = None
    probe_n: int = 0
    probe_per_category: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class GeneralText:
    """Token ids of a general-text prefix, tokenized once and reused at every measurement."""

    def __init__(self, tokenizer, path: str | Path, max_tokens: int = 4096):
        self.path = str(path)
        self.ids = text_token_ids(tokenizer, read_text_prefix(path, 8 * max_tokens + 1024), max_tokens)
        self.pad_id = pad_token_id(tokenizer)


def measure_forgetting(model: torch.nn.Module, tokenizer, general_text: GeneralText | str | Path | None = None,
                       probes: list[Probe] | None = None, max_tokens: int = 4096, window: int = 256,
                       batch_size: int = 8) -> ForgettingMeasure:
    """Perplexity on the general text (when given) and probe scores (when given)."""
    out = ForgettingMeasure()
    if general_text is not None:
        text = general_text if isinstance(general_text, GeneralText) else GeneralText(tokenizer, general_text,
                                                                                       max_tokens)
        p = token_perplexity(model, text.ids, window=window, batch_size=batch_size, pad_id=text.pad_id)
        out.general_ppl, out.general_nll, out.general_tokens = p.ppl, p.nll, p.n_tokens
    if probes:
        r = score_probes(model, tokenizer, probes, batch_size=8 * batch_size)
        out.probe_accuracy, out.probe_answer_nll, out.probe_n = r.accuracy, r.answer_nll, r.n
        out.probe_per_category = r.per_category
    return out


@dataclass
class ForgettingDelta:
    """Tuned relative to base: perplexity change in %, probe accuracy change in points."""

    base: ForgettingMeasure
    tuned: ForgettingMeasure

    @property
    def ppl_increase_pct(self) -> float | None:
        if self.base.general_ppl is None or self.tuned.general_ppl is None:
            return None
        return 100.0 * (self.tuned.general_ppl / self.base.general_ppl - 1.0)

    @property
    def probe_change_points(self) -> float | None:
        if self.base.probe_accuracy is None or self.tuned.probe_accuracy is None:
            return None
        return 100.0 * (self.tuned.probe_accuracy - self.base.probe_accuracy)

    def summary(self) -> str:
        parts = []
        if self.ppl_increase_pct is not None:
            parts.append(f"general-text perplexity {self.base.general_ppl:.2f} -> {self.tuned.general_ppl:.2f} "
                         f"({self.ppl_increase_pct:+.1f}%)")
        if self.probe_change_points is not None:
            parts.append(f"knowledge probes {100 * self.base.probe_accuracy:.1f}% -> "
                         f"{100 * self.tuned.probe_accuracy:.1f}% ({self.probe_change_points:+.1f} points, "
                         f"n={self.tuned.probe_n})")
        return "; ".join(parts) or "nothing measured"


class ForgettingCallback(TrainCallback):
    """A ``train(callbacks=...)`` callback: forgetting metrics at each evaluation point and at the end.

    The baseline is the model before the first step (:meth:`on_start`: LoRA's B is still zero, full
    weights untouched), unless ``baseline`` is given. ``action="warn"`` logs a warning (once per
    crossing); ``"stop"`` raises :class:`StopTraining`. Logged keys: ``forget/general_ppl``,
    ``forget/ppl_increase_pct``, ``forget/probe_acc``, ``forget/probe_answer_nll``.
    """

    def __init__(self, tokenizer, general_text: str | Path | None = None, probes: list[Probe] | None = None,
                 n_probes: int | None = 100, max_tokens: int = 2048, threshold_pct: float | None = 10.0,
                 probe_drop_points: float | None = None, action: Literal["warn", "stop"] = "warn",
                 baseline: ForgettingMeasure | None = None):
        if action not in ("warn", "stop"):
            raise ConfigError(f"forgetting action {action!r}: use 'warn' or 'stop'")
        self.tokenizer = tokenizer
        self.text = GeneralText(tokenizer, general_text, max_tokens) if general_text is not None else None
        self.probes = probes if probes is not None else sample_probes(n_probes)
        self.threshold_pct, self.probe_drop_points, self.action = threshold_pct, probe_drop_points, action
        self.baseline = baseline
        self.history: list[tuple[int, ForgettingMeasure]] = []
        self.warnings: list[str] = []

    def measure(self, model: torch.nn.Module) -> ForgettingMeasure:
        return measure_forgetting(model, self.tokenizer, self.text, self.probes)

    def on_start(self, model: torch.nn.Module, run_dir: Path, config: Any) -> None:
        if self.baseline is None:
            self.baseline = self.measure(model)

    def on_eval(self, step: int, model: torch.nn.Module) -> dict[str, float]:
        if self.baseline is None:
            raise TuneforgeError("ForgettingCallback has no baseline: pass it to train(callbacks=...), which "
                                 "measures the model before the first step, or give baseline=")
        now = self.measure(model)
        self.history.append((step, now))
        delta = ForgettingDelta(self.baseline, now)
        out: dict[str, float] = {}
        if now.general_ppl is not None:
            out["forget/general_ppl"] = round(now.general_ppl, 4)
            out["forget/ppl_increase_pct"] = round(delta.ppl_increase_pct, 3)
        if now.probe_accuracy is not None:
            out["forget/probe_acc"] = round(now.probe_accuracy, 4)
            out["forget/probe_answer_nll"] = round(now.probe_answer_nll, 4)
        self._check(step, delta)
        return out

    def _check(self, step: int, delta: ForgettingDelta) -> None:
        reasons = []
        if self.threshold_pct is not None and (inc := delta.ppl_increase_pct) is not None and inc > self.threshold_pct:
            reasons.append(f"general-text perplexity rose {inc:.1f}% (threshold {self.threshold_pct:g}%)")
        if (self.probe_drop_points is not None and (chg := delta.probe_change_points) is not None
                and -chg > self.probe_drop_points):
            reasons.append(f"probe accuracy fell {-chg:.1f} points (threshold {self.probe_drop_points:g})")
        if not reasons:
            return
        msg = (f"forgetting at step {step}: " + "; ".join(reasons) + ". Lower train.lr, train fewer steps, "
               "mix general data into training (replay), or use LoRA with a smaller rank.")
        self.warnings.append(msg)
        if self.action == "stop":
            raise StopTraining(msg)
        logger.warning(msg)


def forgetting_callback(settings: ForgettingSettings, tokenizer) -> ForgettingCallback:
    """The forgetting tracker a run's ``train.forgetting`` settings describe."""
    return ForgettingCallback(tokenizer, general_text=settings.general_text, n_probes=settings.n_probes,
                              max_tokens=settings.max_tokens, threshold_pct=settings.threshold_pct,
                              probe_drop_points=settings.probe_drop_points, action=settings.action)
