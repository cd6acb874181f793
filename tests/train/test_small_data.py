"""Small data: the warnings a run on few rows gives, and what the summary says about the base and processes."""

from types import SimpleNamespace

from tuneforge.config import load_config
from tuneforge.train.loop import TrainResult, base_weights_text, small_data_warnings, summary_table, total_steps


def fake_data(rows: int, n_val: int):
    from tuneforge.data.dataset import TrainData

    data = TrainData.__new__(TrainData)
    data.train_rows, data.n_val_examples = [SimpleNamespace()] * rows, n_val
    return data


def test_fifty_rows_warns_of_one_step_and_a_tiny_validation_set():
    config = load_config(None, ["train.batch_size=8"])
    data = fake_data(rows=6, n_val=2)
    warnings = small_data_warnings(config, data, total_steps(config, 6))
    assert "only 1 optimizer step(s)" in warnings[0] and "train.epochs=20" in warnings[0]
    assert "2 example(s)" in warnings[1]


def test_a_long_enough_run_with_a_real_validation_set_is_quiet():
    config = load_config(None, ["train.max_steps=100"])
    assert small_data_warnings(config, fake_data(rows=60, n_val=40), 100) == []


def test_summary_says_4_bit_base_and_processes():
    qlora = load_config(None, ["method.name=qlora"])
    assert base_weights_text(qlora) == "4-bit nf4 (double quant), quantized on load"
    assert base_weights_text(load_config(None, [])) == "as loaded"
    r = TrainResult(run_dir="r", steps=1, final_loss=1.0, val_loss=None, trained_tokens=1, seconds=1.0,
                    trainable=1, total=2, output="o", base_weights=base_weights_text(qlora), processes=2)
    table = summary_table(r)
    assert "4-bit nf4" in table and "2 (torchrun)" in table
