"""PNG charts of evaluation results: variants side by side."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from tuneforge.report.plots import pyplot, save_figure

if TYPE_CHECKING:
    from tuneforge.eval.run import EvalReport


def grouped_bars(ax, groups: list[str], series: dict[str, list[float]], percent: bool = True) -> None:
    """Bars for each series (e.g. model variant) within each group (e.g. metric)."""
    n = max(len(series), 1)
    width = 0.8 / n
    for k, (name, values) in enumerate(series.items()):
        xs = [i - 0.4 + width * (k + 0.5) for i in range(len(groups))]
        vals = [100 * v if percent else v for v in values]
        bars = ax.bar(xs, vals, width, label=name)
        for b, v in zip(bars, vals, strict=True):
            if v == v:  # not NaN
                ax.annotate(f"{v:.0f}" if percent else f"{v:.2f}", (b.get_x() + b.get_width() / 2, v),
                            ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30 if len(groups) > 4 else 0, ha="right" if len(groups) > 4 else "center",
                       fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def plot_eval(report: EvalReport, out_png: Path) -> Path | None:
    """Rates (accuracy-type metrics, %) and, when measured, loss per variant."""
    from tuneforge.eval.run import RATE_COLUMNS

    rates = [c for c in report.columns if c in RATE_COLUMNS]
    has_loss = "loss" in report.columns
    if not rates and not has_loss:
        return None
    plt = pyplot()
    panels = (1 if rates else 0) + (1 if has_loss else 0)
    fig, axes = plt.subplots(1, panels, figsize=(4 + 1.2 * len(rates) + 3 * has_loss, 4),
                             gridspec_kw={"width_ratios": ([max(len(rates), 1)] if rates else []) + ([1] if has_loss
                                                                                                  else [])})
    axes = list(axes) if panels > 1 else [axes]
    if rates:
        grouped_bars(axes[0], rates, {v.name: [v.overall.get(c, float("nan")) for c in rates]
                                      for v in report.variants})
        axes[0].set_ylabel("% of records")
        axes[0].set_ylim(0, 110)
    if has_loss:
        ax = axes[-1]
        grouped_bars(ax, ["loss"], {v.name: [v.overall.get("loss", float("nan"))] for v in report.variants},
                     percent=False)
        ax.set_ylabel("loss per reference token (lower is better)")
    fig.suptitle(f"{Path(report.data).name}: n={report.n}", fontsize=10)
    return save_figure(fig, out_png)


def primary_column(report: EvalReport) -> str | None:
    """The column a per-task chart shows: the first rate measured, else loss."""
    from tuneforge.eval.run import RATE_COLUMNS

    return next((c for c in report.columns if c in RATE_COLUMNS), "loss" if "loss" in report.columns else None)


def plot_per_task(report: EvalReport, out_png: Path) -> Path | None:
    """The primary metric per task and variant (None when there is a single task)."""
    col = primary_column(report)
    if col is None:
        return None
    tasks = sorted({t for v in report.variants for t in v.per_task.get(col, {})})
    if len(tasks) < 2:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(tasks) * max(len(report.variants), 1) + 2), 4.5))
    percent = col != "loss"
    grouped_bars(ax, tasks, {v.name: [v.per_task.get(col, {}).get(t, float("nan")) for t in tasks]
                             for v in report.variants}, percent=percent)
    ax.set_ylabel(f"{col} (%)" if percent else col)
    ax.set_title(f"{col} by task", fontsize=10)
    return save_figure(fig, out_png)


def plot_crossover(advice, out_png: Path) -> Path | None:
    """Total cost against request volume: each prompt strategy from 0, the fine-tune from its training cost."""
    import numpy as np

    plt = pyplot()
    be = advice.break_even_requests
    top = max(1e7, 10 * be) if be else 1e7
    volume = np.logspace(2, math.log10(top), 200)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    for s in advice.strategies:
        total = s.training_cost + volume * s.cost_per_million / 1e6
        style = "-" if s.name == "fine-tune" else "--"
        ax.plot(volume, total, style, lw=2 if s.name in ("fine-tune", advice.best_prompt) else 1,
                label=f"{s.name} ({100 * s.accuracy:.0f}%)")
    if be:
        ax.axvline(be, color="gray", lw=1, ls=":")
        ax.annotate(f"break-even\n{be:,.0f} requests", (be, ax.get_ylim()[1] * 0.5), fontsize=8, ha="left")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("requests")
    ax.set_ylabel("total cost ($): training + requests")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    names = [s.name for s in advice.strategies]
    ax2.bar(names, [100 * s.accuracy for s in advice.strategies], color="tab:blue", alpha=0.8)
    ax2.set_ylabel("accuracy (%)")
    ax2.set_ylim(0, 105)
    ax3 = ax2.twinx()
    ax3.plot(names, [s.prompt_tokens for s in advice.strategies], "o-", color="tab:orange")
    ax3.set_ylabel("prompt tokens per request", color="tab:orange")
    ax2.tick_params(axis="x", rotation=30)
    fig.suptitle(f"prompt or fine-tune: recommendation {advice.recommendation}", fontsize=10)
    return save_figure(fig, out_png)
