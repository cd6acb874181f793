"""The OpenAI wire format: parse and validate request bodies, build responses and stream chunks.

Pure functions over dicts, so every validation rule is testable without a socket.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from tuneforge.models.generate import Decoding

# "developer" is OpenAI's newer name for the system role.
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MAX_PROMPTS = 64  # rows (prompts × n) in one request
MAX_STOPS = 4  # as OpenAI
MAX_TOOLS = 128  # as OpenAI
SEED_MAX = 1 << 63  # OpenAI's seed is a signed 64-bit integer
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")  # function and schema names
# The parameters each endpoint acts on; any other one with a non-null value is refused by name.
COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
          "presence_penalty", "frequency_penalty", "logit_bias", "logprobs"}
CHAT_PARAMS = COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
                        "tool_choice", "parallel_tool_calls"}
COMPLETION_PARAMS = COMMON | {"prompt", "echo", "best_of", "suffix"}
INSTALL_HINT = "pip install 'tuneforge[serve]'"


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


@dataclass(kw_only=True)
class Sampling(Decoding):
    """Decoding parameters of one row, with where it ends."""

    max_tokens: int
    stop: list[str] = field(default_factory=list)


@dataclass
class Tools:
    """The request's function tools and how the model may use them (``choice``: auto, required or a name)."""

    functions: list[dict]  # OpenAI's {"name", "description", "parameters"} objects
    choice: str
    parallel: bool = True

    def schemas(self) -> list[dict]:
        """The tool definitions as the chat template receives them."""
        return [{"type": "function", "function": f} for f in self.functions]


@dataclass
class ParsedRequest:
    """A validated completion request: which model, which prompts, how to decode, how to answer."""

    model: str
    prompts: list[str | list[dict]]  # completions: strings; chat: one list of OpenAI message dicts
    sampling: Sampling
    stream: bool
    include_usage: bool
    chat: bool
    n: int = 1
    logprobs: bool = False
    json_schema: dict | None = None  # response_format: the schema every answer must follow
    tools: Tools | None = None


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
    _known(body, CHAT_PARAMS, "/v1/chat/completions")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list of {role, content} objects", "messages")
    parsed = [_message(m, i) for i, m in enumerate(messages)]
    limit = _first(body, "max_completion_tokens", "max_tokens")
    param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    logprobs = _bool(body, "logprobs")
    top = _int(body, "top_logprobs", 0, 20, default=None)
    if top is not None and not logprobs:
        raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    sampling = _sampling(body, limit, param, max_tokens_limit, default=max_tokens_limit,
                         top_logprobs=(top or 0) if logprobs else None)
    tools = _tools(body)
    schema = _response_format(body.get("response_format"))
    if tools is not None and schema is not None:
        raise bad_request("'response_format' and 'tools' cannot be combined (a forced format leaves the model no "
                          "way to call a tool); send one of them, or tool_choice 'none'", "response_format")
    if sampling.stop and (schema is not None or (tools is not None and tools.choice != "auto")):
        raise bad_request("'stop' cannot be combined with a forced format (response_format, or tool_choice "
                          "'required' or a named function): a stop string would cut the JSON", "stop")
    n = _n(body, 1)
    return ParsedRequest(model=_model(body), prompts=[parsed], chat=True, sampling=sampling, n=n,
                         stream=_bool(body, "stream"), include_usage=_include_usage(body), logprobs=logprobs,
                         json_schema=schema, tools=tools)


def parse_completion(body: dict, max_tokens_limit: int) -> ParsedRequest:
    """Validate a /v1/completions body (``prompt``: a string or a list of strings)."""
    _known(body, COMPLETION_PARAMS, "/v1/completions")
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise bad_request("'prompt' must be a string or a non-empty list of strings "
                          "(token-id prompts are not supported)", "prompt")
    for key, fine in (("echo", body.get("echo") in (None, False)), ("best_of", body.get("best_of") in (None, 1)),
                      ("suffix", body.get("suffix") is None)):
        if not fine:
            raise bad_request(f"'{key}' is not supported by this server (leave it out)", key)
    top = _int(body, "logprobs", 0, 5, default=None)  # the legacy API: how many alternatives, at most 5
    # OpenAI's default for /v1/completions is 16 tokens.
    sampling = _sampling(body, body.get("max_tokens"), "max_tokens", max_tokens_limit,
                         default=min(16, max_tokens_limit), top_logprobs=top)
    n = _n(body, len(prompts))
    return ParsedRequest(model=_model(body), prompts=prompts, chat=False, sampling=sampling, n=n,
                         stream=_bool(body, "stream"), include_usage=_include_usage(body), logprobs=top is not None)


def _known(body: dict, params: set[str], route: str) -> None:
    """Refuse, by name, a parameter this server would otherwise ignore (null counts as absent)."""
    unknown = sorted(k for k, v in body.items() if k not in params and v is not None)
    if unknown:
        raise bad_request(f"'{unknown[0]}' is not supported by this server's {route}; leave it out "
                          f"(supported: {', '.join(sorted(params))})", unknown[0])


def _first(body: dict, *keys: str) -> object:
    return next((body[k] for k in keys if body.get(k) is not None), None)


def _model(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' must name the base model or an adapter (see GET /v1/models)", "model")
    return model


def _message(m: object, i: int) -> dict:
    """One OpenAI message as the chat template receives it (tool-call arguments parsed to objects)."""
    where = f"messages[{i}]"
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m["role"] not in ROLES:
        raise bad_request(f"{where} must be an object with a role in {sorted(ROLES)}", "messages")
    allowed = {"role", "content"} | {"assistant": {"tool_calls"}, "tool": {"tool_call_id"}}.get(m["role"], set())
    # Empty fields are what the openai client writes back for an earlier answer (refusal, annotations, audio).
    extra = sorted(k for k, v in m.items() if k not in allowed and v not in (None, "", [], {}))
    if extra:
        raise bad_request(f"{where}.{extra[0]} is not supported for role {m['role']!r}; leave it out", "messages")
    turn: dict = {"role": ROLES[m["role"]], "content": _content(m.get("content"), where)}
    if m.get("tool_calls") is not None:
        turn["tool_calls"] = _history_calls(m["tool_calls"], where)
    elif turn["content"] is None:
        raise bad_request(f"{where}.content must be a string or a list of text parts", "messages")
    if m["role"] == "tool":
        if not isinstance(m.get("tool_call_id"), str):
            raise bad_request(f"{where}.tool_call_id must be the id of the call this message answers", "messages")
        turn["tool_call_id"] = m["tool_call_id"]
    return turn


def _content(content: object, where: str) -> str | None:
    if isinstance(content, list):  # content parts: only text is supported
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise bad_request(f"{where}.content: only text parts are supported", "messages")
        return "".join(p["text"] for p in content)
    if content is not None and not isinstance(content, str):
        raise bad_request(f"{where}.content must be a string or a list of text parts", "messages")
    return content


def _history_calls(calls: object, where: str) -> list[dict]:
    """An assistant message's earlier tool calls, their JSON ``arguments`` decoded for the template."""
    if not isinstance(calls, list) or not calls:
        raise bad_request(f"{where}.tool_calls must be a non-empty list", "messages")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
            raise bad_request(f"{where}.tool_calls[{j}] must be {{id, type: 'function', function: {{name, "
                              "arguments}}}} with arguments a JSON string", "messages")
        try:
            arguments = json.loads(fn["arguments"])
        except ValueError:
            raise bad_request(f"{where}.tool_calls[{j}].function.arguments is not valid JSON", "messages") from None
        out.append({"id": call.get("id"), "type": "function",
                    "function": {"name": fn["name"], "arguments": arguments}})
    return out


def _sampling(body: dict, limit: object, param: str, max_tokens_limit: int, default: int,
              top_logprobs: int | None) -> Sampling:
    if limit is None:
        limit = default
    # bool is an int subclass: `true` is not a token count.
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= max_tokens_limit:
        raise bad_request(f"'{param}' must be an integer from 1 to {max_tokens_limit} (the server's limit), "
                          f"got {_show(limit)}", param)
    # An absent temperature means OpenAI's default (1.0, sampling); send temperature=0 for greedy.
    temperature = _number(body, "temperature", 0.0, 2.0, default=1.0)
    top_p = _number(body, "top_p", 0.0, 1.0, default=1.0)
    if top_p == 0:
        raise bad_request("'top_p' must be greater than 0", "top_p")
    seed = _int(body, "seed", -SEED_MAX, SEED_MAX - 1, default=None)
    return Sampling(max_tokens=limit, temperature=temperature, top_p=top_p, seed=seed, stop=_stop(body),
                    presence_penalty=_number(body, "presence_penalty", -2.0, 2.0, default=0.0),
                    frequency_penalty=_number(body, "frequency_penalty", -2.0, 2.0, default=0.0),
                    logit_bias=_logit_bias(body.get("logit_bias")), top_logprobs=top_logprobs)


def _number(body: dict, key: str, lo: float, hi: float, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, int | float) or isinstance(value, bool) or not lo <= value <= hi:
        raise bad_request(f"'{key}' must be a number from {lo:g} to {hi:g}, got {_show(value)}", key)
    return float(value)


def _int(body: dict, key: str, lo: int, hi: int, default: int | None) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise bad_request(f"'{key}' must be an integer from {lo} to {hi}, got {_show(value)}", key)
    return value


def _n(body: dict, prompts: int) -> int:
    n = _int(body, "n", 1, 128, default=1)
    if n * prompts > MAX_PROMPTS:
        raise bad_request(f"'n' × prompts is {n * prompts}; this server answers at most {MAX_PROMPTS} choices "
                          "per request", "n")
    return n


def _logit_bias(bias: object) -> dict[int, float]:
    if bias is None:
        return {}
    if not isinstance(bias, dict) or len(bias) > 300:
        raise bad_request("'logit_bias' must be an object of at most 300 token ids (as strings) → -100..100",
                          "logit_bias")
    out = {}
    for key, value in bias.items():
        if not key.isdecimal() or isinstance(value, bool) or not isinstance(value, int | float) \
                or not -100 <= value <= 100:
            raise bad_request(f"'logit_bias' maps token ids to numbers from -100 to 100, got {_show(key)}: "
                              f"{_show(value)}", "logit_bias")
        out[int(key)] = float(value)
    return out


def check_token_ids(sampling: Sampling, vocab_size: int) -> None:
    """400 when ``logit_bias`` names a token the model does not have."""
    bad = [t for t in sampling.logit_bias if t >= vocab_size]
    if bad:
        raise bad_request(f"'logit_bias' names token {bad[0]}; the model's token ids go from 0 to "
                          f"{vocab_size - 1}", "logit_bias")


def _response_format(fmt: object) -> dict | None:
    """The JSON schema the answer must follow (``json_object``: any object), or None for free text."""
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind != "json_schema":
        raise bad_request("'response_format' must be {type: text | json_object | json_schema}", "response_format")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not _valid_name(spec.get("name")):
        raise bad_request("'response_format.json_schema' must be an object with a 'name' (a-z, A-Z, 0-9, _ and -, "
                          "at most 64) and a 'schema'", "response_format")
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise bad_request("'response_format.json_schema.schema' must be a JSON Schema object", "response_format")
    return schema


def _valid_name(name: object) -> bool:
    return isinstance(name, str) and 1 <= len(name) <= 64 and set(name) <= NAME_CHARS


def _tools(body: dict) -> Tools | None:
    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if tools is None:
        if choice not in (None, "none") or parallel is not None:
            key = "tool_choice" if choice not in (None, "none") else "parallel_tool_calls"
            raise bad_request(f"'{key}' needs 'tools'", key)
        return None
    if not isinstance(tools, list) or not 1 <= len(tools) <= MAX_TOOLS:
        raise bad_request(f"'tools' must be a list of 1 to {MAX_TOOLS} function tools", "tools")
    functions = [_function(t, i) for i, t in enumerate(tools)]
    names = [f["name"] for f in functions]
    if len(set(names)) < len(names):
        raise bad_request("'tools' names a function twice", "tools")
    if isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or name not in names:
            raise bad_request(f"'tool_choice' must name one of the tools ({', '.join(names)})", "tool_choice")
        choice = name
    elif choice is None:
        choice = "auto"
    elif not isinstance(choice, str) or choice not in ("none", "auto", "required"):
        raise bad_request("'tool_choice' must be 'none', 'auto', 'required' or {type: 'function', function: "
                          "{name}}", "tool_choice")
    if parallel is not None and not isinstance(parallel, bool):
        raise bad_request("'parallel_tool_calls' must be true or false", "parallel_tool_calls")
    return None if choice == "none" else Tools(functions, choice, parallel is not False)


def _function(tool: object, i: int) -> dict:
    fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
    if not isinstance(fn, dict) or not _valid_name(fn.get("name")):
        raise bad_request(f"tools[{i}] must be {{type: 'function', function: {{name, description, parameters}}}} "
                          "with a name of a-z, A-Z, 0-9, _ and - (at most 64)", "tools")
    params = fn.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(params, dict):
        raise bad_request(f"tools[{i}].function.parameters must be a JSON Schema object", "tools")
    if not isinstance(fn.get("description", ""), str):
        raise bad_request(f"tools[{i}].function.description must be a string", "tools")
    return {"name": fn["name"], "description": fn.get("description", ""), "parameters": params}


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
    unknown = sorted(set(options) - {"include_usage"})
    if unknown:
        raise bad_request(f"'stream_options.{unknown[0]}' is not supported by this server", "stream_options")
    if options and not body.get("stream"):
        raise bad_request("'stream_options' needs 'stream': true", "stream_options")
    return bool(options.get("include_usage"))


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass
class Answer:
    """One choice of a response: its text, why it ended, and what goes with it on the wire."""

    text: str = ""
    finish: str = ""
    logprobs: dict | None = None  # in the endpoint's shape (serve/logprobs.py)
    tool_calls: list[dict] = field(default_factory=list)


def completion_body(req: ParsedRequest, rid: str, answers: list[Answer], use: dict) -> dict:
    """The non-streamed answer: ``chat.completion`` or ``text_completion``."""
    created = int(time.time())
    if req.chat:
        choices = [{"index": i, "message": _chat_message(a), "logprobs": a.logprobs, "finish_reason": a.finish}
                   for i, a in enumerate(answers)]
        return {"id": rid, "object": "chat.completion", "created": created, "model": req.model,
                "choices": choices, "usage": use}
    choices = [{"index": i, "text": a.text, "logprobs": a.logprobs, "finish_reason": a.finish}
               for i, a in enumerate(answers)]
    return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
            "choices": choices, "usage": use}


def _chat_message(a: Answer) -> dict:
    if not a.tool_calls:
        return {"role": "assistant", "content": a.text}
    return {"role": "assistant", "content": a.text or None, "tool_calls": a.tool_calls}


def chunk_body(req: ParsedRequest, rid: str, index: int, text: str | None, finish: str | None = None,
               first: bool = False, logprobs: dict | None = None, tool_calls: list[dict] | None = None) -> dict:
    """One streamed chunk: a text delta of choice ``index`` (with its tokens' logprobs or tool calls), or its
    finish reason."""
    created = int(time.time())
    if req.chat:
        delta: dict = {"role": "assistant", "content": ""} if first else {} if text is None else {"content": text}
        if tool_calls:
            delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(tool_calls)]
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                "choices": [choice]}
    choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
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
