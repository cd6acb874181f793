"""response_format json_object / json_schema: every answer parses and validates, whatever the sampling."""

import json
import sys

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

CHAT = [{"role": "user", "content": "Describe a person as JSON."}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "bc", "d e"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
        "pet": {"anyOf": [{"type": "null"}, {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}},
                                             "required": ["kind"], "additionalProperties": False}]},
    },
    "required": ["name", "age", "tags", "ok", "pet"],
    "additionalProperties": False,
}


@pytest.fixture
def server(start_server):
    return start_server(max_tokens_limit=160)


@pytest.fixture
def client(server, connect):
    return connect(server)


def fmt(schema):
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


def test_every_json_schema_answer_validates(server, client):
    answers = []
    for model in (server.options.model, "alpha"):
        for temperature in (0, 0.8, 1.6):
            r = client.chat.completions.create(model=model, messages=CHAT, max_tokens=160, temperature=temperature,
                                               seed=11, n=3, response_format=fmt(PERSON))
            for choice in r.choices:
                assert choice.finish_reason == "stop", choice.message.content
                answer = json.loads(choice.message.content)
                jsonschema.validate(answer, PERSON)
                answers.append(choice.message.content)
    assert len(set(answers)) > 3  # sampled answers differ: the grammar constrains, it does not dictate


def test_unconstrained_answer_is_not_json(client):
    # The same request without response_format: the random model's text is not JSON, so the test above can fail.
    r = client.chat.completions.create(model="alpha", messages=CHAT, max_tokens=40, temperature=0)
    with pytest.raises(ValueError):
        json.loads(r.choices[0].message.content)


def test_json_object_and_streaming(server, client):
    close = server.adapter_set.tokenizer.convert_tokens_to_ids("}")
    r = client.chat.completions.create(model="beta", messages=CHAT, max_tokens=20, temperature=0,
                                       response_format={"type": "json_object"}, logit_bias={str(close): 100})
    assert r.choices[0].message.content == "{}"  # '{' forced by the grammar, then the biased '}' ends it
    plain = client.chat.completions.create(model="beta", messages=CHAT, max_tokens=160, temperature=0.7, seed=2,
                                           response_format=fmt(PERSON))
    chunks = client.chat.completions.create(model="beta", messages=CHAT, max_tokens=160, temperature=0.7, seed=2,
                                            response_format=fmt(PERSON), stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    jsonschema.validate(json.loads(text), PERSON)


def test_bad_schema_is_400(client):
    with pytest.raises(openai.BadRequestError, match="cannot constrain") as e:
        client.chat.completions.create(model="alpha", messages=CHAT, max_tokens=8,
                                       response_format=fmt({"type": "objekt"}))
    assert e.value.body["param"] == "response_format"


def test_missing_package_is_400_naming_it(client, monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import llguidance now raises ImportError
    with pytest.raises(openai.BadRequestError, match=r"llguidance.*tuneforge\[serve\]"):
        client.chat.completions.create(model="alpha", messages=CHAT, max_tokens=8, response_format=fmt(PERSON))
