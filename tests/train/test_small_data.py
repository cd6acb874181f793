"""Small data: the warnings a run on few rows gives, and what the summary says about the base and processes."""

from types import SimpleNamespace

from tuneforge.config import load_config
from tuneforge.data.dataset import validation_count
from tuneforge.train.loop import (
    TrainResult,
    base_weights_text,
    epochs_for,
    small_data_warnings,
    summary_table,
    total_steps,
)


def fake_data(rows: int, n_val: int):
    from tuneforge.data.dataset import TrainData

    data = TrainData.__new__(TrainData)
    data.train_rows, data.n_val_examples = [SimpleNamespace()] * rows, n_val
    return data


def test_fifty_rows_warns_of_one_step_and_a_tiny_validation_set():
    config = load_config(None, ["train.batch_size=8", "train.epochs=1", "data.val_fraction=0.05"])
    data = fake_data(rows=6, n_val=2)
    warnings = small_data_warnings(config, data, total_steps(config, 6))
    assert "only 1 optimizer step(s)" in warnings[0] and "train.epochs=20" in warnings[0]
    assert "2 example(s)" in warnings[1]


def test_unset_epochs_follow_the_data_size():
    config = load_config(None, ["train.batch_size=8"])
    assert epochs_for(config, 6) == 10 and total_steps(config, 6) == 10  # 1 step an epoch: at most 10 passes
    assert epochs_for(config, 80) == 10 and total_steps(config, 80) == 100  # 10 steps an epoch: 100 steps
    assert epochs_for(config, 200) == 4 and total_steps(config, 200) == 100
    assert epochs_for(config, 8000) == 1 and total_steps(config, 8000) == 1000  # big data: one pass
    assert total_steps(load_config(None, ["train.epochs=2"]), 80) == 20  # a set value wins
    assert total_steps(load_config(None, ["train.max_steps=7"]), 80) == 7


def test_unset_val_fraction_follows_the_data_size():
    assert validation_count(None, 99) == 0  # small sets keep every example for training
    assert validation_count(None, 100) == 10 and validation_count(None, 1000) == 50
    assert validation_count(None, 100_000) == 1000
    assert validation_count(0.05, 50) == 2 and validation_count(0.05, 19) == 0 and validation_count(0.0, 500) == 0


def test_no_validation_set_on_small_data_is_said():
    config = load_config(None, ["train.max_steps=100"])
    assert "no validation set" in small_data_warnings(config, fake_data(rows=60, n_val=0), 100)[0]
    assert small_data_warnings(load_config(None, ["train.max_steps=100", "data.val_fraction=0"]),
                               fake_data(rows=60, n_val=0), 100) == []


def test_a_long_enough_run_with_a_real_validation_set_is_quiet():
    config = load_config(None, ["train.max_steps=100"])
    assert small_data_warnings(config, fake_data(rows=60, n_val=40), 100) == []


def test_summary_says_4_bit_base_and_processes():
    qlora = load_config(None, ["method.name=qlora"])
    assert base_weights_text(qlora) == "4-bit nf4 (double quant), quantized on load"
    assert base_weights_text(load_config(None, [])) == "as loaded"
    fp8 = load_config(None, ["method.name=qlora", "method.lora.base_precision=fp8"])
    assert base_weights_text(fp8).endswith("quantized on load, FP8 compute (e4m3 codes made per GEMM)")
    r = TrainResult(run_dir="r", steps=1, final_loss=1.0, val_loss=None, trained_tokens=1, seconds=1.0,
                    trainable=1, total=2, output="o", base_weights=base_weights_text(qlora), processes=2)
    table = summary_table(r)
    assert "4-bit nf4" in table and "2 (torchrun)" in table
