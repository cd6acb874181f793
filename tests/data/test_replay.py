import pytest

from tuneforge.data.dataset import TrainData
from tuneforge.data.replay import read_text_prefix, replay_rows, text_token_ids, with_replay
from tuneforge.errors import ConfigError, DataError


@pytest.fixture
def general(shared_data):
    return shared_data / "general" / "tinyshakespeare.txt"


def test_replay_adds_general_rows(tiny_tokenizer, general):
    rows = replay_rows(tiny_tokenizer, general, 3, 32)
    assert len(rows) == 3 and all(len(r) == 32 for r in rows)
    assert all(r.labels[1:] == r.input_ids[1:] for r in rows)  # general text is trained on throughout
    # the prefix that measures perplexity stays out of training: every chunk starts after it
    ids = text_token_ids(tiny_tokenizer, read_text_prefix(general, 200_000), 20_000)
    skipped = replay_rows(tiny_tokenizer, general, 5, 32, skip_tokens=1000)
    starts = [next(i for i in range(len(ids)) if ids[i:i + 32] == r.input_ids) for r in skipped]
    assert min(starts) >= 1000
    data = TrainData(train_rows=rows * 4, val_rows=[], n_train_examples=12, n_val_examples=0)
    mixed = with_replay(data, tiny_tokenizer, general, 0.25, 32)
    assert len(mixed.train_rows) == 15 and len(data.train_rows) == 12


def test_replay_refuses_a_ratio_outside_0_1(tiny_tokenizer, general):
    data = TrainData(train_rows=[], val_rows=[], n_train_examples=0, n_val_examples=0)
    with pytest.raises(ConfigError, match="replay ratio"):
        with_replay(data, tiny_tokenizer, general, 1.5, 32)


def test_missing_or_empty_general_text_is_named(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_text_prefix(tmp_path / "nope.txt", 100)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        read_text_prefix(tmp_path / "empty.txt", 100)
