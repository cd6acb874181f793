import json

import pytest

from tuneforge.report.lab import run_lab
from tuneforge.report.lab_result import LabSettings

TINY = LabSettings(steps=3, steps_random=3, batch_size=2, max_seq_len=128, n_seen=1, n_unseen=1, n_probes=12,
                   ppl_tokens=64, eval_every=2, advise_test=4, advise_shots=(1, 2), advise_steps=2, lr_full=1e-3,
                   lr_high=5e-2, lr_low=1e-7, lr_lora=1e-2, replay=0.5)


@pytest.fixture
def general(tmp_path):
    path = tmp_path / "general.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. Hello world. " * 40)
    return path


def test_lab_end_to_end_on_a_tiny_model(tiny_model_dir, tmp_path, general):
    out = tmp_path / "lab"
    result = run_lab(out, model_ref=str(tiny_model_dir), general_text=general, threads=1, settings=TINY,
                     log=lambda *a: None)
    assert set(result.runs) == {"full", "random", "full_high_lr", "full_low_lr", "lora", "lora_one_task",
                                "lora_replay"}
    assert [s for s, _ in result.runs["full"].losses] == [1, 2, 3]
    assert [p["step"] for p in result.runs["full"].curve] == [2]  # intermediate point; the end is measured apart
    md = (out / "report.md").read_text()
    for n in range(1, 7):
        assert f"## {n}." in md
    assert md.count("**Verdict: ") == 10 and "| 2b | too-high lr" in md
    html = (out / "report.html").read_text()
    assert "Mitigation, replay" in md
    assert html.startswith("<!doctype html>") and html.count("<img ") >= 6
    for png in ("sft_vs_random", "learning_rate", "instruction_tuning", "lora_vs_full", "forgetting"):
        assert (out / "plots" / f"{png}.png").stat().st_size > 0
    data = json.loads((out / "lab.json").read_text())
    assert len(data["verdicts"]) == 10
    assert {v["verdict"] for v in data["verdicts"]} <= {"holds", "does not hold", "inconclusive"}
    # the random-init run starts near log(vocab); the pre-trained tiny model is random too, so both start high
    assert data["runs"]["random"]["losses"][0][1] > 4
