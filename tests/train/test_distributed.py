"""Two processes under torchrun (gloo, CPU) against one: same weights, checkpoints that move between them.

One torchrun launch (module fixture) runs every two-process case; the one-process references run in this
process. Tolerances are for fp32 on the CPU: the two runs add the same numbers in a different order.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_tiny_model, build_tiny_tokenizer
from processes import copy_checkpoint, torchrun
from tuneforge.config import load_config
from tuneforge.data.packing import IGNORE, PackedRow
from tuneforge.train import distributed, sharding
from tuneforge.train.loop import train

WORKER = """
import json, sys
from tuneforge.cli import main
from tuneforge.config import load_config
from tuneforge.errors import TuneforgeError
from tuneforge.train import distributed
from tuneforge.train.loop import train

results = {}
for name, spec in json.loads(open(sys.argv[1]).read()).items():
    if spec.get("cli"):  # through the command line, as a user would launch it
        args = ["train"] + [a for o in spec["overrides"] for a in ("--set", o)]
        results[name] = {"exit": main(args)}
        continue
    try:
        r = train(load_config(overrides=spec["overrides"]), resume=spec.get("resume", False), quiet=True)
        results[name] = {"losses": [m["loss"] for m in r.metrics], "grad_norms": [m["grad_norm"] for m in r.metrics],
                         "trained_tokens": r.trained_tokens, "params": [r.trainable, r.total]}
    except TuneforgeError as e:
        results[name] = {"error": f"{type(e).__name__}: {e}"}
if distributed.is_main():
    open(sys.argv[2], "w").write(json.dumps(results))
"""

LORA = ("train.max_steps=4", "train.lr=1e-3", "method.lora.dropout=0", "data.packing=false",
        # 39 rows in micro-batches of 2: the 20th (step 4) has one row, which the two ranks share by labels
        "data.val_fraction=0.025", "train.batch_size=2", "train.grad_accum=5", "train.eval_every=2",
        "train.save_every=2")
CASES = {
    # activation checkpointing on, gradient clipping active (the norm is above 1 at every step)
    "full": ("method.name=full", "train.max_steps=3", "train.lr=1e-3", "train.gradient_checkpointing=on"),
    "lora": LORA,
    "qlora": ("method.name=qlora", "train.max_steps=2", "train.lr=1e-3", "method.lora.dropout=0",
              "train.max_grad_norm=null"),
}


def overrides(root: Path, name: str, *extra: str) -> list[str]:
    return [f"model={root / 'model'}", f"data.train=[{root / 'alpaca.jsonl'}]", f"output_dir={root / name}",
            "data.max_seq_len=64", "data.val_fraction=0", "train.batch_size=4", "train.threads=1", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One-process runs here, then every two-process case in one torchrun launch; returns (root, results)."""
    root = tmp_path_factory.mktemp("dist")
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(len(tokenizer))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    words = ["apple", "pear", "dog", "cat", "sun", "moon", "tree", "car", "book", "lamp"]
    with (root / "alpaca.jsonl").open("w") as f:
        for i in range(40):
            w = words[i % len(words)] + ("s" if i >= 20 else "")
            f.write(json.dumps({"instruction": "Upper-case the word.", "input": w, "output": w.upper()}) + "\n")

    one = {name: train(load_config(overrides=overrides(root, f"one-{name}", *extra)), quiet=True)
           for name, extra in CASES.items()}
    copy_checkpoint(root / "one-lora", root / "resume-in-two")
    specs = {name: {"overrides": overrides(root, f"two-{name}", *extra)} for name, extra in CASES.items()}
    specs["resume-in-two"] = {"overrides": overrides(root, "resume-in-two", *LORA), "resume": True}
    specs["odd-batch"] = {"overrides": overrides(root, "two-odd", "train.batch_size=3")}
    specs["cli"] = {"overrides": overrides(root, "two-cli", "train.max_steps=1"), "cli": True}
    (root / "specs.json").write_text(json.dumps(specs))
    torchrun(WORKER, root, str(root / "specs.json"), str(root / "results.json"))
    return root, one, json.loads((root / "results.json").read_text())


def weights(run: Path) -> dict[str, torch.Tensor]:
    path = run / "model" / "model.safetensors"
    return load_file(str(path if path.is_file() else run / "adapter" / "adapter_model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_end_with_the_weights_of_one(runs, name):
    root, one, two = runs
    assert_same_weights(root / f"one-{name}", root / f"two-{name}")
    before = load_file(str(root / "model" / "model.safetensors"))
    after = weights(root / f"two-{name}")
    if name == "full":  # it trained
        assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])
    else:
        assert any(k.endswith("lora_B.weight") and after[k].abs().max() > 0 for k in after)
    # the logged loss and gradient norm are global, the same as one process's
    assert two[name]["losses"] == pytest.approx([m["loss"] for m in one[name].metrics], abs=2e-5)
    assert two[name]["grad_norms"] == pytest.approx([m["grad_norm"] for m in one[name].metrics], abs=2e-4)
    assert two[name]["trained_tokens"] == one[name].trained_tokens
    assert two[name]["params"] == [one[name].trainable, one[name].total]  # counted on the gathered model
    # rank 0 alone wrote the run directory: one line per step (+ eval lines), no duplicates
    def logged(run: str) -> list[tuple]:
        return [(r["step"], "loss" in r, "val_loss" in r) for r in map(json.loads, (root / run / "metrics.jsonl")
                                                                       .read_text().splitlines())]

    assert logged(f"two-{name}") == logged(f"one-{name}")

    def val_losses(run: str) -> list[float]:  # validation is split over the processes and summed back
        return [r["val_loss"] for r in map(json.loads, (root / run / "metrics.jsonl").read_text().splitlines())
                if "val_loss" in r]

    assert val_losses(f"two-{name}") == pytest.approx(val_losses(f"one-{name}"), abs=2e-5)
    assert (root / f"two-{name}" / "plots" / "loss.png").is_file()


def test_a_checkpoint_of_two_processes_resumes_in_one(runs):
    root, _, _ = runs
    assert (root / "two-lora" / "checkpoints" / "step-2" / "trainable.safetensors").is_file()
    copy_checkpoint(root / "two-lora", root / "resume-in-one")
    train(load_config(overrides=overrides(root, "resume-in-one", *LORA)), resume=True, quiet=True)
    assert_same_weights(root / "one-lora", root / "resume-in-one")


def test_a_checkpoint_of_one_process_resumes_in_two(runs):
    root, one, two = runs
    assert two["resume-in-two"]["losses"] == pytest.approx([m["loss"] for m in one["lora"].metrics][2:], abs=2e-5)
    assert_same_weights(root / "one-lora", root / "resume-in-two")


def test_a_batch_the_processes_cannot_split_is_a_config_error(runs):
    _, _, two = runs
    assert two["odd-batch"]["error"].startswith("ConfigError: train.batch_size=3")
    assert "divisible by the 2 processes" in two["odd-batch"]["error"]


def test_the_cli_trains_under_torchrun(runs):
    root, _, two = runs
    assert two["cli"]["exit"] == 0
    assert (root / "two-cli" / "adapter" / "adapter_model.safetensors").is_file()


def row(labels: list[int]) -> PackedRow:
    n = len(labels)
    return PackedRow(input_ids=list(range(n)), labels=labels, position_ids=list(range(n)), seq_ids=[0] * n,
                     lengths=[n])


def test_local_rows_split_the_global_batch_and_share_a_lone_row_by_labels(monkeypatch):
    rows = [row([IGNORE, i, i]) for i in range(5)]
    monkeypatch.setenv("WORLD_SIZE", "2")
    shares = {}
    for r in (0, 1):
        monkeypatch.setenv("RANK", str(r))
        shares[r] = distributed.local_rows(rows)
    assert shares[0] == rows[0::2] and shares[1] == rows[1::2]

    lone = [row([IGNORE, 7, IGNORE, 8, 9, IGNORE])]
    labels = {}
    for r in (0, 1):
        monkeypatch.setenv("RANK", str(r))
        (mine,) = distributed.local_rows(lone)
        assert mine.input_ids == lone[0].input_ids
        labels[r] = mine.labels
    assert labels[0] == [IGNORE, 7, IGNORE, IGNORE, 9, IGNORE]
    assert labels[1] == [IGNORE, IGNORE, IGNORE, 8, IGNORE, IGNORE]


def test_one_process_passes_everything_through(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    rows = [row([IGNORE, 1])]
    model = torch.nn.Linear(2, 2)
    assert not distributed.is_distributed() and distributed.is_main()
    assert distributed.local_rows(rows) is rows
    assert distributed.all_sum(3) == 3 and sharding.shard_model(model, torch.device("cpu")) is model
    assert distributed.on_main(lambda x: x + 1, 1) == 2

