"""The DPO demo's reply measures: what "holds the right answer" and "bare" mean on greedy replies."""

from tuneforge.demo import reply_measures


def test_reply_measures_hold_bare_and_length():
    preds = ["frozen", "The last word is frozen.", "Pillow", "2 + 10 = 11"]
    refs = ["frozen", "frozen", "PILLOW", "12"]
    held, bare, words = reply_measures(preds, refs)
    assert held == 0.75  # case and punctuation ignored; "11" does not hold "12"
    assert bare == 0.5  # "frozen" and "Pillow" are no longer than their answers
    assert words == 3.0


def test_reply_measures_count_a_padded_multiword_answer_as_not_bare():
    held, bare, _ = reply_measures(["castle, saddle", "Sure: castle, saddle"], ["castle, saddle"] * 2)
    assert (held, bare) == (1.0, 0.5)


def test_reply_measures_empty():
    assert reply_measures([], []) == (0.0, 0.0, 0.0)
