"""Sharded loading decisions (the two-process runs themselves are in test_distributed.py)."""

from tuneforge.config import load_config
from tuneforge.train import sharding


def test_under_torchrun_only_rank_0_loads_weights(monkeypatch, tmp_path):
    config = load_config(overrides=[f"output_dir={tmp_path}", "method.name=full"])
    assert sharding.load_placement(config, model_given=False) == "device"  # one process
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert sharding.load_placement(config, model_given=False) == "host"
    assert sharding.load_placement(config, model_given=True) == "device"
    monkeypatch.setenv("RANK", "1")
    assert sharding.load_placement(config, model_given=False) == "meta"
    config.method.name = "qlora"  # every process holds the 4-bit codes anyway
    assert sharding.load_placement(config, model_given=False) == "device"
