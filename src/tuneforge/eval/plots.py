"""PNG charts of evaluation results: variants side by side."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from tuneforge.eval.results import RATE_COLUMNS, EvalReport
from tuneforge.plotting import grouped_bars, pyplot, save_figure


def plot_eval(report: EvalReport, out_png: Path) -> Path | None:
    """Rates (accuracy-type metrics, %) and, when measured, loss per variant."""
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
                                      for v in report.variants}, counts={v.name: v.n for v in report.variants})
        axes[0].set_ylabel("% of records (95% Wilson interval)")
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
    return next((c for c in report.columns if c in RATE_COLUMNS), "loss" if "loss" in report.columns else None)


def plot_per_task(report: EvalReport, out_png: Path) -> Path | None:
    """The primary metric per task and variant (None when there is a single task)."""
    col = primary_column(report)
    if col is None:
        return None
    tasks = sorted({t for v in report.variants for t in v.per_task.get(col, {})})
    if len(tasks) < 2:
        return None
    percent = col != "loss"
    if len(tasks) * max(len(report.variants), 1) > MAX_BARS:
        return per_task_heatmap(report, col, tasks, percent, out_png)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(tasks) * max(len(report.variants), 1) + 2), 4.5))
    grouped_bars(ax, tasks, {v.name: [v.per_task.get(col, {}).get(t, float("nan")) for t in tasks]
                             for v in report.variants}, percent=percent)
    ax.set_ylabel(f"{col} (%)" if percent else col)
    ax.set_title(f"{col} by task", fontsize=10)
    return save_figure(fig, out_png)


# Beyond this many bars a per-task bar chart becomes a strip thousands of pixels wide: draw a heat map.
MAX_BARS = 24


def per_task_heatmap(report: EvalReport, col: str, tasks: list[str], percent: bool, out_png: Path) -> Path:
    """Tasks as rows, variants as columns, the value written in each cell; height grows with the tasks."""
    plt = pyplot()
    names = [v.name for v in report.variants]
    grid = np.array([[v.per_task.get(col, {}).get(t, np.nan) for v in report.variants] for t in tasks], float)
    fig, ax = plt.subplots(figsize=(3 + 1.3 * len(names), 1.2 + 0.28 * len(tasks)))
    im = ax.imshow(grid * (100 if percent else 1), aspect="auto", cmap="viridis" if percent else "viridis_r",
                   vmin=0 if percent else None, vmax=100 if percent else None)
    for i in range(len(tasks)):
        for j in range(len(names)):
            if grid[i, j] == grid[i, j]:
                value = 100 * grid[i, j] if percent else grid[i, j]
                ax.text(j, i, f"{value:.0f}" if percent else f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if (value < 50 if percent else False) else "black")
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_yticks(range(len(tasks)), tasks, fontsize=7)
    ax.xaxis.tick_top()
    fig.colorbar(im, ax=ax, label=f"{col} (%)" if percent else col, shrink=0.6)
    ax.set_title(f"{col} by task ({len(tasks)} tasks)", fontsize=10, pad=20)
    return save_figure(fig, out_png)


def plot_crossover(advice, out_png: Path) -> Path | None:
    """Total cost against request volume: each prompt strategy from 0, the fine-tune from its training cost."""
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
