"""The OpenAI wire format: parse and validate request bodies, build responses and stream chunks.

Pure functions over dicts, so every validation rule is testable without a socket.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from tuneforge.data.conversation import Message

# "developer" is OpenAI's newer name for the system role.
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_STOPS = 4  # as OpenAI
SEED_MAX = 1 << 63  # OpenAI's seed is a signed 64-bit integer


class APIError(Exception):
    """An error answered to the client as ``{"error": {...}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


@dataclass
class Sampling:
    """Decoding parameters of one request (shared by all its prompts)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def group_key(self) -> tuple:
        """Requests with equal keys can share one generate call (greedy ones always can)."""
        if self.temperature == 0:
            return (0.0, 1.0, None)
        return (self.temperature, self.top_p, self.seed)


@dataclass
class ParsedRequest:
    """A validated completion request: which model, which prompts, how to decode, how to answer."""

    model: str
    prompts: list[str | list[Message]]
    sampling: Sampling
    stream: bool
    include_usage: bool
    chat: bool


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object; 400 when it is not one."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise bad_request("the request body nests arrays or objects too deeply") from None
    except ValueError as e:  # bad JSON or UTF-8, and integers longer than Python converts
        raise bad_request(f"the request body is not valid JSON ({e})") from e
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


def parse_chat(body: dict, max_tokens_limit: int) -> ParsedRequest:
    """Validate a /v1/chat/completions body."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list of {role, content} objects", "messages")
    parsed = [_message(m, i) for i, m in enumerate(messages)]
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    return ParsedRequest(model=_model(body), prompts=[parsed], chat=True,
                         sampling=_sampling(body, limit, param, max_tokens_limit, default=max_tokens_limit),
                         stream=_bool(body, "stream"), include_usage=_include_usage(body))


def parse_completion(body: dict, max_tokens_limit: int) -> ParsedRequest:
    """Validate a /v1/completions body (``prompt``: a string or a list of strings)."""
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise bad_request("'prompt' must be a string or a non-empty list of strings "
                          "(token-id prompts are not supported)", "prompt")
    if len(prompts) > MAX_PROMPTS:
        raise bad_request(f"'prompt' holds {len(prompts)} prompts; at most {MAX_PROMPTS} per request", "prompt")
    if body.get("echo") or body.get("best_of") not in (None, 1) or body.get("suffix") is not None:
        raise bad_request("'echo', 'best_of' and 'suffix' are not supported")
    # OpenAI's default for /v1/completions is 16 tokens.
    return ParsedRequest(model=_model(body), prompts=prompts, chat=False,
                         sampling=_sampling(body, body.get("max_tokens"), "max_tokens", max_tokens_limit,
                                            default=min(16, max_tokens_limit)),
                         stream=_bool(body, "stream"), include_usage=_include_usage(body))


def _model(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' must name the base model or an adapter (see GET /v1/models)", "model")
    return model


def _message(m: object, i: int) -> Message:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m["role"] not in ROLES:
        raise bad_request(f"messages[{i}] must be an object with a role in {sorted(ROLES)}", "messages")
    content = m.get("content")
    if isinstance(content, list):  # content parts: only text is supported
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise bad_request(f"messages[{i}].content: only text parts are supported", "messages")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise bad_request(f"messages[{i}].content must be a string or a list of text parts", "messages")
    return Message(ROLES[m["role"]], content)


def _sampling(body: dict, limit: object, param: str, max_tokens_limit: int, default: int) -> Sampling:
    if limit is None:
        limit = default
    # bool is an int subclass: `true` is not a token count.
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= max_tokens_limit:
        raise bad_request(f"'{param}' must be an integer from 1 to {max_tokens_limit} (the server's limit), "
                          f"got {_show(limit)}", param)
    if body.get("n", 1) != 1:
        raise bad_request("only n=1 is supported; send several requests instead", "n")
    # An absent temperature means OpenAI's default (1.0, sampling); send temperature=0 for greedy.
    temperature = _number(body, "temperature", 0.0, 2.0, default=1.0)
    top_p = _number(body, "top_p", 0.0, 1.0, default=1.0)
    if top_p == 0:
        raise bad_request("'top_p' must be greater than 0", "top_p")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not -SEED_MAX <= seed < SEED_MAX):
        raise bad_request(f"'seed' must be an integer from {-SEED_MAX} to {SEED_MAX - 1}, got {_show(seed)}", "seed")
    return Sampling(max_tokens=limit, temperature=temperature, top_p=top_p, seed=seed, stop=_stop(body))


def _number(body: dict, key: str, lo: float, hi: float, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, int | float) or isinstance(value, bool) or not lo <= value <= hi:
        raise bad_request(f"'{key}' must be a number from {lo:g} to {hi:g}, got {_show(value)}", key)
    return float(value)


def _show(value: object) -> str:
    """A short form of a client's value for an error message (containers may be huge or deeply nested)."""
    if isinstance(value, list | dict):
        return f"a JSON {'array' if isinstance(value, list) else 'object'}"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOPS
            or not all(isinstance(s, str) and s for s in stops)):
        raise bad_request(f"'stop' must be a non-empty string or a list of at most {MAX_STOPS} of them", "stop")
    return stops


def _bool(body: dict, key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(f"'{key}' must be true or false", key)
    return value


def _include_usage(body: dict) -> bool:
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object", "stream_options")
    return bool(options.get("include_usage"))


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(req: ParsedRequest, rid: str, texts: list[str], finishes: list[str], use: dict) -> dict:
    """The non-streamed answer: ``chat.completion`` or ``text_completion``."""
    created = int(time.time())
    if req.chat:
        choices = [{"index": 0, "message": {"role": "assistant", "content": texts[0]},
                    "logprobs": None, "finish_reason": finishes[0]}]
        return {"id": rid, "object": "chat.completion", "created": created, "model": req.model,
                "choices": choices, "usage": use}
    choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": f}
               for i, (t, f) in enumerate(zip(texts, finishes, strict=True))]
    return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
            "choices": choices, "usage": use}


def chunk_body(req: ParsedRequest, rid: str, index: int, text: str | None, finish: str | None = None,
               first: bool = False) -> dict:
    """One streamed chunk: a text delta of choice ``index``, or its finish reason."""
    created = int(time.time())
    if req.chat:
        delta: dict = {"role": "assistant", "content": ""} if first else {} if text is None else {"content": text}
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                "choices": [choice]}
    choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "text_completion", "created": created, "model": req.model, "choices": [choice]}


def usage_chunk(req: ParsedRequest, rid: str, use: dict) -> dict:
    """The last chunk when ``stream_options.include_usage`` is set: no choices, the usage."""
    kind = "chat.completion.chunk" if req.chat else "text_completion"
    return {"id": rid, "object": kind, "created": int(time.time()), "model": req.model, "choices": [],
            "usage": use}


def model_card(model_id: str, parent: str | None, created: int) -> dict:
    """One /v1/models entry; adapters name the base as ``parent`` (as vLLM does)."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": "tuneforge",
            "root": model_id, "parent": parent}
