"""A validated request → the batcher's jobs: template checks for tools, grammars, one job per choice."""

from __future__ import annotations

import dataclasses
import queue

from tuneforge.models.generate import chat_template, supports_tools
from tuneforge.serve.batcher import Batcher, Job
from tuneforge.serve.protocol import ParsedRequest, check_token_ids
from tuneforge.serve.structured import json_grammar
from tuneforge.serve.tools import call_grammar, check_template


def check_tools(req: ParsedRequest, batcher: Batcher) -> None:
    """400 when the request needs tool support (tools, tool messages, earlier calls) the template lacks."""
    why = "the request has 'tools'" if req.tools is not None else None
    for i, turn in enumerate(req.prompts[0] if req.chat else []):
        if why is None and (turn["role"] == "tool" or "tool_calls" in turn):
            why = f"messages[{i}] is a tool {'result' if turn['role'] == 'tool' else 'call'}"
    if why is not None:
        tokenizer = batcher.tokenizer
        if batcher.tools_supported is None:
            with batcher.tokenizer_lock:
                batcher.tools_supported = supports_tools(tokenizer)
        check_template(chat_template(tokenizer), batcher.tools_supported, why)


def grammar(req: ParsedRequest, batcher: Batcher) -> tuple[str, str] | None:
    """(grammar, the request field it came from) that every choice follows: response_format, or the tools
    under tool_choice required/named."""
    if req.json_schema is not None:
        return batcher.grammars.check(json_grammar(req.json_schema), "response_format"), "response_format"
    if req.tools is not None:
        found = call_grammar(req.tools)
        return None if found is None else (batcher.grammars.check(found, "tools"), "tools")
    return None


def make_jobs(req: ParsedRequest, ids: list[list[int]], adapter: str | None, sink: queue.Queue,
              batcher: Batcher) -> list[Job]:
    """``n`` jobs per prompt; choice ``p * n + j`` is seeded by ``seed + j``, so choices of one request differ."""
    check_token_ids(req.sampling, batcher.vocab_size)
    rules = grammar(req, batcher)
    jobs = []
    for p, prompt_ids in enumerate(ids):
        for j in range(req.n):
            seed = None if req.sampling.seed is None else req.sampling.seed + j
            constraint = None if rules is None else batcher.grammars.constraint(*rules)
            jobs.append(Job(prompt_ids, adapter, dataclasses.replace(req.sampling, seed=seed), p * req.n + j, sink,
                            constraint=constraint))
    return jobs
