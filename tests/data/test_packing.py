"""Packing: rows, batches and the block-causal mask give each example the logits it has alone."""

from __future__ import annotations

import pytest
import torch

from tuneforge.data.conversation import Tokenized
from tuneforge.data.packing import (
    IGNORE,
    PAD_SEQ_ID,
    collate,
    no_pack,
    pack,
    unpack,
)
from tuneforge.errors import DataError
from tuneforge.train.attention import block_causal_mask, model_inputs


def _ex(n: int, start: int = 3, name: str = "x") -> Tokenized:
    ids = [(start + i) % 300 + 3 for i in range(n)]
    return Tokenized(input_ids=ids, labels=list(ids), source=f"{name}.jsonl:{n}")


def _alone_logits(model, ex: Tokenized) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ex.input_ids])).logits[0]


def test_packed_logits_equal_logits_alone(tiny_model):
    examples = [_ex(7, 10), _ex(19, 50), _ex(4, 90)]
    rows = pack(examples, max_len=64)
    assert len(rows) == 1 and rows[0].lengths == [7, 19, 4]
    batch = collate(rows, pad_id=0)
    with torch.no_grad():
        logits = tiny_model(**model_inputs(batch)).logits[0]
    start = 0
    for ex in examples:
        n = len(ex.input_ids)
        torch.testing.assert_close(logits[start:start + n], _alone_logits(tiny_model, ex), atol=1e-5, rtol=0)
        start += n
    # Without the mask, examples would see each other: the check above is not vacuous.
    with torch.no_grad():
        leaky = tiny_model(input_ids=batch["input_ids"]).logits[0]
    assert not torch.allclose(leaky[7:26], _alone_logits(tiny_model, examples[1]), atol=1e-3)


def test_packed_logits_equal_logits_alone_with_padding(tiny_model):
    examples = [_ex(5, 1), _ex(11, 40), _ex(9, 80), _ex(13, 120), _ex(3, 200)]
    rows = pack(examples, max_len=20)
    batch = collate(rows, pad_id=0)
    assert batch["input_ids"].shape[0] == len(rows) >= 2
    assert (batch["seq_ids"] == PAD_SEQ_ID).any()
    with torch.no_grad():
        logits = tiny_model(**model_inputs(batch)).logits
    found = 0
    for b, row in enumerate(rows):
        start = 0
        for n, source in zip(row.lengths, row.sources, strict=True):
            ex = next(e for e in examples if e.source == source)
            torch.testing.assert_close(logits[b, start:start + n], _alone_logits(tiny_model, ex),
                                       atol=1e-5, rtol=0)
            start += n
            found += 1
    assert found == len(examples)
    assert not torch.isnan(logits).any()


def test_no_pack_rows_pad_to_batch_max_and_match_alone(tiny_model):
    examples = [_ex(6, 5), _ex(15, 60)]
    rows = no_pack(examples)
    batch = collate(rows, pad_id=0)
    assert batch["input_ids"].shape == (2, 15)
    assert batch["labels"][0, 6:].eq(IGNORE).all() and batch["input_ids"][0, 6:].eq(0).all()
    with torch.no_grad():
        logits = tiny_model(**model_inputs(batch)).logits
    torch.testing.assert_close(logits[0, :6], _alone_logits(tiny_model, examples[0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[1], _alone_logits(tiny_model, examples[1]), atol=1e-5, rtol=0)


def test_positions_restart_and_first_labels_masked():
    a, b = _ex(3, 10), _ex(4, 20)
    b.labels[2] = IGNORE
    [row] = pack([a, b], max_len=8)
    assert row.position_ids == [0, 1, 2, 0, 1, 2, 3]
    assert row.seq_ids == [0, 0, 0, 1, 1, 1, 1]
    assert row.input_ids == a.input_ids + b.input_ids
    assert row.labels == [IGNORE] + a.labels[1:] + [IGNORE, b.labels[1], IGNORE, b.labels[3]]


def test_first_fit_in_order_is_deterministic_and_conserves_everything():
    lengths = [9, 3, 8, 2, 7, 5, 10, 1, 6, 4, 10, 10]
    examples = [_ex(n, i * 7, name=f"e{i}") for i, n in enumerate(lengths)]
    rows = pack(examples, max_len=10)
    assert [r.lengths for r in rows] == [[9, 1], [3, 2, 5], [8], [7], [10], [6, 4], [10], [10]]
    assert pack(examples, max_len=10) == rows
    assert sorted(s for r in rows for s in r.sources) == sorted(e.source for e in examples)
    assert all(len(r) <= 10 for r in rows)
    assert sum(len(r) for r in rows) == sum(lengths)
    assert sum(1 for r in rows for lab in r.labels if lab != IGNORE) == sum(n - 1 for n in lengths)


def test_pack_many_examples_fast_and_complete():
    examples = [_ex(1 + (i * 37) % 200, i) for i in range(5000)]
    rows = pack(examples, max_len=256)
    assert sum(len(r.lengths) for r in rows) == 5000
    assert sum(len(r) for r in rows) == sum(len(e.input_ids) for e in examples)
    assert sum(len(r) for r in rows) / (256 * len(rows)) > 0.95


def test_too_long_example_is_a_data_error():
    with pytest.raises(DataError, match=r"x.jsonl:12.*12 tokens.*max_len 10.*data.max_seq_len"):
        pack([_ex(5), _ex(12)], max_len=10)
    with pytest.raises(DataError, match="x.jsonl:12"):
        no_pack([_ex(12)], max_len=10)


def test_collate_pads_and_block_mask_blocks_examples_and_padding():
    rows = pack([_ex(2, 1), _ex(3, 2)], max_len=5) + no_pack([_ex(2, 9)])
    batch = collate(rows, pad_id=7)
    assert batch["input_ids"][1].tolist()[2:] == [7, 7, 7]
    assert batch["labels"][1].tolist() == [IGNORE, batch["input_ids"][1, 1].item(), IGNORE, IGNORE, IGNORE]
    assert batch["position_ids"][1].tolist() == [0, 1, 0, 1, 2]
    assert batch["seq_ids"][1].tolist() == [0, 0, -1, -1, -1]
    mask = block_causal_mask(batch["seq_ids"])
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.bool
    expected = torch.tensor([[1, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0],
                             [0, 0, 1, 0, 0],
                             [0, 0, 1, 1, 0],
                             [0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask[0, 0], expected)
    assert torch.equal(mask[1, 0], expected)  # padding attends only to padding


def test_unpack_gives_the_unpacked_batch():
    exs = [_ex(5, name="a"), _ex(3, start=9, name="b"), _ex(6, start=20, name="c"), _ex(2, start=40, name="d")]
    rows = pack(exs, 8)
    assert [r.sources for r in rows] == [["a.jsonl:5", "b.jsonl:3"], ["c.jsonl:6", "d.jsonl:2"]]
    expected = collate(no_pack(exs), pad_id=0)
    got = unpack(collate(rows, pad_id=0))
    for key in ("input_ids", "labels", "position_ids", "seq_ids"):
        assert torch.equal(got[key], expected[key]), key
