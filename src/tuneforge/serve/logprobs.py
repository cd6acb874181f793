"""Token log-probabilities in OpenAI's two shapes: chat's ``content[]`` and the legacy completions one.

A token's text is its exact bytes: byte-level BPE tokens map back through GPT-2's byte alphabet,
SentencePiece byte tokens (``<0x0A>``) are that byte; a token that is part of a character shows as
``\\xNN`` escapes, as OpenAI shows it, and ``bytes`` gives the raw values.
"""

from __future__ import annotations

import re
from functools import lru_cache

from tuneforge.models.generate import Choice

BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class TokenBytes:
    """Token id → its bytes, for one tokenizer (cached)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self.byte_level = type(decoder).__name__ == "ByteLevel"
        self._cache: dict[int, bytes] = {}

    def __call__(self, token: int) -> bytes:
        if token not in self._cache:
            self._cache[token] = self._bytes(token)
        return self._cache[token]

    def _bytes(self, token: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token)
        if piece is None:
            return b""
        if token in self.tokenizer.all_special_ids:
            return piece.encode()
        alphabet = _byte_alphabet()
        if self.byte_level and all(c in alphabet for c in piece):
            return bytes(alphabet[c] for c in piece)
        byte = BYTE_TOKEN.fullmatch(piece)
        if byte:
            return bytes([int(byte.group(1), 16)])
        return piece.replace("\u2581", " ").encode()  # SentencePiece's word-start mark is a space

    def text(self, token: int) -> str:
        return self(token).decode("utf-8", errors="backslashreplace")


def chat_logprobs(choices: list[Choice], tokens: TokenBytes) -> dict:
    """``choices[].logprobs`` of a chat answer (or of one streamed chunk)."""
    def entry(token: int, logprob: float) -> dict:
        return {"token": tokens.text(token), "logprob": logprob, "bytes": list(tokens(token))}

    return {"content": [{**entry(c.token, c.logprob), "top_logprobs": [entry(t, lp) for t, lp in c.top]}
                        for c in choices], "refusal": None}


def completion_logprobs(choices: list[Choice], tokens: TokenBytes, before: bytes = b"") -> tuple[dict, bytes]:
    """``choices[].logprobs`` of /v1/completions and the answer's bytes so far (``before`` plus these tokens').

    ``text_offset`` is where each token starts in the answer's text, in characters; a token that
    continues a character points at that character's start.
    """
    offsets = []
    for c in choices:
        offsets.append(len(before.decode("utf-8", errors="ignore")))
        before += tokens(c.token)
    wire = {"tokens": [tokens.text(c.token) for c in choices], "token_logprobs": [c.logprob for c in choices],
            "top_logprobs": [{tokens.text(t): lp for t, lp in c.top} for c in choices], "text_offset": offsets}
    return wire, before
