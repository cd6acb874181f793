"""logprobs / top_logprobs on both endpoints, plain and streamed, in OpenAI's shapes."""

import pytest
import torch

from tuneforge.serve.logprobs import TokenBytes

openai = pytest.importorskip("openai")

CHAT = [{"role": "user", "content": "Upper-case the word: apple"}]
N = 6


@pytest.fixture
def server(start_server):
    return start_server(max_tokens_limit=32)


@pytest.fixture
def client(server, connect):
    return connect(server)


def first_token_logprobs(server, prompt_ids):
    """The base model's log-softmax for the token after ``prompt_ids``, computed directly."""
    model = server.adapter_set.model
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids])).logits[0, -1].float()
    return torch.log_softmax(logits, -1)


def test_chat_logprobs_match_the_model(server, client):
    r = client.chat.completions.create(model=server.options.model, messages=CHAT, max_tokens=N, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert bytes(b for c in content for b in c.bytes).decode(errors="replace") == r.choices[0].message.content
    for c in content:
        assert len(c.top_logprobs) == 3
        assert c.token == bytes(c.bytes).decode(errors="backslashreplace")
        assert [t.logprob for t in c.top_logprobs] == sorted((t.logprob for t in c.top_logprobs), reverse=True)
        assert c.top_logprobs[0].token == c.token and c.top_logprobs[0].logprob == c.logprob  # greedy
    expected = first_token_logprobs(server, server.batcher.encode(CHAT))
    assert content[0].logprob == pytest.approx(expected.max().item(), abs=1e-4)
    no = client.chat.completions.create(model="alpha", messages=CHAT, max_tokens=N, temperature=0)
    assert no.choices[0].logprobs is None
    only = client.chat.completions.create(model="alpha", messages=CHAT, max_tokens=N, temperature=0, logprobs=True)
    assert all(c.top_logprobs == [] for c in only.choices[0].logprobs.content)


def test_sampled_token_logprob_is_its_own(server, client):
    ids = {server.token_bytes(i): i for i in range(len(server.adapter_set.tokenizer))}
    expected = first_token_logprobs(server, server.batcher.encode(CHAT))
    for seed in range(3):
        r = client.chat.completions.create(model=server.options.model, messages=CHAT, max_tokens=1, temperature=1.5,
                                           seed=seed, logprobs=True, top_logprobs=5)
        first = r.choices[0].logprobs.content[0]
        assert first.logprob == pytest.approx(expected[ids[bytes(first.bytes)]].item(), abs=1e-4)
        assert [t.logprob for t in first.top_logprobs] == pytest.approx(expected.topk(5).values.tolist(), abs=1e-4)


def test_completions_legacy_shape(client):
    r = client.completions.create(model="beta", prompt=["Hello world.", "The quick"], max_tokens=N, temperature=0,
                                  logprobs=2)
    for choice in r.choices:
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
        if not any("\\x" in t for t in lp.tokens):  # whole characters: the tokens spell the text
            assert "".join(lp.tokens) == choice.text
            assert lp.text_offset == [sum(len(t) for t in lp.tokens[:k]) for k in range(len(lp.tokens))]
        assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
        assert all(len(top) <= 2 and max(top.values()) == lp.token_logprobs[k] for k, top in
                   enumerate(lp.top_logprobs))


def test_streamed_logprobs_equal_plain(client):
    plain = client.chat.completions.create(model="alpha", messages=CHAT, max_tokens=N, temperature=0, logprobs=True,
                                           top_logprobs=2)
    chunks = list(client.chat.completions.create(model="alpha", messages=CHAT, max_tokens=N, temperature=0,
                                                 logprobs=True, top_logprobs=2, stream=True))
    streamed = [c for ch in chunks if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in plain.choices[0].logprobs.content]
    for ch in chunks:  # each chunk's logprobs are those of the text it carries
        if ch.choices and ch.choices[0].logprobs:
            text = bytes(b for c in ch.choices[0].logprobs.content for b in c.bytes).decode(errors="replace")
            assert text == ch.choices[0].delta.content

    plain = client.completions.create(model="beta", prompt="Hello", max_tokens=N, temperature=0, logprobs=1)
    tokens, offsets = [], []
    for ch in client.completions.create(model="beta", prompt="Hello", max_tokens=N, temperature=0, logprobs=1,
                                        stream=True):
        if ch.choices and ch.choices[0].logprobs:
            tokens += ch.choices[0].logprobs.tokens
            offsets += ch.choices[0].logprobs.text_offset
    assert (tokens, offsets) == (plain.choices[0].logprobs.tokens, plain.choices[0].logprobs.text_offset)


def test_token_bytes_of_partial_characters(smollm_tokenizer):
    tokens = TokenBytes(smollm_tokenizer)
    ids = smollm_tokenizer("héllo ✓", add_special_tokens=False)["input_ids"]
    assert b"".join(tokens(i) for i in ids) == "héllo ✓".encode()
    partial = [i for i in ids if "\\x" in tokens.text(i)]
    assert partial  # ✓ is three bytes split over tokens: shown as \xNN escapes, as OpenAI does
    assert tokens(smollm_tokenizer.convert_tokens_to_ids("<|im_end|>")) == b"<|im_end|>"
