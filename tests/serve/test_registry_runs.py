"""The server's registry over a folder of run directories: each run's adapter is served under the run's name."""

import copy
import json

import pytest

from lora_helpers import make_adapter
from tuneforge.adapters.manager import AdapterSet
from tuneforge.serve.protocol import APIError
from tuneforge.serve.registry import AdapterRegistry


@pytest.fixture
def runs(tiny_model, tmp_path):
    root = tmp_path / "runs"
    make_adapter(tiny_model, root / "exp1" / "adapter", ["q_proj", "v_proj"], 4, 1)
    make_adapter(tiny_model, root / "plain", ["q_proj"], 2, 2)
    (root / "running").mkdir(parents=True)
    (root / "running" / "tuneforge-run.json").write_text(json.dumps({"status": "running"}))
    bad = make_adapter(tiny_model, root / "bad" / "adapter", ["q_proj"], 2, 3)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps(config | {"rank_pattern": 5}))
    return root


def test_runs_are_served_by_run_name_and_follow_new_adapters(runs, tiny_model, tiny_tokenizer):
    registry = AdapterRegistry(AdapterSet(copy.deepcopy(tiny_model), tiny_tokenizer), runs, "tiny")
    registry.sync()
    assert registry.adapters == ["exp1", "plain"]
    assert list(registry.errors) == ["bad"]
    assert registry.errors["bad"].startswith("bad/adapter/adapter_config.json: rank_pattern=5")
    with registry.lease("exp1") as first:
        assert first is not None
    # the running run saves its adapter, and exp1 is retrained (save_adapter swaps the folder atomically)
    make_adapter(tiny_model, runs / "running" / "adapter", ["v_proj"], 2, 4)
    make_adapter(tiny_model, runs / "exp1" / "adapter", ["q_proj", "v_proj"], 8, 5)
    with registry.lease("running") as key:
        assert key is not None
    with registry.lease("exp1") as second:
        assert second != first and registry.adapter_set.info(second).r == 8
    with pytest.raises(APIError, match="could not be loaded: bad/adapter/adapter_config.json: rank_pattern=5"):
        registry.lookup("bad")
