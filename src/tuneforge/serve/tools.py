"""Function calling through the model's chat template, in the Hermes format (Qwen2.5, Hermes, …).

The template shows the tool definitions (``apply_chat_template(tools=...)``) and earlier calls and
results; the model answers ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, which
becomes ``message.tool_calls``. ``tool_choice`` 'required' or a named function constrains decoding
to that format, so a call always comes back; 'auto' lets the model choose and parses what it wrote.
"""

from __future__ import annotations

import json
import re
import uuid

from tuneforge.serve.protocol import Tools, bad_request
from tuneforge.serve.structured import json_rule, lark_grammar

OPEN, CLOSE = "<tool_call>", "</tool_call>"
CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CLOSE) + r"|$)", re.DOTALL)


def check_template(template: str, supports: bool, why: str) -> None:
    """400 unless the chat template renders tools and uses the Hermes call format this module parses."""
    if not supports:
        raise bad_request(f"{why}, but the model's chat template does not render tools "
                          "(apply_chat_template(tools=...) leaves them out); serve a model whose template "
                          "supports tools", "tools")
    if OPEN not in template:
        raise bad_request(f"{why}, but the model's chat template does not use the {OPEN}{{json}}{CLOSE} call "
                          "format, the only one this server parses", "tools")


def call_grammar(tools: Tools) -> str | None:
    """The grammar decoding follows: one or more calls ('required', a named function), None for 'auto'."""
    if tools.choice == "auto":
        return None
    functions = [f for f in tools.functions if tools.choice in ("required", f["name"])]
    calls = [{"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
              "required": ["name", "arguments"], "additionalProperties": False} for f in functions]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    repeat = ' ("\\n" call)*' if tools.parallel else ""
    return lark_grammar(f'start: call{repeat}\ncall: "{OPEN}\\n" body "\\n{CLOSE}"\nbody: {json_rule(schema)}\n')


def parse_calls(text: str, tools: Tools) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of an answer. Content is the text outside the <tool_call> tags, each piece stripped,
    joined by newlines (None when empty); an answer with a tag that is not a well-formed call of a known tool is
    all content, without calls. OpenAI's message may carry both content and tool_calls."""
    matches = list(CALL.finditer(text))
    if not matches:
        return text, []
    names = {f["name"] for f in tools.functions}
    calls, outside, end = [], [], 0
    for match in matches:
        outside.append(text[end:match.start()])
        end = match.end()
        try:
            call = json.loads(match.group(1))
        except ValueError:
            return text, []
        if not isinstance(call, dict) or call.get("name") not in names or not isinstance(call.get("arguments"), dict):
            return text, []
        calls.append({"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                      "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}})
    outside.append(text[end:])
    if not tools.parallel:
        calls = calls[:1]
    content = "\n".join(piece.strip() for piece in outside if piece.strip())
    return content or None, calls
