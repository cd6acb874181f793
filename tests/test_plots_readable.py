"""Plots stay readable at the edges: one training step, many tasks, short examples, error bars on rates."""

import json

import pytest

import tuneforge.plotting as plotting
from tuneforge.eval.plots import plot_eval, plot_per_task
from tuneforge.eval.results import EvalReport, ModelEval
from tuneforge.plotting import plot_loss, wilson_interval


@pytest.fixture
def figures(monkeypatch):
    """The figures the plotting helpers save, kept open for inspection."""
    saved = []
    real = plotting.save_figure

    def keep(fig, path):
        saved.append(fig)
        fig.canvas.draw()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        return path
    monkeypatch.setattr(plotting, "save_figure", keep)
    yield saved
    plotting.pyplot().close("all")
    monkeypatch.setattr(plotting, "save_figure", real)


def test_wilson_interval():
    lo, hi = wilson_interval(0.0, 10)
    assert lo == 0.0 and 0.27 < hi < 0.29
    lo, hi = wilson_interval(0.8, 115)
    assert 0.71 < lo < 0.8 < hi < 0.87


def test_one_step_loss_plot_shows_a_point(tmp_path, figures):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 1, "loss": 2.5}) + "\n")
    assert plot_loss(metrics, tmp_path / "loss.png").is_file()
    assert figures[0].axes[0].lines[0].get_marker() == "o"


def report(n_tasks: int) -> EvalReport:
    tasks = [f"task_{i:03d}" for i in range(n_tasks)]
    variants = [ModelEval(name=name, overall={"exact_match": 0.5}, per_task={"exact_match": {t: 0.5 for t in tasks}},
                          n=100) for name in ("base", "adapter")]
    return EvalReport(variants=variants, metrics=["exact"], data="d.jsonl", n=100)


def test_many_tasks_make_a_heat_map_not_a_strip(tmp_path, figures, monkeypatch):
    import tuneforge.eval.plots as plots
    monkeypatch.setattr(plots, "save_figure", plotting.save_figure)
    plot_per_task(report(150), tmp_path / "per_task.png")
    width, height = figures[0].get_size_inches() * 110
    assert width < 1200 and figures[0].axes[0].images  # an image (heat map), not 300 bars


def test_rate_bars_have_error_bars(tmp_path, figures, monkeypatch):
    import tuneforge.eval.plots as plots
    monkeypatch.setattr(plots, "save_figure", plotting.save_figure)
    plot_eval(report(2), tmp_path / "eval.png")
    from matplotlib.container import BarContainer
    bars = [c for c in figures[0].axes[0].containers if isinstance(c, BarContainer)]
    assert bars and all(c.errorbar is not None for c in bars)


def test_histogram_scales_to_short_examples(tmp_path, figures, monkeypatch):
    import tuneforge.data.inspect as inspect
    monkeypatch.setattr(inspect, "save_figure", plotting.save_figure)
    inspect._histogram([10, 12, 15, 20], [], 1024, "d.jsonl", tmp_path / "h.png")
    ax = figures[0].axes[0]
    assert ax.get_xlim()[1] < 30 and "max_len 1024" in ax.get_title()
