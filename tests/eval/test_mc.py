import pytest

import tuneforge.eval.mc as mc
from tuneforge.data.conversation import Message
from tuneforge.eval.items import EvalItem
from tuneforge.eval.scoring import ContinuationScore, continuation_logprobs
from tuneforge.models.generate import render_chat


def item(choices, answer):
    return EvalItem(prompt=[Message("user", "Pick one")], reference=choices[answer], choices=choices,
                    answer_index=answer)


def test_end_of_turn_is_the_template_marker(tiny_tokenizer):
    assert mc.end_of_turn_ids(tiny_tokenizer) == [tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_options_are_scored_as_the_whole_reply(tiny_model, tiny_tokenizer):
    it = item(["apple", "dog"], 1)
    result = mc.score_choices(tiny_model, tiny_tokenizer, [it])[0]
    ctx = tiny_tokenizer(render_chat(tiny_tokenizer, it.prompt), add_special_tokens=False)["input_ids"]
    eot = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    expected = [continuation_logprobs(tiny_model, [(ctx, tiny_tokenizer(c, add_special_tokens=False)["input_ids"]
                                                    + [eot])])[0].logprob for c in it.choices]
    assert result.logprobs == pytest.approx(expected, abs=1e-4)
    assert result.picked == max(range(2), key=expected.__getitem__)


def test_sum_and_length_normalized_picks(monkeypatch, tiny_model, tiny_tokenizer):
    # "a" has the higher total log-prob; per character "bbbbbbbb" is likelier
    fake = {1: -2.0, 8: -4.0}

    def fake_scores(model, pairs, pad_id=0, batch_size=32):
        return [ContinuationScore(fake[len(cont) - 1], len(cont), False) for _, cont in pairs]

    monkeypatch.setattr(mc, "continuation_logprobs", fake_scores)
    items = [item(["a", "bbbbbbbb"], 0), item(["a", "bbbbbbbb"], 1)]
    monkeypatch.setattr(mc, "encode_prompts", lambda tok, prompts, system=None: [[1]] * len(prompts))

    class Tok:
        pad_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [7] * len(text)}

    monkeypatch.setattr(mc, "end_of_turn_ids", lambda tok: [2])
    results = mc.score_choices(tiny_model, Tok(), items)
    assert [r.picked for r in results] == [0, 0]
    assert [r.picked_norm for r in results] == [1, 1]
    acc, acc_norm = mc.choice_hits(results, items)
    assert acc == [True, False] and acc_norm == [False, True]
