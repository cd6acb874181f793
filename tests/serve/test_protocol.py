"""Request validation and text streaming rules, without a socket or a model."""

import pytest

from tuneforge.serve.batcher import DONE, TEXT, Job, RowDecoder
from tuneforge.serve.protocol import APIError, Sampling, parse_chat, parse_completion, parse_json
from tuneforge.serve.registry import check_name


def chat(**extra):
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}


def test_chat_parsing_defaults_and_roles():
    req = parse_chat(chat(messages=[{"role": "developer", "content": "be brief"},
                                    {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                 {"type": "text", "text": "b"}]}]), 32)
    assert req.prompts[0] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]
    assert (req.sampling.max_tokens, req.sampling.temperature, req.stream) == (32, 1.0, False)
    assert parse_chat(chat(max_completion_tokens=5), 32).sampling.max_tokens == 5
    assert parse_completion({"model": "m", "prompt": "x"}, 512).sampling.max_tokens == 16  # OpenAI's default


@pytest.mark.parametrize("extra, param", [
    ({"max_tokens": True}, "max_tokens"), ({"max_tokens": 33}, "max_tokens"), ({"max_tokens": "4"}, "max_tokens"),
    ({"n": 0}, "n"), ({"n": 65}, "n"), ({"temperature": 2.5}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": [""]}, "stop"), ({"stream": "yes"}, "stream"),
    ({"model": ""}, "model"), ({"messages": []}, "messages"), ({"seed": 1.5}, "seed"),
])
def test_chat_rejects(extra, param):
    with pytest.raises(APIError) as e:
        parse_chat(chat(**extra), 32)
    assert (e.value.status, e.value.param) == (400, param)


def test_completion_rejects_token_prompts_and_bad_json():
    for prompt in ([1, 2, 3], [], None, ["ok", 3]):
        with pytest.raises(APIError, match="'prompt'"):
            parse_completion({"model": "m", "prompt": prompt}, 32)
    for raw in (b"{", b"\xff", b"3"):
        with pytest.raises(APIError):
            parse_json(raw)


def test_adapter_names_are_plain_folder_names():
    assert check_name("my-adapter_v2.1") == "my-adapter_v2.1"
    for bad in ("", "..", "../x", "a/b", "a\\b", ".git", "x\0y", "a" * 256):
        with pytest.raises(APIError):
            check_name(bad)


def events(job: Job) -> list:
    """(kind, payload) events, a TEXT payload without its (empty) Choice list."""
    out = []
    while not job.sink.empty():
        _, kind, payload = job.sink.get()
        out.append((kind, payload[0] if kind == TEXT else payload))
    return out


def test_stop_string_split_across_tokens_is_never_sent():
    pieces = {1: "Hel", 2: "lo E", 3: "N", 4: "D more"}
    job = Job([0], None, Sampling(max_tokens=10, stop=["END"]))
    row = RowDecoder(job, {99}, lambda ids: "".join(pieces[i] for i in ids))
    for token in (1, 2, 3, 4):
        row.push(token)
    assert row.done
    got = events(job)
    assert "".join(p for k, p in got if k == TEXT) == "Hello "
    assert got[-1] == (DONE, ("stop", 4))


def test_partial_characters_wait_and_limits_finish():
    # Tokens 2 and 3 are the two bytes of "é": token 2 alone decodes to a replacement character.
    job = Job([0], None, Sampling(max_tokens=3))
    row = RowDecoder(job, {99}, lambda ids: "a" + ("é" if 3 in ids else "\ufffd" if 2 in ids else ""))
    row.push(1)
    row.push(2)
    assert events(job) == [(TEXT, "a")]  # the replacement character is held back
    row.push(3)
    assert events(job) == [(TEXT, "é"), (DONE, ("length", 3))]

    job = Job([0], None, Sampling(max_tokens=3))
    row = RowDecoder(job, {99}, lambda ids: "x" * len(ids))
    row.push(5)
    row.push(99)  # a stop token ends the row and is not counted
    assert events(job) == [(TEXT, "x"), (DONE, ("stop", 1))]


@pytest.mark.parametrize("extra, param", [
    ({"temperature": -0.1}, "temperature"), ({"top_p": 1.5}, "top_p"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"presence_penalty": -2.01}, "presence_penalty"),
    ({"frequency_penalty": 3}, "frequency_penalty"), ({"frequency_penalty": "1"}, "frequency_penalty"),
    ({"n": 129}, "n"), ({"n": 1.0}, "n"), ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"logit_bias": {"5": 101}}, "logit_bias"), ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": [1]}, "logit_bias"), ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": 1}, "logprobs"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
    ({"tools": []}, "tools"), ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "maybe"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "response_format": {"type": "json_object"}}, "response_format"),
    ({"parallel_tool_calls": False}, "parallel_tool_calls"),
    ({"stop": "}", "response_format": {"type": "json_object"}}, "stop"),
    ({"stop": "x", "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"}, "stop"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": "f"}},
     "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function":
                                                                                    {"name": ["f"]}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": ["auto"]}, "tool_choice"),
    ({"tools": [{"type": "function", "function": "f"}]}, "tools"), ({"tools": ["f"]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "description": 3}}]}, "tools"),
    ({"user": "u1"}, "user"), ({"functions": [{"name": "f"}]}, "functions"), ({"store": True}, "store"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x", "name": "ann"}]}, "messages"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{"}}]}]}, "messages"),
])
def test_chat_range_checks_name_the_parameter(extra, param):
    with pytest.raises(APIError) as e:
        parse_chat(chat(**extra), 32)
    assert (e.value.status, e.value.param) == (400, param)


@pytest.mark.parametrize("extra, param", [
    ({"logprobs": 6}, "logprobs"), ({"logprobs": True}, "logprobs"), ({"echo": True}, "echo"),
    ({"best_of": 2}, "best_of"), ({"suffix": "x"}, "suffix"), ({"response_format": {"type": "json_object"}},
                                                                 "response_format"),
    ({"n": 40, "prompt": ["a", "b"]}, "n"), ({"top_logprobs": 2}, "top_logprobs"),
])
def test_completion_range_checks_name_the_parameter(extra, param):
    with pytest.raises(APIError) as e:
        parse_completion({"model": "m", "prompt": "x", **extra}, 32)
    assert (e.value.status, e.value.param) == (400, param)


def test_accepted_parameters_reach_the_sampler():
    req = parse_chat(chat(temperature=0.5, top_p=0.9, presence_penalty=-1, frequency_penalty=1.5, seed=-3, n=3,
                          logit_bias={"7": -100, "9": 2.5}, logprobs=True, top_logprobs=4,
                          user=None, response_format={"type": "json_schema",
                                                      "json_schema": {"name": "p", "schema": {"type": "array"}}}), 32)
    s = req.sampling
    assert (s.temperature, s.top_p, s.presence_penalty, s.frequency_penalty, s.seed) == (0.5, 0.9, -1.0, 1.5, -3)
    assert parse_chat(chat(stop="x"), 32).sampling.stop == ["x"]
    assert (s.logit_bias, s.top_logprobs, req.n, req.logprobs, req.json_schema) == (
        {7: -100.0, 9: 2.5}, 4, 3, True, {"type": "array"})
    assert parse_chat(chat(response_format={"type": "json_object"}), 32).json_schema == {"type": "object"}
    answer = {"role": "assistant", "content": "hello", "refusal": None, "annotations": [], "audio": None,
              "function_call": None, "tool_calls": None}  # an earlier answer as the openai client dumps it
    assert parse_chat(chat(messages=[answer]), 32).prompts[0] == [{"role": "assistant", "content": "hello"}]
    assert parse_chat(chat(logprobs=False), 32).sampling.top_logprobs is None
    assert parse_chat(chat(logprobs=True), 32).sampling.top_logprobs == 0
    assert parse_completion({"model": "m", "prompt": "x", "logprobs": 0}, 32).sampling.top_logprobs == 0
    tools = parse_chat(chat(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="none"), 32).tools
    assert tools is None  # 'none': the tools are neither shown nor parsed
