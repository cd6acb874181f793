"""The batcher against a tiny model: rows of one batch fail alone."""

import queue

import torch

from tuneforge.adapters.manager import AdapterSet
from tuneforge.serve.batcher import DONE, ERROR, TEXT, Batcher, Job
from tuneforge.serve.protocol import Sampling


class RefusesThird:
    """A grammar that accepts any two tokens, then refuses the third (as llguidance does on a bad state)."""

    def __init__(self):
        self.taken = 0

    def allowed(self, vocab_size):
        return torch.ones(vocab_size, dtype=torch.bool)

    def advance(self, token):
        self.taken += 1
        if self.taken == 3:
            raise RuntimeError(f"the grammar refused token {token}: bad state")


def answer(job: Job) -> tuple[str, object]:
    """(kind, payload) of the job's last event: DONE with (reason, tokens) or ERROR with the APIError."""
    while True:
        _, kind, payload = job.sink.get(timeout=60)
        if kind != TEXT:
            return kind, payload


def test_a_failing_grammar_fails_only_its_job(tiny_model, tiny_tokenizer):
    batcher = Batcher(AdapterSet(tiny_model, tiny_tokenizer), max_batch=2, wait_s=5.0).start()
    try:
        prompt = batcher.encode("Hello world.")
        good = Job(prompt, None, Sampling(max_tokens=6, top_logprobs=0), sink=queue.Queue())
        bad = Job(prompt, None, Sampling(max_tokens=6), sink=queue.Queue(), constraint=RefusesThird())
        batcher.submit([good, bad])
        kind, error = answer(bad)
        assert kind == ERROR and error.status == 500 and "the grammar refused token" in error.message
        kind, (reason, _) = answer(good)
        assert kind == DONE and reason in ("stop", "length")
        assert batcher.stats.batches == 1 and batcher.stats.max_rows == 2  # they shared one generate call
    finally:
        batcher.close()
