"""PNG plots of the lab report."""

from __future__ import annotations

from pathlib import Path

from tuneforge.plotting import labelled_bars, pyplot, save_figure
from tuneforge.report.lab_result import LabResult, trajectory


def plot_loss_curves(r: LabResult, path: Path) -> Path:
    """Training loss per step: pre-trained vs random init (same recipe), plus the learning-rate variants."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    styles = {"full": ("pre-trained, lr {lr:g}", "-", 2.0), "random": ("random init, lr {lr:g}", "-", 2.0),
              "full_high_lr": ("pre-trained, lr {lr:g} (too high)", "--", 1.0),
              "full_low_lr": ("pre-trained, lr {lr:g} (too low)", ":", 1.2)}
    for name, (label, ls, lw) in styles.items():
        run = r.runs.get(name)
        if run and run.losses:
            ax.plot(*zip(*run.losses, strict=True), ls, lw=lw, label=label.format(lr=run.lr))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (per answer token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title("full fine-tuning on builtin:tasks", fontsize=10)
    return save_figure(fig, path)


def plot_lr_sweep(r: LabResult, path: Path) -> Path:
    """Task accuracy, perplexity change and probe change for base and the three learning rates."""
    plt = pyplot()
    names = [("full_low_lr", "too low"), ("full", "reference"), ("full_high_lr", "too high")]
    runs = [(label + f"\n{r.runs[n].lr:g}", r.runs[n].state) for n, label in names]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.8))
    labelled_bars(axes[0], ["base"] + [n for n, _ in runs], [100 * r.base.seen.accuracy] + [100 * s.seen.accuracy
                                                                                  for _, s in runs],
          "task accuracy, trained types (%)")
    base_ppl = r.base.forget.general_ppl
    labelled_bars(axes[1], [n for n, _ in runs], [100 * (s.forget.general_ppl / base_ppl - 1) for _, s in runs],
          "general-text perplexity change (%)", "{:+.1f}")
    labelled_bars(axes[2], [n for n, _ in runs], [100 * (s.forget.probe_accuracy - r.base.forget.probe_accuracy)
                                         for _, s in runs], "knowledge-probe change (points)", "{:+.1f}")
    fig.suptitle("learning rate: task gain vs forgetting (full fine-tuning)", fontsize=10)
    return save_figure(fig, path)


def plot_instruction_tuning(r: LabResult, path: Path) -> Path:
    """Accuracy on held-out (never trained) task types: base, LoRA on the mixture, LoRA on one task."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    states = [("base", r.base), ("mixture", r.runs["lora"].state), ("one task", r.runs["lora_one_task"].state)]
    labelled_bars(axes[0], [n for n, _ in states], [100 * s.unseen.accuracy for _, s in states],
          "accuracy on unseen task types (%)")
    labelled_bars(axes[1], [n for n, _ in states], [100 * s.seen.accuracy for _, s in states],
          "accuracy on trained task types (%)")
    fig.suptitle("instruction tuning (LoRA): task mixture vs the same steps on one task type", fontsize=10)
    return save_figure(fig, path)


def plot_forgetting_vs_accuracy(r: LabResult, path: Path) -> Path:
    """Forgetting (perplexity change) against task accuracy along each run, full vs LoRA."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, label in (("full", "full fine-tune"), ("lora", "LoRA r=16")):
        pts = trajectory(r, name)
        axes[0].plot([100 * p["seen_acc"] for p in pts], [p["ppl_inc"] for p in pts], "o-", label=label)
        axes[1].plot([p["step"] for p in pts], [p["ppl_inc"] for p in pts], "o-", label=f"{label}: ppl change")
        axes[1].plot([p["step"] for p in pts], [100 * p["seen_acc"] for p in pts], "s--", alpha=0.6,
                     label=f"{label}: task accuracy")
    axes[0].set_xlabel("task accuracy, trained types (%)")
    axes[0].set_ylabel("general-text perplexity change (%)")
    axes[0].set_title("forgetting at a given task accuracy", fontsize=10)
    axes[1].set_xlabel("optimizer step")
    axes[1].set_ylabel("% (perplexity change / accuracy)")
    axes[1].set_title("task metric and forgetting over steps", fontsize=10)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_lora_vs_full(r: LabResult, path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.6))
    full, lora = r.runs["full"], r.runs["lora"]
    labelled_bars(axes[0], ["base", "full", "LoRA"], [100 * r.base.seen.accuracy, 100 * full.state.seen.accuracy,
                                             100 * lora.state.seen.accuracy], "task accuracy, trained types (%)")
    labelled_bars(axes[1], ["full", "LoRA"], [100 * full.trainable / full.total, 100 * lora.trainable / lora.total],
          "trainable parameters (%)", "{:.2f}")
    fig.suptitle("LoRA vs full fine-tuning (same data, steps and rows)", fontsize=10)
    return save_figure(fig, path)


def write_lab_plots(r: LabResult, plots: Path) -> dict[str, Path]:
    return {"loss": plot_loss_curves(r, plots / "sft_vs_random.png"),
            "lr": plot_lr_sweep(r, plots / "learning_rate.png"),
            "instruction": plot_instruction_tuning(r, plots / "instruction_tuning.png"),
            "lora": plot_lora_vs_full(r, plots / "lora_vs_full.png"),
            "forgetting": plot_forgetting_vs_accuracy(r, plots / "forgetting.png")}
