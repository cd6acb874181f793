"""Run directories made by real tiny training runs, and the dashboard served on a loopback port."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import build_tiny_model, build_tiny_tokenizer
from processes import free_port

WORDS = ["apple", "pear", "dog", "cat", "sun", "moon", "tree", "car", "book", "lamp"]
EVAL = {"data": "test.jsonl", "n": 10, "metrics": ["exact", "normalized"],
        "variants": [{"name": "base", "overall": {"exact": 0.0, "normalized": 0.1}, "per_task": {}},
                     {"name": "adapter", "overall": {"exact": 0.3, "normalized": 0.4}, "per_task": {}}]}


def tiny_run(root: Path, name: str, model_dir: Path, data: Path, *extra: str) -> Path:
    """A real LoRA run of 12 steps on the tiny model."""
    from tuneforge.config import load_config
    from tuneforge.train.loop import train

    cfg = load_config(overrides=[f"model={model_dir}", f"data.train=[{data}]", f"output_dir={root / name}",
                                 "data.max_seq_len=64", "data.val_fraction=0.25", "train.batch_size=2",
                                 "train.threads=1", "train.max_steps=12", "train.eval_every=3", *extra])
    train(cfg, quiet=True)
    return root / name


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory) -> Path:
    """``runs/`` with two finished runs (different learning rates); the first has eval results."""
    tmp = tmp_path_factory.mktemp("ui")
    tok = build_tiny_tokenizer()
    model_dir = tmp / "tiny-model"
    build_tiny_model(len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp / "words.jsonl"
    data.write_text("".join(json.dumps({"instruction": "Upper-case the word.", "input": w, "output": w.upper()}) + "\n"
                            for w in WORDS * 4))
    root = tmp / "runs"
    threads = torch.get_num_threads()
    try:
        first = tiny_run(root, "lr-high", model_dir, data, "train.lr=1e-2")
        tiny_run(root, "lr-low", model_dir, data, "train.lr=1e-3", "method.lora.r=4")
    finally:
        torch.set_num_threads(threads)
    (first / "eval").mkdir()
    (first / "eval" / "results.json").write_text(json.dumps(EVAL))
    (first / "report.md").write_text("# Lab report\n\nThe **loss** fell.\n\n![loss](plots/loss.png)\n\n<b>raw</b>\n")
    return root


@pytest.fixture(scope="session")
def model_dir(runs_root) -> Path:
    """The tiny model the runs trained (a Hugging Face directory)."""
    return runs_root.parent / "tiny-model"


class Served:
    """The dashboard app under uvicorn in a thread; ``url`` while inside ``with``."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Served:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the dashboard did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
