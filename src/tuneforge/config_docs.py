"""docs/configuration.md, generated from the command config models so the key tables never drift.

Regenerate with ``make config-docs`` (``python -m tuneforge.config_docs docs/configuration.md``);
``tests/test_config_docs.py`` fails when the committed file differs from what this renders.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from tuneforge.config import AdviseConfig, EvalConfig, LabConfig, PlanConfig, RunConfig, ServeConfig, UiConfig

COMMANDS: tuple[tuple[str, type[BaseModel]], ...] = (
    ("train", RunConfig), ("eval", EvalConfig), ("advise", AdviseConfig), ("serve", ServeConfig),
    ("lab", LabConfig), ("ui", UiConfig), ("plan", PlanConfig))
REGENERATE = "make config-docs"
INTRO = f"""# Configuration

<!-- Generated from src/tuneforge/config.py by `{REGENERATE}`; edit the models, not this file. -->

Every command below is described by one pydantic model. Each is built the same way, later sources
winning: the model's defaults, then a YAML file (`--config FILE`), then `--set key=value` overrides
(repeatable; the value is parsed as YAML, nested keys are dotted: `--set train.lr=1e-4`), then the
command's named flags (`tuneforge COMMAND --help` lists them with the key each one sets). Unknown keys
and bad values stop the command with a message naming the key (and the flag that set it).

```bash
tuneforge train -c run.yaml --set train.lr=1e-4 --max-steps 200
tuneforge eval --config eval.yaml --set limit=100
tuneforge plan -c run.yaml --gpus 2 --gpu-mem 80     # the run's own config, plus the plan keys
```

`tuneforge train` writes the resolved config (defaults filled in) to `<output_dir>/config.yaml`.
In the tables, `a[].b` is the key `b` of each entry of the list `a`; `null` means unset.
"""


def render() -> str:
    """The whole of docs/configuration.md."""
    parts = [INTRO]
    for command, schema in COMMANDS:
        inherited = set(RunConfig.model_fields) if schema is PlanConfig else set()
        parts.append(f"## {command} (`{schema.__name__}`)\n\n{_doc(schema)}\n")
        if inherited:
            parts.append("Every key of `tuneforge train` (above), and:\n")
        rows = _rows(schema, "", None, {}, exclude=inherited)
        parts.append(_table(rows))
    return "\n".join(parts)


def _doc(schema: type[BaseModel]) -> str:
    return " ".join((schema.__doc__ or "").split()).replace("``", "`")


def _table(rows: list[tuple[str, str, str, str]]) -> str:
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    for key, type_, default, text in rows:
        cells = [f"`{key}`", type_, default if default == "required" else f"`{default}`", text]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _rows(schema: type[BaseModel], prefix: str, instance: BaseModel | None, seen: dict[type, str],
          exclude: set[str] = frozenset()) -> list[tuple[str, str, str, str]]:
    """One row per key; a nested section's keys instead of the section; a model met again is referred to."""
    rows = []
    for name, field in schema.model_fields.items():
        if name in exclude:
            continue
        key = prefix + name
        default = getattr(instance, name) if instance is not None else _default(field)
        nested = _model_in(field.annotation)
        if isinstance(nested, type) and field.annotation is nested:  # a section: its keys, not itself
            rows += _rows(nested, key + ".", default if isinstance(default, BaseModel) else None, seen)
            continue
        text = field.description or ""
        if nested is not None and nested in seen:
            text += f" (keys as in `{seen[nested]}`)"
        rows.append((key, _type_name(field.annotation), _default_text(default), text))
        if nested is not None and nested not in seen:  # a list of mappings or an optional mapping: its keys too
            sub = key + ("[]" if get_origin(field.annotation) is list else "")
            seen[nested] = sub
            rows += _rows(nested, sub + ".", None, seen)
    return rows


def _default(field: Any) -> Any:
    if field.default is PydanticUndefined and field.default_factory is None:
        return PydanticUndefined
    return field.get_default(call_default_factory=True)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds (itself, in a list, or optional), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        if (found := _model_in(arg)) is not None:
            return found
    return None


def _type_name(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    if origin is dict or (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def _default_text(value: Any) -> str:
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        value = [v.model_dump(exclude_defaults=True) for v in value]
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("\n...").strip()


def main(argv: list[str] | None = None) -> int:
    """Write the rendered file to the path given (default: docs/configuration.md)."""
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0] if argv else "docs/configuration.md")
    path.write_text(render(), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
