"""`tuneforge generate` and `tuneforge chat`: a model (plus an optional adapter) answering prompts."""

from __future__ import annotations

import json
from pathlib import Path

from tuneforge.data.conversation import Message
from tuneforge.errors import DataError
from tuneforge.log import emit
from tuneforge.methods.peft_format import load_adapter
from tuneforge.models.generate import generate
from tuneforge.models.load import load_model, load_tokenizer


def load_with_adapter(model_ref: str, adapter: str | None):
    """The model and tokenizer, with a PEFT-format LoRA adapter applied when given."""
    tokenizer = load_tokenizer(model_ref)
    model = load_model(model_ref).eval()
    if adapter:
        load_adapter(model, adapter)
    return model, tokenizer


def load_prompts(prompts: list[str], file: str | None) -> list[str]:
    """Prompts from arguments, plus a file: one per line (.txt) or records with a prompt field (.jsonl)."""
    out = list(prompts)
    if file:
        path = Path(file)
        if not path.is_file():
            raise DataError(f"prompt file '{file}' does not exist")
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{file}:{i}: not valid JSON ({e})") from e
                key = next((k for k in ("prompt", "instruction", "question", "input") if k in rec), None)
                if key is None:
                    raise DataError(f"{file}:{i}: no prompt field; expected one of prompt/instruction/"
                                    "question/input")
                out.append(str(rec[key]))
            else:
                out.append(line)
    if not out:
        raise DataError("no prompts given: pass them as arguments or with --file")
    return out


def run_generate(model_ref: str, adapter: str | None, prompts: list[str], max_new_tokens: int,
                 temperature: float, top_p: float, batch_size: int) -> list[str]:
    """Answer each prompt as a user message (batched; greedy when temperature is 0)."""
    model, tokenizer = load_with_adapter(model_ref, adapter)
    chats = [[Message("user", p)] for p in prompts]
    return generate(model, tokenizer, chats, max_new_tokens=max_new_tokens, temperature=temperature,
                    top_p=top_p, batch_size=batch_size)


def read_message(read=input) -> str | None:
    """One user message from the terminal; None at the end (an empty line or Ctrl-D).

    A line ending in a backslash continues on the next line; a line of three double quotes opens a block
    that the next such line closes (blank lines inside are kept). Pasting code or a document needs one of them.
    """
    first = _read_or_end(read, "you> ")
    if first is None:
        return None
    if first.strip() == '"""':
        lines = []
        while (line := _read_or_end(read, "... ")) is not None and line.strip() != '"""':
            lines.append(line)
        return "\n".join(lines).strip() or None
    lines = [first]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        line = _read_or_end(read, "... ")
        if line is None:
            break
        lines.append(line)
    return "\n".join(lines).strip() or None


def _read_or_end(read, prompt: str) -> str | None:
    try:
        return read(prompt)
    except EOFError:
        return None


def chat_loop(model_ref: str, adapter: str | None, max_new_tokens: int, temperature: float,
              system: str | None) -> None:
    """An interactive conversation on the terminal (multi-line: :func:`read_message`); an empty line or Ctrl-D
    ends it."""
    model, tokenizer = load_with_adapter(model_ref, adapter)
    history: list[Message] = [Message("system", system)] if system else []
    emit('chat: type a message (end a line with \\ to go on, or wrap several lines in """), an empty line '
         "to quit")
    while (text := read_message()) is not None:
        history.append(Message("user", text))
        reply = generate(model, tokenizer, [history], max_new_tokens=max_new_tokens,
                         temperature=temperature)[0]
        history.append(Message("assistant", reply))
        emit(f"model> {reply}")
