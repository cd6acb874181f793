"""tools / tool_choice through the chat template (Hermes <tool_call> format); 400 where the template has none."""

import json

import pytest

from tuneforge.serve.protocol import Tools
from tuneforge.serve.tools import parse_calls

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

# A Hermes-style template (the format of Qwen2.5 and Hermes models), written for these tests.
HERMES = """{%- if tools %}<|im_start|>system
You may call functions. Their signatures:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Call one as <tool_call>
{"name": <name>, "arguments": <object>}
</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% elif message.tool_calls %}<|im_start|>assistant
{%- for call in message.tool_calls %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Time in a zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 5}},
                   "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
CHAT = [{"role": "user", "content": "What is the weather in Paris?"}]
HISTORY = CHAT + [
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Paris", "days": 1}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
]


@pytest.fixture
def hermes_dir(tmp_path, tiny_model, tiny_tokenizer):
    out = tmp_path / "hermes-model"
    tiny_model.config.max_position_embeddings = 2048  # rotary positions: tool definitions are long in 400 tokens
    tiny_model.save_pretrained(out)
    tiny_tokenizer.chat_template = HERMES
    tiny_tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def server(start_server, hermes_dir):
    return start_server(model=str(hermes_dir), max_tokens_limit=96)


@pytest.fixture
def client(server, connect):
    return connect(server)


def check_calls(choice, names):
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_required_and_named_choices_always_call(server, client):
    pytest.importorskip("llguidance")
    for temperature in (0, 1.0):
        r = client.chat.completions.create(model="alpha", messages=CHAT, tools=TOOLS, tool_choice="required",
                                           max_tokens=96, temperature=temperature, seed=4, n=2)
        for choice in r.choices:
            check_calls(choice, {"get_weather", "get_time"})
    named = {"type": "function", "function": {"name": "get_time"}}
    r = client.chat.completions.create(model="beta", messages=CHAT, tools=TOOLS, tool_choice=named, max_tokens=96,
                                       temperature=0.8, seed=1, parallel_tool_calls=False)
    check_calls(r.choices[0], {"get_time"})
    assert len(r.choices[0].message.tool_calls) == 1


def test_streamed_tool_calls(client):
    pytest.importorskip("llguidance")
    plain = client.chat.completions.create(model="alpha", messages=CHAT, tools=TOOLS, tool_choice="required",
                                           max_tokens=96, temperature=0)
    chunks = [c for c in client.chat.completions.create(model="alpha", messages=CHAT, tools=TOOLS,
                                                        tool_choice="required", max_tokens=96, temperature=0,
                                                        stream=True) if c.choices]
    calls = [t for c in chunks for t in (c.choices[0].delta.tool_calls or [])]
    assert [(t.function.name, t.function.arguments) for t in calls] == [
        (t.function.name, t.function.arguments) for t in plain.choices[0].message.tool_calls]
    assert [t.index for t in calls] == list(range(len(calls)))
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tools_are_rendered_and_none_hides_them(server, client):
    tokens = {}
    for key, extra in {"auto": {"tools": TOOLS}, "none": {"tools": TOOLS, "tool_choice": "none"}, "plain": {}}.items():
        r = client.chat.completions.create(model="alpha", messages=CHAT, max_tokens=4, temperature=0, **extra)
        tokens[key] = r.usage.prompt_tokens
        assert not r.choices[0].message.tool_calls
    assert tokens["auto"] == len(server.batcher.encode(CHAT, [t for t in TOOLS])) > tokens["plain"]
    assert tokens["none"] == tokens["plain"]


def test_tool_results_in_the_history(server, client):
    r = client.chat.completions.create(model="alpha", messages=HISTORY, tools=TOOLS, max_tokens=4, temperature=0)
    turns = [dict(m) for m in HISTORY]
    turns[1] = {**turns[1], "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Paris", "days": 1}}}]}
    text = server.adapter_set.tokenizer.decode(server.batcher.encode(turns, TOOLS))
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in text
    assert '{"name": "get_weather", "arguments": {"city": "Paris", "days": 1}}' in text
    assert r.usage.prompt_tokens == len(server.batcher.encode(turns, TOOLS))


def test_template_without_tools_is_400(start_server, connect):
    client = connect(start_server())  # the tiny model's plain ChatML template
    with pytest.raises(openai.BadRequestError, match="does not render tools") as e:
        client.chat.completions.create(model="alpha", messages=CHAT, tools=TOOLS, max_tokens=4)
    assert e.value.body["param"] == "tools"
    with pytest.raises(openai.BadRequestError, match=r"messages\[1\] is a tool result"):
        client.chat.completions.create(model="alpha", messages=HISTORY[:1] + HISTORY[2:], max_tokens=4)
    with pytest.raises(openai.BadRequestError, match=r"messages\[1\] is a tool call"):
        client.chat.completions.create(model="alpha", messages=HISTORY, max_tokens=4)


def test_parse_calls_of_auto_answers():
    tools = Tools([t["function"] for t in TOOLS], "auto")
    content, calls = parse_calls('Let me check.\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n'
                                 '</tool_call>\n<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}',
                                 tools)
    assert content == "Let me check."
    around, two = parse_calls('A.\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>\nB.\n'
                              '<tool_call>{"name": "get_time", "arguments": {}}</tool_call> C.', tools)
    assert around == "A.\nB.\nC." and len(two) == 2  # text around and between the calls stays content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_time", {"zone": "UTC"}), ("get_weather", {"city": "Oslo"})]
    for text in ("no call here", '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',
                 '<tool_call>{"name": "get_time", "arguments": </tool_call>'):
        assert parse_calls(text, tools) == (text, [])  # not a well-formed call of a known tool: plain content
    one = Tools(tools.functions, "auto", parallel=False)
    assert len(parse_calls('<tool_call>{"name": "get_time", "arguments": {}}</tool_call>' * 2, one)[1]) == 1


def scripted(server, text):
    """Make the base model write ``text`` and end its turn: a hook on its output head (removed by the caller)."""
    tok = server.adapter_set.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    step = iter(ids)

    def force(module, args, out):
        out = out.clone()
        out[:, -1, next(step, ids[-1])] += 1e4
        return out

    return server.adapter_set.model.lm_head.register_forward_hook(force)


def test_auto_parses_the_calls_the_model_writes(server, client):
    text = 'Checking.\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
    for stream in (False, True):
        hook = scripted(server, text)
        try:
            kw = {"model": server.options.model, "messages": CHAT, "tools": TOOLS, "max_tokens": 96, "temperature": 0}
            if stream:
                chunks = [c for c in client.chat.completions.create(stream=True, **kw) if c.choices]
                calls = [t for c in chunks for t in (c.choices[0].delta.tool_calls or [])]
                content = "".join(c.choices[0].delta.content or "" for c in chunks)
                finish = chunks[-1].choices[0].finish_reason
            else:
                choice = client.chat.completions.create(**kw).choices[0]
                calls, content, finish = choice.message.tool_calls, choice.message.content, choice.finish_reason
        finally:
            hook.remove()
        assert (content, finish) == ("Checking.", "tool_calls")
        assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("get_time", {"zone": "UTC"})]
    hook = scripted(server, "No call.")  # auto: plain text stays content
    try:
        choice = client.chat.completions.create(**kw).choices[0]
    finally:
        hook.remove()
    assert (choice.message.content, choice.message.tool_calls, choice.finish_reason) == ("No call.", None, "stop")


def test_a_tool_schema_llguidance_cannot_compile_is_400_naming_tools(client):
    pytest.importorskip("llguidance")
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}
    with pytest.raises(openai.BadRequestError, match="cannot constrain decoding") as e:
        client.chat.completions.create(model="alpha", messages=CHAT, tools=[bad], tool_choice="required",
                                       max_tokens=8)
    assert e.value.body["param"] == "tools"
