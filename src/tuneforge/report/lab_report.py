"""The lab's verdicts and report: each claim, what was measured, and whether it held on this model.

Verdict rules (each is a function below, so the thresholds are in one place and tested):

1. untuned model does not do the tasks: exact match over all test prompts below 30%.
2. SFT from pre-trained vs random init: the pre-trained run's first loss is at least 1 nat lower and
   its final loss is lower. Too-high lr: general-text perplexity rises by more than 10% and more than
   twice the reference run's rise, or knowledge probes fall by 10+ points. Too-low lr: trained-task
   accuracy moves by at most 2 points while the reference run gains 5+ points, or the reference's
   loss falls at least 3x as much (else inconclusive).
3. Instruction tuning: accuracy on never-trained task types rises over the base model; diversity:
   the mixture's rise on them exceeds the single-task run's.
4. LoRA trains < 1% of the parameters at r <= 16 on 7B and 70B shapes (computed; the 135M count is
   checked against the model) and reaches at least the full fine-tune's accuracy minus 10 points.
5. At the same task accuracy, LoRA forgets less (smaller perplexity rise) than full fine-tuning; the
   accuracy is matched by linear interpolation between measured points (base = step 0). When neither
   run gains accuracy over the base, inconclusive.
6. Prompting vs fine-tuning: the fine-tune is at least as accurate as the best prompt and its saving
   per request repays the training at some volume.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from tuneforge.data.builtin_tasks import HELD_OUT_TASKS
from tuneforge.eval.advise import advice_table
from tuneforge.models.shapes import lora_table
from tuneforge.report.lab_plots import write_lab_plots
from tuneforge.report.lab_result import LabResult, Run, State, ppl_change, trajectory
from tuneforge.report.markdown import Document

HOLDS, FAILS, UNSURE = "holds", "does not hold", "inconclusive"


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def probe_change(state: State, base: State) -> float:
    return 100 * (state.forget.probe_accuracy - base.forget.probe_accuracy)


def loss_drop(run: Run) -> float:
    """First loss minus the mean of the last three."""
    losses = [v for _, v in run.losses]
    return losses[0] - sum(losses[-3:]) / len(losses[-3:]) if losses else 0.0


def verdict_untuned(base: State) -> tuple[str, str]:
    n = base.seen.n + base.unseen.n
    acc = (base.seen.accuracy * base.seen.n + base.unseen.accuracy * base.unseen.n) / max(n, 1)
    return (HOLDS if acc < 0.3 else FAILS), f"exact match of the untuned model on {n} task prompts: {pct(acc)}"


def verdict_sft_vs_random(full: Run, random: Run) -> tuple[str, str]:
    k = min(len(full.losses), len(random.losses)) - 1  # compare at the same step
    p0, r0 = full.losses[0][1], random.losses[0][1]
    p1, r1 = full.losses[k][1], random.losses[k][1]
    ok = p0 < r0 - 1.0 and p1 < r1
    return (HOLDS if ok else FAILS), (f"first loss {p0:.2f} (pre-trained) vs {r0:.2f} (random init); at step "
                                      f"{full.losses[k][0]} {p1:.2f} vs {r1:.2f}")


def verdict_high_lr(high: State, ref: State, base: State) -> tuple[str, str]:
    hi, rf = ppl_change(high, base), ppl_change(ref, base)
    probes = probe_change(high, base)
    ok = (hi > 10 and hi > 2 * max(rf, 0.0)) or probes <= -10
    return (HOLDS if ok else FAILS), (f"perplexity change {hi:+.1f}% at the high lr vs {rf:+.1f}% at the reference "
                                      f"lr; knowledge probes {probes:+.1f} points")


def verdict_low_lr(low: Run, ref: Run, base: State) -> tuple[str, str]:
    low_gain = 100 * (low.state.seen.accuracy - base.seen.accuracy)
    ref_gain = 100 * (ref.state.seen.accuracy - base.seen.accuracy)
    text = (f"trained-task accuracy {low_gain:+.1f} points at the low lr vs {ref_gain:+.1f} at the reference; "
            f"loss fell {loss_drop(low):.3f} vs {loss_drop(ref):.3f}")
    if abs(low_gain) > 2:
        return FAILS, text
    if ref_gain >= 5 or loss_drop(ref) >= 3 * max(loss_drop(low), 1e-3):
        return HOLDS, text
    return UNSURE, text + " (the reference run did not move the task either)"


def verdict_unseen(after: State, base: State) -> tuple[str, str]:
    gain = 100 * (after.unseen.accuracy - base.unseen.accuracy)
    return (HOLDS if gain > 0 else FAILS), (f"never-trained task types: {pct(base.unseen.accuracy)} -> "
                                            f"{pct(after.unseen.accuracy)} ({gain:+.1f} points, "
                                            f"n={after.unseen.n})")


def verdict_diversity(mix: State, one: State, base: State) -> tuple[str, str]:
    g_mix = 100 * (mix.unseen.accuracy - base.unseen.accuracy)
    g_one = 100 * (one.unseen.accuracy - base.unseen.accuracy)
    text = f"gain on never-trained task types: mixture {g_mix:+.1f} points, one task type {g_one:+.1f} points"
    if g_mix == g_one:
        return UNSURE, text
    return (HOLDS if g_mix > g_one else FAILS), text


def verdict_lora_share(rows: list[dict], measured: Run) -> tuple[str, str]:
    big = [r for r in rows if r["model"] != "SmolLM2-135M" and r["r"] <= 16]
    ok = all(r["share_pct"] < 1 for r in big)
    return (HOLDS if ok else FAILS), (f"LoRA at r<=16 trains {max(r['share_pct'] for r in big):.2f}% or less of a "
                                      f"7B/70B model; measured on SmolLM2-135M at r=16: {measured.trainable:,} of "
                                      f"{measured.total:,} ({100 * measured.trainable / measured.total:.2f}%)")


def verdict_lora_close(lora: State, full: State) -> tuple[str, str]:
    gap = 100 * (lora.seen.accuracy - full.seen.accuracy)
    return (HOLDS if gap >= -10 else FAILS), (f"trained-task accuracy LoRA {pct(lora.seen.accuracy)} vs full "
                                              f"{pct(full.seen.accuracy)} ({gap:+.1f} points)")


def forgetting_at(points: list[dict[str, float]], acc: float) -> float | None:
    """Perplexity change when the run first reaches ``acc`` (linear between measured points)."""
    for a, b in zip(points, points[1:], strict=False):
        if a["seen_acc"] >= acc:
            return a["ppl_inc"]
        if a["seen_acc"] < acc <= b["seen_acc"]:
            t = (acc - a["seen_acc"]) / (b["seen_acc"] - a["seen_acc"])
            return a["ppl_inc"] + t * (b["ppl_inc"] - a["ppl_inc"])
    return None


def verdict_forgetting(r: LabResult) -> tuple[str, str, float | None, float | None]:
    full, lora = trajectory(r, "full"), trajectory(r, "lora")
    base_acc = r.base.seen.accuracy
    target = min(full[-1]["seen_acc"], lora[-1]["seen_acc"])
    if target <= base_acc:
        return (UNSURE, f"neither run gained trained-task accuracy over the base ({pct(base_acc)}), so forgetting "
                        f"cannot be compared at equal accuracy; at the end: full {full[-1]['ppl_inc']:+.1f}%, "
                        f"LoRA {lora[-1]['ppl_inc']:+.1f}% perplexity change", None, None)
    f_full, f_lora = forgetting_at(full, target), forgetting_at(lora, target)
    text = (f"at {pct(target)} trained-task accuracy: perplexity change full {f_full:+.1f}%, LoRA {f_lora:+.1f}%; "
            f"at the end: full {full[-1]['ppl_inc']:+.1f}% ({pct(full[-1]['seen_acc'])}), LoRA "
            f"{lora[-1]['ppl_inc']:+.1f}% ({pct(lora[-1]['seen_acc'])})")
    return (HOLDS if f_lora < f_full else FAILS), text, f_full, f_lora


def verdict_advise(advice) -> tuple[str, str]:
    ft = advice.strategy("fine-tune")
    best = advice.strategy(advice.best_prompt)
    be = advice.break_even_requests
    ok = ft.accuracy >= best.accuracy and be is not None
    text = (f"fine-tune {pct(ft.accuracy)} with {ft.prompt_tokens:.0f} prompt tokens vs best prompt ({best.name}) "
            f"{pct(best.accuracy)} with {best.prompt_tokens:.0f}; break-even "
            + (f"{be:,.0f} requests" if be is not None else "never") + f"; recommendation: {advice.recommendation}")
    return (HOLDS if ok else FAILS), text


# --- the document -------------------------------------------------------------------------------


def _state_row(name: str, s: State, base: State, run: Run | None = None) -> list[str]:
    return [name, f"{run.lr:g}" if run else "-", f"{run.steps}" if run else "-", pct(s.seen.accuracy),
            pct(s.unseen.accuracy), f"{s.forget.general_ppl:.2f}", f"{ppl_change(s, base):+.1f}%",
            pct(s.forget.probe_accuracy), f"{probe_change(s, base):+.1f}",
            f"{run.seconds:.0f}s" if run else "-"]


def build_document(r: LabResult, out: Path) -> Document:
    plots = write_lab_plots(r, out / "plots")
    s, b = r.settings, r.base
    verdicts: list[tuple[str, str, str, str]] = []  # id, claim, verdict, measured

    def note(vid: str, claim: str, v: tuple[str, str]) -> tuple[str, str]:
        verdicts.append((vid, claim, v[0], v[1]))
        return v

    doc = Document(f"tuneforge lab report ({r.mode} mode)", base=out)
    model = "SmolLM2-135M-Instruct (builtin)" if r.model_ref == "smollm2-135m" else f"`{r.model_ref}`"

    n_types = len(b.seen.per_task)
    doc.paragraph(f"Model {model}, data `builtin:tasks` ({n_types} trained task types, {len(HELD_OUT_TASKS)} never "
                  f"trained: {', '.join(HELD_OUT_TASKS)}). Every number below was measured in "
                  f"this run: {s.steps} optimizer steps per training run, {s.batch_size} rows of {s.max_seq_len} "
                  f"tokens per step, exact-match accuracy (greedy) on {b.seen.n} test prompts of trained types and "
                  f"{b.unseen.n} of never-trained types, forgetting as perplexity on {b.forget.general_tokens} tokens "
                  f"of `{Path(r.general_text).name}` and {b.forget.probe_n} general-knowledge probes (4-way, "
                  f"chance 25%). Total time {r.seconds / 60:.1f} min.")
    rows = [_state_row("base (untuned)", b, b)] + [_state_row(run.name, run.state, b, run)
                                                  for run in r.runs.values() if run.state is not None]
    doc.table(["model", "lr", "steps", "trained types", "unseen types", "general ppl", "ppl change", "probes",
               "probe change", "train time"], rows)

    doc.heading("1. An untuned model does not do these tasks on request")
    v = note("1", "an untuned model does not do the tasks", verdict_untuned(b))
    doc.paragraph("SmolLM2-135M-Instruct is already instruction-tuned in general; the claim is tested as: it does "
                  "not do *these* instructions correctly before fine-tuning.")
    doc.table(["task", "prompt", "answer", "expected"],
              [[x["task"], x["prompt"][:70], x["pred"][:50], x["ref"]] for x in b.seen.samples + b.unseen.samples])
    doc.verdict(*v)

    doc.heading("2. SFT starts far lower than training from scratch; the learning rate decides task gain vs forgetting")
    full, rnd, hi, lo = r.runs["full"], r.runs["random"], r.runs["full_high_lr"], r.runs["full_low_lr"]
    doc.image(plots["loss"], "training loss: pre-trained vs random init")
    v = note("2a", "SFT starts far lower than random init", verdict_sft_vs_random(full, rnd))
    doc.verdict(v[0], "Pre-trained vs random initialization (same architecture, data, lr and steps): " + v[1] + ".")
    doc.image(plots["lr"], "learning rate sweep")
    v = note("2b", "too-high lr destroys general ability", verdict_high_lr(hi.state, full.state, b))
    doc.verdict(v[0], f"Too high (lr {hi.lr:g}) destroys general ability: " + v[1] + ".")
    v = note("2c", "too-low lr barely moves the task", verdict_low_lr(lo, full, b))
    doc.verdict(v[0], f"Too low (lr {lo.lr:g}) barely moves the task: " + v[1] + ".")

    doc.heading("3. Instruction tuning on a mixture carries over to task types never trained on")
    mix, one = r.runs["lora"], r.runs["lora_one_task"]
    doc.image(plots["instruction"], "held-out task types")
    v = note("3a", "a task mixture improves unseen task types", verdict_unseen(mix.state, b))
    doc.verdict(v[0], "LoRA on the 24-type mixture: " + v[1] + ".")
    v = note("3b", "diversity beats more of one task", verdict_diversity(mix.state, one.state, b))
    doc.verdict(v[0], f"Diversity vs more examples of one type (`{one.name}`: the same steps on one task type): "
                + v[1] + ".")
    doc.table(["never-trained type", "base", "mixture", "one task"],
              [[t, pct(b.unseen.per_task.get(t, 0)), pct(mix.state.unseen.per_task.get(t, 0)),
                pct(one.state.unseen.per_task.get(t, 0))] for t in sorted(b.unseen.per_task)])

    doc.heading("4. LoRA trains a tiny share of the parameters and gets close to full fine-tuning")
    table = lora_table()
    doc.table(["model", "parameters", "r", "LoRA parameters (all linear)", "share"],
              [[x["model"], f"{x['total'] / 1e9:.2f}B", x["r"], f"{x['lora'] / 1e6:.1f}M", f"{x['share_pct']:.2f}%"]
               for x in table])
    v = note("4a", "LoRA trains a tiny share of parameters", verdict_lora_share(table, mix))
    doc.verdict(*v)
    doc.image(plots["lora"], "LoRA vs full")
    v = note("4b", "LoRA gets close to full fine-tuning", verdict_lora_close(mix.state, full.state))
    doc.verdict(v[0], f"LoRA (lr {mix.lr:g}) vs full fine-tuning (lr {full.lr:g}), same data and steps: " + v[1] + ".")

    doc.heading("5. Full vs LoRA: forgetting at the same task accuracy")
    doc.image(plots["forgetting"], "forgetting vs accuracy")
    v5 = verdict_forgetting(r)
    note("5", "LoRA forgets less at the same accuracy", v5[:2])
    doc.verdict(v5[0], v5[1] + ("." if s.eval_every else ". Quick mode measures only the start and the end of "
                                "each run, so the matching is a linear interpolation between them."))
    rep = r.runs.get("lora_replay")
    if rep is not None:
        doc.paragraph(f"Mitigation, replay: the LoRA run again with {100 * r.settings.replay:.0f}% general-text rows "
                      f"mixed in (text after the measured prefix): perplexity change "
                      f"{ppl_change(rep.state, b):+.1f}% vs {ppl_change(mix.state, b):+.1f}% without, trained-task "
                      f"accuracy {pct(rep.state.seen.accuracy)} vs {pct(mix.state.seen.accuracy)}, probes "
                      f"{probe_change(rep.state, b):+.1f} vs {probe_change(mix.state, b):+.1f} points. The replayed "
                      "text comes from the file perplexity is measured on (a disjoint part), so a fall in perplexity "
                      "is partly adaptation to that text's domain; the probes are never trained on.")
    else:
        doc.paragraph("Mitigations: a lower learning rate (section 2), LoRA (this section) and replay (general text "
                      "mixed into training, `tuneforge.data.replay.with_replay`; measured in the full mode).")

    doc.heading("6. Prompting vs fine-tuning")
    v = note("6", "fine-tuning beats prompting and pays off at volume", verdict_advise(r.advice))
    doc.paragraph(f"`tuneforge advise` on the builtin task type `upper` ({r.advice.n_test} test requests).")
    doc.table(*advice_table(r.advice))
    doc.bullets(r.advice.reasons)
    doc.image(r.advice.files.get("crossover"), "cost crossover")
    doc.verdict(v[0], v[1] + ".")

    doc.heading("Summary")
    doc.table(["", "claim", "verdict", "measured"], [list(v) for v in verdicts])
    doc.paragraph("Time per section: " + ", ".join(f"{k} {v / 60:.1f} min"
                                                   for k, v in sorted(r.section_seconds.items())) + ".")
    r.files["verdicts"] = json.dumps([{"id": i, "claim": c, "verdict": vv, "measured": t}
                                      for i, c, vv, t in verdicts])
    return doc


def write_lab_report(r: LabResult, out: Path) -> dict[str, str]:
    """report.md, report.html, plots/*.png and lab.json (every number) in ``out``."""
    doc = build_document(r, out)
    md, html = doc.write(out / "report.md")
    data = {"mode": r.mode, "seconds": r.seconds, "settings": asdict(r.settings), "base": _state_dict(r.base),
            "runs": {k: {**{f: getattr(v, f) for f in ("name", "method", "lr", "steps", "seconds", "trainable",
                                                      "total", "losses", "curve")},
                         "state": _state_dict(v.state) if v.state else None} for k, v in r.runs.items()},
            "advice": r.advice.to_dict(), "verdicts": json.loads(r.files.pop("verdicts"))}
    (out / "lab.json").write_text(json.dumps(data, indent=2, default=str))
    r.files.update({"markdown": str(md), "html": str(html), "json": str(out / "lab.json")})
    return r.files


def _state_dict(s: State) -> dict:
    return {"seen": asdict(s.seen), "unseen": asdict(s.unseen), "forget": s.forget.to_dict()}
