import pytest

from tuneforge.config import DatasetSpec, load_config
from tuneforge.data.dataset import build_training_data, read_spec
from tuneforge.errors import ConfigError, DataError


def test_spec_tasks_keeps_only_matching_tasks():
    examples, _ = read_spec(DatasetSpec(path="builtin:tasks", tasks=["upper", "extract_*"]), False, 0)
    assert {e.task for e in examples} == {"upper", "extract_email", "extract_number", "extract_name"}
    with pytest.raises(ConfigError, match=r"tasks.*no example has task \['nope'\]"):
        read_spec(DatasetSpec(path="builtin:tasks", tasks=["nope"]), False, 0)


def test_build_training_data_mixes_holds_out_and_packs(alpaca_file, tiny_tokenizer):
    cfg = load_config(overrides=[f"data.train=[{alpaca_file}, {{path: 'builtin:tasks', tasks: [upper]}}]",
                                 "data.holdout_tasks=[upper]", "data.val_fraction=0.1", "data.max_seq_len=128"])
    data = build_training_data(cfg.data, tiny_tokenizer)
    assert len(data.held_out) == 40 and all(e.task == "upper" for e in data.held_out)
    assert data.n_train_examples + data.n_val_examples == 40
    assert sum(len(r.lengths) for r in data.train_rows) == data.n_train_examples
    assert all(len(r.input_ids) <= 128 for r in data.train_rows)


def test_too_long_examples_stop_the_run_or_are_reported(alpaca_file, tiny_tokenizer):
    cfg = load_config(overrides=[f"data.train=[{alpaca_file}]", "data.max_seq_len=16", "data.val_fraction=0"])
    with pytest.raises(DataError, match=r"alpaca.jsonl:1.*longer than max_len 16"):
        build_training_data(cfg.data, tiny_tokenizer)
    cfg.data.skip_bad = True
    with pytest.raises(DataError, match="no training examples are left"):
        build_training_data(cfg.data, tiny_tokenizer)


def test_replay_mixes_general_text_rows_into_training(alpaca_file, tiny_tokenizer, tmp_path):
    general = tmp_path / "general.txt"
    general.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    base = load_config(overrides=[f"data.train=[{alpaca_file}]", "data.val_fraction=0", "data.max_seq_len=64"])
    plain = build_training_data(base.data, tiny_tokenizer)
    base.data.replay = {"path": str(general), "ratio": 0.5}
    mixed = build_training_data(base.data, tiny_tokenizer)
    assert len(mixed.train_rows) == len(plain.train_rows) + -(-len(plain.train_rows) // 2)
    assert any("(replay)" in k for k in mixed.per_source)
