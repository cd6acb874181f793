from tuneforge.eval.metrics import contains_match, json_equal, json_schema_match, json_valid, regex_match
from tuneforge.eval.schema import schema_errors

SCHEMA = {"type": "object", "required": ["name", "age"], "additionalProperties": False,
          "properties": {"name": {"type": "string", "minLength": 1}, "age": {"type": "integer", "minimum": 0},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}}}}


def test_contains_is_whole_word_and_normalized():
    assert contains_match("The sentiment is Positive.", "positive")
    assert not contains_match("The sentiment is unpositive", "positive")
    assert not contains_match("anything", "")


def test_regex_is_a_full_match():
    assert regex_match(" 2024-05-01\n", r"\d{4}-\d{2}-\d{2}")
    assert not regex_match("Date: 2024-05-01", r"\d{4}-\d{2}-\d{2}")


def test_json_metrics():
    assert json_valid(' {"a": 1} ') and not json_valid('```json\n{"a": 1}\n```') and not json_valid("{a: 1}")
    assert json_equal('{"b": 2, "a": 1}', '{"a":1,"b":2}')
    assert not json_equal('{"a": 1}', '{"a": 2}')
    assert not json_equal("not json", "not json")


def test_json_schema():
    assert json_schema_match('{"name": "Ann", "age": 3}', SCHEMA)
    assert json_schema_match('{"name": "Ann", "age": 3, "tags": ["a"]}', SCHEMA)
    assert not json_schema_match('{"name": "Ann"}', SCHEMA)
    assert not json_schema_match('{"name": "Ann", "age": -1}', SCHEMA)
    assert not json_schema_match('{"name": "Ann", "age": 3, "x": 1}', SCHEMA)
    assert not json_schema_match('{"name": "Ann", "age": true}', SCHEMA)
    assert not json_schema_match('{"name": "Ann", "age": 3, "tags": ["c"]}', SCHEMA)
    assert not json_schema_match("[1, 2]", SCHEMA)


def test_schema_errors_name_the_path():
    errors = schema_errors({"name": "", "age": "3"}, SCHEMA)
    assert any("$.age" in e for e in errors) and any("$.name" in e for e in errors)
    assert schema_errors(3, {"anyOf": [{"type": "string"}, {"type": "integer"}]}) == []
    assert schema_errors(3.5, {"oneOf": [{"type": "string"}, {"type": "integer"}]})
