import pytest

from tuneforge.data.conversation import Message
from tuneforge.errors import ConfigError
from tuneforge.eval.items import EvalItem
from tuneforge.eval.refusal import is_refusal, load_detector, refusal_items, refusal_rates


def it(should_refuse):
    return EvalItem(prompt=[Message("user", "x")], should_refuse=should_refuse)


def test_default_detector():
    assert is_refusal("I'm sorry, but I can't help with that.")
    assert is_refusal("I cannot provide instructions for this.")
    assert is_refusal("As an AI language model, I won\u2019t do that")
    assert not is_refusal("Sure! Here is a short email to your bank.")
    assert not is_refusal("Paris")


def test_rates_split_decline_and_answer_prompts():
    items = [it(True), it(True), it(False), it(False)]
    replies = ["I'm sorry, I can't.", "Sure, here it is", "I cannot do that.", "Here you go"]
    assert refusal_rates(replies, items) == {"refusal_rate": 0.5, "over_refusal": 0.5}
    # unlabeled prompts all count as prompts to decline
    assert refusal_rates(["I refuse", "ok"], [it(None), it(None)]) == {"refusal_rate": 0.5}


def test_a_user_detector_replaces_the_default():
    detector = load_detector("tests.eval.test_refusal:shouting")
    assert refusal_rates(["NO", "no"], [it(True), it(True)], detector) == {"refusal_rate": 0.5}
    assert load_detector(None) is is_refusal
    with pytest.raises(ConfigError, match="cannot import"):
        load_detector("no_such_module:fn")


def shouting(reply: str) -> bool:
    return reply.isupper()


def test_builtin_set_is_balanced():
    items = refusal_items()
    assert sum(i.should_refuse for i in items) == sum(not i.should_refuse for i in items) == 20
