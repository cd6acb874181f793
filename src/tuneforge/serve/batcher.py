"""Collect concurrent requests for a few milliseconds and run them as one multi-adapter generate call.

One thread owns the model. Each batch is one Hugging Face ``generate`` inside ``row_adapters``
(the mechanism of ``adapters.manager.generate_multi``): one forward pass per step for all rows, each
row through its own adapter. A RowSampler picks each row's token by that row's own parameters
(temperature, top-p, seed, penalties, logit bias, grammar), so any requests can share a batch. A
stopping criterion sees every new token of every row, so it streams text deltas (with their
log-probabilities) to the waiting request, stops a row at its own ``max_tokens``, stop token or stop
string, and drops rows whose client went away.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from tuneforge.adapters.manager import AdapterSet
from tuneforge.errors import ModelError
from tuneforge.methods.lora import row_adapters
from tuneforge.models.generate import (
    Choice,
    Constraint,
    RowSampler,
    encode_prompts,
    generate_rows,
    left_pad,
    stop_token_ids,
)
from tuneforge.models.load import pad_token_id
from tuneforge.serve.protocol import APIError, Sampling
from tuneforge.serve.structured import Grammars

log = logging.getLogger("tuneforge.serve")

# Events a job sends to its request's queue: (index, kind, payload). TEXT's payload is
# (text, [Choice of each token behind it, when the job asked for log-probabilities]).
TEXT, DONE, ERROR = "text", "done", "error"


@dataclass
class Job:
    """One prompt to complete; ``sink`` is shared by the prompts of one HTTP request."""

    prompt_ids: list[int]
    adapter: str | None  # None: the base model
    sampling: Sampling
    index: int = 0
    sink: queue.Queue = field(default_factory=queue.Queue)
    constraint: Constraint | None = None  # a grammar the answer must follow
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, kind: str, payload: object) -> None:
        self.sink.put((self.index, kind, payload))


@dataclass
class BatchStats:
    batches: int = 0
    rows: int = 0
    max_rows: int = 0
    mixed: int = 0  # batches whose rows used more than one model (base or adapters)


class RowDecoder:
    """One row's generated ids → text deltas; holds back partial characters and possible stop-string starts."""

    def __init__(self, job: Job, stop_ids: set[int], decode: Callable[[list[int]], str]) -> None:
        self.job, self.stop_ids, self.decode = job, stop_ids, decode
        self.ids: list[int] = []
        self.sent = 0  # characters of text already emitted
        self.text = ""
        self.done = False
        self.choices: list[Choice] = []  # log-probabilities not sent yet
        self._hold = max((len(s) for s in job.sampling.stop), default=1) - 1

    def push(self, token: int, choice: Choice | None = None) -> None:
        if self.done:
            return
        if self.job.cancelled.is_set():
            self.done = True  # nobody is listening
            return
        if token in self.stop_ids:
            self.finish("stop")
            return
        self.ids.append(token)
        if choice is not None:
            self.choices.append(choice)
        self.text = self.decode(self.ids)
        hits = [k for k in (self.text.find(s) for s in self.job.sampling.stop) if k >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.finish("stop")
        elif len(self.ids) >= self.job.sampling.max_tokens:
            self.finish("length")
        else:
            # A trailing U+FFFD is usually half of a multi-byte character whose rest comes next step.
            safe = min(len(self.text) - self._hold, len(self.text.rstrip("\ufffd")))
            self._send(safe)

    def fail(self, error: APIError) -> None:
        """End this row with ``error`` instead of an answer (the other rows of the batch go on)."""
        if not self.done:
            self.done = True
            self.job.emit(ERROR, error)

    def finish(self, reason: str) -> None:
        if self.done:
            return
        self.done = True
        self._send(len(self.text))
        self.job.emit(DONE, (reason, len(self.ids)))

    def _send(self, end: int) -> None:
        if end > self.sent or (self.done and self.choices):
            self.job.emit(TEXT, (self.text[self.sent:end], self.choices))
            self.sent, self.choices = max(end, self.sent), []


class RowStopper(StoppingCriteria):
    """Feeds each step's new tokens (and their Choices) to the rows; a row is finished when its decoder says so."""

    def __init__(self, rows: list[RowDecoder], sampler: RowSampler) -> None:
        self.rows, self.sampler = rows, sampler

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        for i, (row, token) in enumerate(zip(self.rows, input_ids[:, -1].tolist(), strict=True)):
            if i in self.sampler.failed:
                row.fail(APIError(500, f"generation failed: {self.sampler.failed[i]}", "server_error"))
            row.push(token, self.sampler.last[i])
            if row.done:
                self.sampler.finished.add(i)
        return torch.tensor([r.done for r in self.rows], dtype=torch.bool, device=input_ids.device)


class Batcher:
    """A thread that runs queued jobs in batches of up to ``max_batch`` rows, mixing adapters."""

    def __init__(self, adapter_set: AdapterSet, max_batch: int = 8, wait_s: float = 0.005) -> None:
        if adapter_set.tokenizer is None:
            raise ModelError("the server needs an AdapterSet with a tokenizer")
        self.adapter_set, self.max_batch, self.wait_s = adapter_set, max_batch, wait_s
        self.tokenizer = adapter_set.tokenizer
        model = adapter_set.model
        self.stop_ids = stop_token_ids(self.tokenizer, model)
        self.pad_id = pad_token_id(self.tokenizer)
        self.context = getattr(model.config, "max_position_embeddings", None)
        self.vocab_size = model.config.vocab_size  # the logits' width (may exceed the tokenizer's)
        self.stats = BatchStats()
        # Fast tokenizers can fail with "Already borrowed" when used from several threads at once.
        self.tokenizer_lock = threading.Lock()
        self.grammars = Grammars(self.tokenizer, self.vocab_size, self.stop_ids, self.tokenizer_lock)
        self.tools_supported: bool | None = None  # whether the chat template renders tools; found on first use
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def encode(self, prompt, tools: list[dict] | None = None) -> list[int]:
        """Token ids of a chat (message dicts) or raw-text prompt, as ``models.generate`` encodes it."""
        with self.tokenizer_lock:
            return encode_prompts(self.tokenizer, [prompt], tools=tools)[0]

    def decode(self, ids: list[int]) -> str:
        with self.tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def submit(self, jobs: list[Job]) -> None:
        for job in jobs:
            self._queue.put(job)

    def start(self) -> Batcher:
        self._thread = threading.Thread(target=self._loop, name="tuneforge-batcher", daemon=True)
        self._thread.start()
        return self

    @property
    def pending(self) -> int:
        """Jobs queued and not yet taken into a batch."""
        return self._queue.qsize()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join()
        while True:  # whatever was still queued gets an answer
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.emit(ERROR, APIError(503, "the server is shutting down", "server_error"))

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, closing = self._collect(first)
            if batch:
                self._run(batch)
            if closing:
                return

    def _collect(self, first: Job) -> tuple[list[Job], bool]:
        """``first`` plus whatever arrives within ``wait_s``, up to ``max_batch`` jobs."""
        batch, deadline = [first], time.monotonic() + self.wait_s
        while len(batch) < self.max_batch:
            try:
                job = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                break
            if job is None:
                return [j for j in batch if not j.cancelled.is_set()], True
            batch.append(job)
        return [j for j in batch if not j.cancelled.is_set()], False

    def _run(self, jobs: list[Job]) -> None:
        rows: list[RowDecoder] = []
        try:
            with self.adapter_set.lock:  # the registry cannot unload an adapter mid-batch
                loaded = set(self.adapter_set.names)
                for job in jobs:
                    if job.adapter is not None and job.adapter not in loaded:
                        job.emit(ERROR, APIError(404, f"the adapter {job.adapter!r} was unloaded (removed from "
                                                      "the adapters directory)", code="model_not_found"))
                    else:
                        rows.append(RowDecoder(job, set(self.stop_ids), self.decode))
                if rows:
                    self._count(rows)  # before any row is answered, so a client that got its answer sees it
                    self._generate(rows)
            for row in rows:
                row.finish("length")  # rows still open ran into the batch's max_new_tokens
        except Exception as e:  # one failed batch must not kill the thread that serves everyone
            log.exception("generation failed")
            for row in rows:
                row.fail(APIError(500, f"generation failed: {e}", "server_error"))

    def _count(self, rows: list[RowDecoder]) -> None:
        self.stats.batches += 1
        self.stats.rows += len(rows)
        self.stats.max_rows = max(self.stats.max_rows, len(rows))
        self.stats.mixed += len({r.job.adapter for r in rows}) > 1

    def _generate(self, rows: list[RowDecoder]) -> None:
        aset, jobs = self.adapter_set, [r.job for r in rows]
        keys = [None if j.adapter is None else aset.key(j.adapter) for j in jobs]
        input_ids, mask = left_pad([j.prompt_ids for j in jobs], self.pad_id)
        sampler = RowSampler([j.sampling for j in jobs], input_ids.shape[1], [j.constraint for j in jobs])
        aset.unmerge()  # a merged adapter would leak into every row
        with row_adapters(aset.model, keys), torch.no_grad():
            generate_rows(aset.model, input_ids, mask, sampler, max(j.sampling.max_tokens for j in jobs),
                          self.stop_ids, self.pad_id, StoppingCriteriaList([RowStopper(rows, sampler)]))
