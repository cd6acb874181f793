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



def test_yaml_aliases_are_refused_before_they_expand(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True)))
    with pytest.raises(ConfigError, match=r"bomb.yaml: not valid YAML.*aliases \(\*a\) are not allowed"):
        load_config(bomb)
    with pytest.raises(ConfigError, match="aliases"):
        load_config(None, ["train.lr=*x"])


def test_numbers_refuse_booleans_and_lists_of_numbers_too():
    for override in ("train.batch_size=true", "train.lr=false", "method.freeze.layers=[true]"):
        with pytest.raises(ConfigError, match="expected a number, got a boolean"):
            load_config(None, [override])
    assert load_config(None, ["train.gradient_checkpointing=true"]).train.gradient_checkpointing is True


def test_non_utf8_config_and_a_dataset_without_its_list(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes(b"model: m\noutput_dir: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"c.yaml:2: byte 0xe9 is not UTF-8"):
        load_config(p)
    assert load_config(None, ["data.train={path: a.jsonl, format: alpaca}"]).data.train[0].format == "alpaca"
