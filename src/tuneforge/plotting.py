"""Shared plotting helpers: a file-only pyplot, saving a figure, bar charts, and the training-loss curve.

A leaf module (it imports nothing else from tuneforge), so training, evaluation and the reports can
all draw with it. Domain plots (evaluation variants, the lab's claims) live with their packages.
"""

from __future__ import annotations

import json
from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    # start-up time: matplotlib takes ~0.5 s to import, and only commands that draw need it
    import matplotlib

    matplotlib.use("Agg")
    # start-up time: see above (pyplot must be imported after the backend is chosen)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Lay out, write as PNG (creating folders) and close a figure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def wilson_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion ``p`` measured on ``n`` records (sound at 0% and 100%)."""
    if n <= 0 or p != p:
        return float("nan"), float("nan")
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def grouped_bars(ax, groups: list[str], series: dict[str, list[float]], percent: bool = True,
                 counts: dict[str, int] | None = None) -> None:
    """Bars for each series (e.g. model variant) within each group (e.g. metric); with ``counts`` (records per
    series), rates get 95% Wilson error bars."""
    n = max(len(series), 1)
    width = 0.8 / n
    for k, (name, values) in enumerate(series.items()):
        xs = [i - 0.4 + width * (k + 0.5) for i in range(len(groups))]
        vals = [100 * v if percent else v for v in values]
        yerr = None
        if counts and percent and counts.get(name):
            ci = [wilson_interval(v, counts[name]) for v in values]
            yerr = [[max(0.0, 100 * (v - lo)) for v, (lo, _) in zip(values, ci, strict=True)],
                    [max(0.0, 100 * (hi - v)) for v, (_, hi) in zip(values, ci, strict=True)]]
        bars = ax.bar(xs, vals, width, label=name, yerr=yerr, capsize=3 if yerr else 0,
                      error_kw={"elinewidth": 0.8, "ecolor": "black"})
        for b, v in zip(bars, vals, strict=True):
            if v == v:  # not NaN
                ax.annotate(f"{v:.0f}" if percent else f"{v:.2f}", (b.get_x() + b.get_width() / 2, v),
                            ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30 if len(groups) > 4 else 0, ha="right" if len(groups) > 4 else "center",
                       fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def labelled_bars(ax, labels: list[str], values: list[float], ylabel: str, fmt: str = "{:.0f}") -> None:
    """One bar per label, each annotated with its value; a zero line for signed changes."""
    bars = ax.bar(labels, values, color=["tab:gray", "tab:blue", "tab:orange", "tab:green", "tab:red"][:len(values)])
    for b, v in zip(bars, values, strict=True):
        ax.annotate(fmt.format(v), (b.get_x() + b.get_width() / 2, v), ha="center",
                    va="bottom" if v >= 0 else "top", fontsize=8)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.tick_params(axis="x", labelsize=8, rotation=15)
    ax.grid(axis="y", alpha=0.3)
    ax.axhline(0, color="black", lw=0.6)


def plot_loss(metrics_path: Path, out_png: Path) -> Path | None:
    """Training loss (and validation loss where measured) against step; None if nothing to plot."""
    rows = [json.loads(x) for x in Path(metrics_path).read_text().splitlines() if x.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train:
        return None
    fig, ax = pyplot().subplots(figsize=(7, 4))
    # markers while points are few: a 1-step run's single point would be an invisible line otherwise
    ax.plot(*zip(*train, strict=True), label="train loss", lw=1.2, marker="o" if len(train) <= 30 else None, ms=4)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per trained token)")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, out_png)
