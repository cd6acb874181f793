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
