import pytest

from tuneforge.config import load_config
from tuneforge.errors import ConfigError


def test_defaults_per_method():
    assert load_config().lr == 2e-4
    assert load_config(overrides=["method.name=full"]).lr == 1e-5
    assert load_config(overrides=["train.lr=3e-4", "method.name=full"]).lr == 3e-4


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("model: m\ndata:\n  train: [a.jsonl, {path: b.csv, weight: 2}]\nmethod:\n  lora: {r: 4}\n")
    c = load_config(p, ["method.lora.alpha=8"])
    assert [s.path for s in c.data.train] == ["a.jsonl", "b.csv"] and c.data.train[1].weight == 2
    assert (c.method.lora.r, c.method.lora.alpha) == (4, 8)


@pytest.mark.parametrize("override, key", [("train.lrr=1", "train.lrr"), ("train.lr=-1", "train.lr"),
                                          ("method.name=dora", "method.name")])
def test_bad_keys_and_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=[override])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)

