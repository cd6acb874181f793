"""docs/configuration.md is generated from the config models; this fails when the two drift apart."""

from pathlib import Path

from pydantic import BaseModel

from tuneforge.config_docs import COMMANDS, REGENERATE, render

DOCS = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def test_configuration_md_matches_the_models():
    assert DOCS.is_file(), f"docs/configuration.md is missing: run `{REGENERATE}`"
    assert DOCS.read_text(encoding="utf-8") == render(), (
        f"docs/configuration.md is out of date with src/tuneforge/config.py: run `{REGENERATE}` and commit it")


def _models(schema: type[BaseModel], seen: set) -> set:
    if schema in seen:
        return seen
    seen.add(schema)
    for field in schema.model_fields.values():
        for cls in _classes(field.annotation):
            _models(cls, seen)
    return seen


def _classes(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [c for arg in getattr(annotation, "__args__", ()) for c in _classes(arg)]


def test_every_key_has_a_description_and_every_command_a_table():
    models = set().union(*(_models(schema, set()) for _, schema in COMMANDS))
    missing = [f"{m.__name__}.{name}" for m in models for name, f in m.model_fields.items() if not f.description]
    assert not missing, f"add Field(description=...) to {missing}"
    text = render()
    for command, schema in COMMANDS:
        assert f"## {command} (`{schema.__name__}`)" in text
    assert "| `train.report_to` | list[tensorboard \\| wandb \\| mlflow \\| trackio] | `[]` |" in text
