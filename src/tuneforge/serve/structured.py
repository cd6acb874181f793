"""Constrained decoding with llguidance: every token the model may pick keeps the answer inside a grammar.

A request's JSON schema (``response_format``) or tool-call grammar is compiled once when the request
arrives, so a schema llguidance cannot compile is a 400 before any token; each row then gets its own
matcher, which the RowSampler asks for the allowed tokens at every step. llguidance is chosen for
install weight and speed: a 3 MB wheel without dependencies, ~0.2 ms per token mask on SmolLM2's
49k vocabulary (docs/adapters-and-serving.md has the measurements).
"""

from __future__ import annotations

import json
import threading

import numpy as np
import torch

from tuneforge.serve.protocol import INSTALL_HINT, APIError, bad_request

# Compact JSON: flexible whitespace would let a weak model fill max_tokens with spaces.
JSON_OPTIONS = {"whitespace_flexible": False}


def _llguidance(param: str):
    try:  # optional dependency
        import llguidance  # optional dependency
        import llguidance.hf  # optional dependency
    except ImportError:
        raise bad_request(f"structured output (response_format, tool_choice 'required' or a named function) needs "
                          f"the 'llguidance' package on the server: {INSTALL_HINT}", param) from None
    return llguidance


def json_grammar(schema: dict) -> str:
    """The llguidance grammar of JSON values that follow ``schema`` (a ``response_format``)."""
    return _llguidance("response_format").LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)


def lark_grammar(lark: str) -> str:
    """An llguidance grammar from Lark text (which may embed ``%json {schema}``): the tool-call format."""
    return _llguidance("tools").LLMatcher.grammar_from_lark(lark)


def json_rule(schema: dict) -> str:
    """A Lark rule body for JSON that follows ``schema``, compact like ``json_grammar``."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS})


class GrammarConstraint:
    """One row's matcher: the allowed next tokens, advanced by each generated token."""

    def __init__(self, matcher) -> None:
        self.matcher = matcher

    def allowed(self, vocab_size: int) -> torch.Tensor:
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), np.uint8), bitorder="little")
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        n = min(vocab_size, len(bits))
        mask[:n] = torch.from_numpy(bits[:n].astype(bool))
        return mask

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self.matcher.get_error()}")


class Grammars:
    """Grammars for one tokenizer, checked and matched against llguidance's view of its vocabulary.

    That view is built on first use: ~0.5 s to read the vocabulary, then ~1.4 s for the token tables of the
    first mask (SmolLM2's 49k tokens), both paid in the first structured request's thread.
    """

    def __init__(self, tokenizer, vocab_size: int, stop_ids: list[int], lock: threading.Lock | None = None) -> None:
        self.tokenizer, self.vocab_size, self.stop_ids = tokenizer, vocab_size, stop_ids
        self._lltok = None
        self._lock = lock or threading.Lock()  # the tokenizer's own lock: fast tokenizers are not thread-safe

    def check(self, grammar: str, param: str) -> str:
        """``grammar`` when llguidance can compile it for this tokenizer; else a 400 naming ``param``, the request
        field the grammar came from ("response_format" or "tools")."""
        error = _llguidance(param).LLMatcher.validate_grammar(grammar, self._tokenizer(param))
        if error:
            raise bad_request(f"cannot constrain decoding to this format: {error}", param)
        return grammar

    def constraint(self, grammar: str, param: str) -> GrammarConstraint:
        """A fresh matcher for one row (a 400 naming ``param`` when it cannot be built)."""
        matcher = _llguidance(param).LLMatcher(self._tokenizer(param), grammar)
        if matcher.is_error():
            raise APIError(400, f"cannot constrain decoding to this format: {matcher.get_error()}", param=param)
        return GrammarConstraint(matcher)

    def _tokenizer(self, param: str):
        with self._lock:
            if self._lltok is None:
                llg = _llguidance(param)
                lltok = llg.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size, eos_token=self.stop_ids)
                # The first mask builds the token tables (see the class docstring): pay it here, in the
                # request's thread, not in the batcher's, where it would stall every row.
                llg.LLMatcher(lltok, json_grammar({"type": "object"})).compute_bitmask()
                self._lltok = lltok
            return self._lltok
