"""What the lab measures, as data: the settings of a mode, each model state, each run, the whole result."""

from __future__ import annotations

from dataclasses import dataclass, field

from tuneforge.eval.advise import Advice
from tuneforge.eval.forgetting import ForgettingMeasure
from tuneforge.eval.metrics import EvalResult

LAB_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class LabSettings:
    """Sizes of one lab mode (quick: at most 10 minutes on 2 CPU cores; full: at most 45)."""

    steps: int
    steps_random: int
    batch_size: int
    max_seq_len: int
    n_seen: int  # test prompts per trained task type
    n_unseen: int  # test prompts per held-out task type
    n_probes: int
    ppl_tokens: int
    eval_every: int | None
    advise_test: int
    advise_shots: tuple[int, ...]
    advise_steps: int
    lr_full: float = 5e-5
    lr_high: float = 1e-3
    lr_low: float = 1e-7
    lr_lora: float = 1e-3
    replay: float = 0.0  # > 0: one more LoRA run with this share of general-text rows mixed in


QUICK = LabSettings(steps=12, steps_random=6, batch_size=4, max_seq_len=128, n_seen=1, n_unseen=3, n_probes=48,
                    ppl_tokens=512, eval_every=None, advise_test=10, advise_shots=(1, 3), advise_steps=12)
FULL = LabSettings(steps=60, steps_random=30, batch_size=4, max_seq_len=128, n_seen=3, n_unseen=8, n_probes=200,
                   ppl_tokens=2048, eval_every=20, advise_test=20, advise_shots=(1, 3, 5), advise_steps=60,
                   replay=0.25)


@dataclass
class State:
    """What one model state measures: task accuracy (seen/unseen types) and forgetting."""

    seen: EvalResult
    unseen: EvalResult
    forget: ForgettingMeasure


@dataclass
class Run:
    name: str
    method: str
    lr: float
    steps: int
    seconds: float
    trainable: int
    total: int
    losses: list[tuple[int, float]]
    state: State | None = None
    curve: list[dict[str, float]] = field(default_factory=list)  # step, seen_acc, ppl, probe_acc


@dataclass
class LabResult:
    mode: str
    settings: LabSettings
    base: State
    runs: dict[str, Run]
    advice: Advice
    seconds: float
    general_text: str
    model_ref: str = LAB_MODEL
    section_seconds: dict[str, float] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)


def ppl_change(state: State, base: State) -> float:
    return 100 * (state.forget.general_ppl / base.forget.general_ppl - 1)


def trajectory(r: LabResult, name: str) -> list[dict[str, float]]:
    """(step, seen_acc, ppl_inc) along a run: the base at step 0, intermediate points, the final state."""
    run = r.runs[name]
    base_ppl = r.base.forget.general_ppl
    pts = [{"step": 0, "seen_acc": r.base.seen.accuracy, "ppl_inc": 0.0}]
    pts += [{"step": p["step"], "seen_acc": p["seen_acc"], "ppl_inc": 100 * (p["ppl"] / base_ppl - 1)}
            for p in run.curve]
    pts.append({"step": run.steps, "seen_acc": run.state.seen.accuracy, "ppl_inc": ppl_change(run.state, r.base)})
    return pts
