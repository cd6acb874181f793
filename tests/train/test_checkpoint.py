import json

import torch

from tuneforge.train.checkpoint import damage, latest_checkpoint, load_checkpoint, save_checkpoint


def test_checkpoint_round_trip_and_temp_dirs_ignored(tmp_path):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched.step()
    save_checkpoint(tmp_path, 3, model, opt, sched, {"loss": 1.0})
    (tmp_path / "checkpoints" / ".step-9.tmp").mkdir()  # a write killed half-way
    assert latest_checkpoint(tmp_path).name == "step-3"
    expected = torch.randn(5)

    fresh = torch.nn.Linear(4, 3)
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 / (s + 1))
    torch.manual_seed(123)
    state = load_checkpoint(latest_checkpoint(tmp_path), fresh, opt2, sched2)
    assert state["step"] == 3
    torch.testing.assert_close(fresh.weight, model.weight)
    assert sched2.last_epoch == sched.last_epoch
    torch.testing.assert_close(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    torch.testing.assert_close(torch.randn(5), expected)  # RNG restored to the saved point


def test_a_checkpoint_carries_a_manifest_and_damage_is_named(tmp_path):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for step in (2, 4):
        save_checkpoint(tmp_path, step, model, opt, sched, {"loss": 1.0})
    newest = tmp_path / "checkpoints" / "step-4"
    manifest = json.loads((newest / "manifest.json").read_text())["files"]
    assert set(manifest) == {"trainable.safetensors", "state.pt", "trainer.json"}
    assert all(v["bytes"] == (newest / k).stat().st_size for k, v in manifest.items())
    assert damage(newest) is None
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")] == []  # no temp left
    state = (newest / "state.pt").read_bytes()
    (newest / "state.pt").write_bytes(state[:-10])
    assert "truncated" in damage(newest)
    assert latest_checkpoint(tmp_path).name == "step-2"
