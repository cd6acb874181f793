"""A real server on loopback, a tiny random model, two adapters, talked to with the official openai client."""

import http.client
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tuneforge.serve import Server
from tuneforge.serve.batcher import Batcher, Job
from tuneforge.serve.protocol import Sampling

openai = pytest.importorskip("openai")

CHATS = [[{"role": "user", "content": "Upper-case the word: apple"}],
         [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 + 3?"}],
         [{"role": "user", "content": "Translate to JSON: name Alice"}]]
PROMPTS = ["Hello world.", "The quick brown fox jumps", "Classify the sentiment: I love it"]
N = 8  # max_tokens everywhere: short, so the file runs in seconds


@pytest.fixture
def server(start_server):
    return start_server(max_tokens_limit=64, max_body_bytes=4096)


@pytest.fixture
def client(server, connect):
    return connect(server)


def names(server: Server) -> dict[str, str]:
    return {"base": server.options.model, "alpha": "alpha", "beta": "beta"}


def raw_post(server: Server, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_models_lists_base_and_adapters(server, client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [server.options.model, "alpha", "beta"]
    assert client.models.retrieve("alpha").id == "alpha"


def test_chat_equals_each_adapters_greedy_output(server, client, reference):
    outputs = {}
    for key, model in names(server).items():
        r = client.chat.completions.create(model=model, messages=CHATS[0], max_tokens=N, temperature=0)
        text = r.choices[0].message.content
        assert text.strip() == reference(key, CHATS[0])
        assert r.model == model and r.choices[0].finish_reason in ("stop", "length")
        assert 1 <= r.usage.completion_tokens <= N
        assert r.usage.prompt_tokens == len(server.batcher.encode(CHATS[0]))
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        outputs[key] = text
    assert len(set(outputs.values())) == 3  # the adapters really differ, so the equality above can fail


def test_streaming_reassembles_to_the_same_text(client):
    # (alpha, CHATS[1]) answers with bytes that are not valid UTF-8: they are held back to the end.
    for model, chat in (("alpha", CHATS[0]), ("beta", CHATS[1]), ("alpha", CHATS[1])):
        plain = client.chat.completions.create(model=model, messages=chat, max_tokens=N, temperature=0)
        chunks = list(client.chat.completions.create(model=model, messages=chat, max_tokens=N, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == plain.choices[0].message.content
        if chat is CHATS[0]:  # whole-character tokens arrive one chunk per token
            assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == plain.usage.completion_tokens
        assert chunks[0].choices[0].delta.role == "assistant"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_completions_endpoint_plain_and_streamed(server, client, reference):
    r = client.completions.create(model="beta", prompt=PROMPTS, max_tokens=N, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text.strip() for c in r.choices] == [reference("beta", p) for p in PROMPTS]
    streamed = {}
    for chunk in client.completions.create(model="beta", prompt=PROMPTS, max_tokens=N, temperature=0, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert [streamed[i] for i in range(3)] == [c.text for c in r.choices]
    base = client.completions.create(model=server.options.model, prompt=PROMPTS[0], max_tokens=N, temperature=0)
    assert base.choices[0].text.strip() == reference("base", PROMPTS[0])


def test_stop_strings_and_seeded_sampling(client):
    full = client.completions.create(model="alpha", prompt=PROMPTS[1], max_tokens=N, temperature=0).choices[0]
    stop = full.text.strip()[2:4]
    assert len(stop) == 2
    cut = client.completions.create(model="alpha", prompt=PROMPTS[1], max_tokens=N, temperature=0, stop=[stop])
    assert cut.choices[0].text == full.text[:full.text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    sampled = [client.completions.create(model="beta", prompt=PROMPTS[1], max_tokens=N, temperature=0.9,
                                         seed=7).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]  # the same seed alone in its batch: the same sample


def test_concurrent_requests_mixing_adapters(server, client, reference):
    cases = [(key, CHATS[i % len(CHATS)]) for i in range(4) for key in names(server)]

    def ask(case):
        key, chat = case
        r = client.chat.completions.create(model=names(server)[key], messages=chat, max_tokens=N, temperature=0)
        return r.choices[0].message.content.strip()

    with ThreadPoolExecutor(len(cases)) as pool:
        got = list(pool.map(ask, cases))
    assert got == [reference(key, chat) for key, chat in cases]


def test_one_batch_runs_rows_of_different_adapters(server, reference):
    # A batcher that is not started yet: every job is queued before the first batch is collected.
    batcher = Batcher(server.adapter_set, max_batch=8)
    rows = [(None, CHATS[0]), ("alpha", CHATS[1]), ("beta", CHATS[2]), ("alpha", CHATS[0])]
    with server.registry.lease("alpha") as alpha, server.registry.lease("beta") as beta:
        keys = {None: None, "alpha": alpha, "beta": beta}  # the adapters' versions inside the AdapterSet
    jobs = [Job(batcher.encode(p), keys[adapter], Sampling(max_tokens=N)) for adapter, p in rows]
    batcher.submit(jobs)
    batcher.start()
    try:
        texts = []
        for job in jobs:
            text, kind = "", None
            while kind != "done":
                _, kind, payload = job.sink.get(timeout=60)
                assert kind != "error", payload
                text += payload[0] if kind == "text" else ""
            texts.append(text.strip())
    finally:
        batcher.close()
    assert (batcher.stats.batches, batcher.stats.max_rows, batcher.stats.mixed) == (1, 4, 1)
    assert texts == [reference(a or "base", CHATS[[0, 1, 2, 0][i]]) for i, (a, _) in enumerate(rows)]


def test_unknown_model_is_404_listing_the_models(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=CHATS[0], max_tokens=N)
    assert "nope" in str(e.value) and all(m in str(e.value) for m in names(server).values())


def test_bad_requests_are_400(server, client):
    for bad in (0, 65, -1):  # the server's limit is 64
        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            client.chat.completions.create(model="alpha", messages=CHATS[0], max_tokens=bad)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="alpha", messages=[{"role": "wizard", "content": "hi"}], max_tokens=N)
    status, body = raw_post(server, "/v1/chat/completions", b'{"model": "alpha", "messages": [')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = raw_post(server, "/v1/completions", b"[1, 2]")
    assert status == 400 and "JSON object" in body["error"]["message"]


def test_oversized_body_is_413(server):
    body = json.dumps({"model": "alpha", "prompt": "x" * 5000, "max_tokens": 1}).encode()  # limit: 4096 bytes
    status, answer = raw_post(server, "/v1/completions", body)
    assert status == 413 and "4096" in answer["error"]["message"]


def test_path_traversal_is_refused(server, client, gamma, adapters_dir):
    for name in ("../elsewhere/gamma", "..", "a/b", "..\\gamma", ".hidden"):
        with pytest.raises(openai.BadRequestError, match="invalid model name"):
            client.completions.create(model=name, prompt="hi", max_tokens=N)
    # A link inside the directory that points outside is not served either.
    (adapters_dir / "linked").symlink_to(gamma, target_is_directory=True)
    with pytest.raises(openai.NotFoundError, match="outside the adapters directory"):
        client.completions.create(model="linked", prompt="hi", max_tokens=N)
    assert "linked" not in [m.id for m in client.models.list().data]


def test_hot_add_then_remove(server, client, reference, gamma, adapters_dir):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gamma", prompt=PROMPTS[0], max_tokens=N, temperature=0)
    shutil.copytree(gamma, adapters_dir / "gamma")
    r = client.completions.create(model="gamma", prompt=PROMPTS[0], max_tokens=N, temperature=0)
    assert r.choices[0].text.strip() == reference("gamma", PROMPTS[0])
    assert "gamma" in [m.id for m in client.models.list().data]
    shutil.rmtree(adapters_dir / "alpha")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=N, temperature=0)
    assert [m.id for m in client.models.list().data] == [server.options.model, "beta", "gamma"]
    assert not [n for n in server.adapter_set.names if n.startswith("alpha/")]  # unloaded, not just hidden
    shutil.rmtree(adapters_dir / "beta")  # replaced in place: the next request reloads it
    shutil.copytree(gamma, adapters_dir / "beta")
    r = client.completions.create(model="beta", prompt=PROMPTS[0], max_tokens=N, temperature=0)
    assert r.choices[0].text.strip() == reference("gamma", PROMPTS[0]) != reference("beta", PROMPTS[0])


def test_background_rescan_unloads_removed_adapters(start_server, adapters_dir):
    s = start_server(scan_interval_s=0.05)
    shutil.rmtree(adapters_dir / "alpha")
    for _ in range(600):  # no request is made: only the background scan can notice
        if len(s.adapter_set.names) == 1:
            break
        time.sleep(0.05)
    assert [n.split("/")[0] for n in s.adapter_set.names] == ["beta"]


def test_client_leaving_a_stream_early_does_not_hurt(client, reference):
    stream = client.chat.completions.create(model="alpha", messages=CHATS[0], max_tokens=N, temperature=0,
                                            stream=True)
    next(iter(stream))
    stream.close()
    r = client.chat.completions.create(model="alpha", messages=CHATS[0], max_tokens=N, temperature=0)
    assert r.choices[0].message.content.strip() == reference("alpha", CHATS[0])


def test_api_key_required_when_set(start_server, connect):
    s = start_server(api_key="s3cret")
    with pytest.raises(openai.AuthenticationError):
        connect(s, "wrong").models.list()
    status, _ = raw_post(s, "/v1/completions", b'{"model": "alpha", "prompt": "hi"}')
    assert status == 401
    assert [m.id for m in connect(s, "s3cret").models.list().data][1:] == ["alpha", "beta"]


def test_cli_serve_arguments():
    from tuneforge.cli import build_parser, cmd_serve, config_of

    args = build_parser().parse_args(["serve", "--model", "m", "--adapters", "d"])
    assert args.func is cmd_serve
    c = config_of(args)
    assert (c.model, c.adapters, c.host, c.port, c.max_batch, c.max_tokens_limit, c.api_key) == (
        "m", "d", "127.0.0.1", 8000, 8, 512, None)
    c = config_of(build_parser().parse_args(["serve", "--model", "m", "--adapters", "d", "--port", "9001",
                                             "--api-key", "k"]))
    assert (c.port, c.api_key) == (9001, "k")


def test_n_choices_are_seeded_and_distinct(client):
    kw = {"model": "alpha", "messages": CHATS[0], "max_tokens": N, "temperature": 1.2, "seed": 5}
    r = client.chat.completions.create(n=3, **kw)
    texts = [c.message.content for c in r.choices]
    assert [c.index for c in r.choices] == [0, 1, 2] and len(set(texts)) == 3
    assert [c.message.content for c in client.chat.completions.create(n=3, **kw).choices] == texts
    assert client.chat.completions.create(n=1, **kw).choices[0].message.content == texts[0]  # choice j: seed + j
    r = client.completions.create(model="beta", prompt=PROMPTS[:2], max_tokens=N, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text != r.choices[2].text == r.choices[3].text  # greedy: n equal copies


def test_temperature_and_top_p_have_their_effect(client):
    greedy = client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=N, temperature=0).choices[0].text
    hot = client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=N, temperature=2, seed=1)
    assert hot.choices[0].text != greedy
    nucleus = client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=N, temperature=2, seed=1,
                                        top_p=1e-6)  # the nucleus is the likeliest token alone
    assert nucleus.choices[0].text == greedy


def test_logit_bias_and_penalties_have_their_effect(server, client):
    tok = server.adapter_set.tokenizer
    a, b = tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b")
    both = {str(a): 100, str(b): 100}  # two tokens far above the rest, close to each other
    kw = {"model": "alpha", "prompt": PROMPTS[0], "max_tokens": N, "temperature": 0, "logit_bias": both}
    plain = client.completions.create(**kw).choices[0].text
    assert plain in ("a" * N, "b" * N)  # greedy keeps picking the one the model slightly prefers
    for penalty in ({"frequency_penalty": 2}, {"presence_penalty": 2}):
        text = client.completions.create(**kw, **penalty).choices[0].text
        assert set(text) == {"a", "b"} and len(text) == N  # each use pushes the token below the other one
    ban = str(tok.convert_tokens_to_ids(plain[0]))
    banned = client.completions.create(**{**kw, "logit_bias": {**both, ban: -100}}).choices[0].text
    assert banned == ("b" if plain[0] == "a" else "a") * N
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(**{**kw, "logit_bias": {str(len(tok) + 10_000): 5}})


def test_unsupported_parameters_are_400_by_name(client):
    for extra in ({"user": "u"}, {"metadata": {"k": "v"}}, {"reasoning_effort": "low"}):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="alpha", messages=CHATS[0], max_tokens=N, **extra)
        assert e.value.body["param"] == next(iter(extra))
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        client.chat.completions.create(model="alpha", messages=CHATS[0], max_tokens=N, presence_penalty=2.5)


def test_max_completion_tokens_bounds_the_answer(client):
    r = client.chat.completions.create(model="alpha", messages=CHATS[0], max_completion_tokens=2, temperature=0)
    assert r.usage.completion_tokens <= 2
    longer = client.chat.completions.create(model="alpha", messages=CHATS[0], max_completion_tokens=N, temperature=0)
    assert longer.choices[0].message.content.startswith(r.choices[0].message.content)
    assert r.choices[0].finish_reason == "length" or r.choices[0].message.content == longer.choices[0].message.content
