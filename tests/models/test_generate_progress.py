"""Generation shows a progress bar with an ETA on stderr (several batches), and none under --quiet."""

from tuneforge.data.conversation import Message
from tuneforge.log import set_quiet
from tuneforge.models.generate import generate

CHATS = [[Message("user", f"Upper-case: word{i}")] for i in range(6)]


def test_progress_bar_with_eta_over_several_batches(tiny_model, tiny_tokenizer, capsys):
    generate(tiny_model, tiny_tokenizer, CHATS, max_new_tokens=2, batch_size=2)
    err = capsys.readouterr().err
    assert "generate:" in err and "/6 [00:00<" in err  # tqdm's "n/total [elapsed<remaining"


def test_quiet_and_single_batch_show_no_bar(tiny_model, tiny_tokenizer, capsys):
    generate(tiny_model, tiny_tokenizer, CHATS, max_new_tokens=2, batch_size=16)
    assert "generate" not in capsys.readouterr().err
    set_quiet(True)
    try:
        generate(tiny_model, tiny_tokenizer, CHATS, max_new_tokens=2, batch_size=2)
    finally:
        set_quiet(False)
    assert "generate" not in capsys.readouterr().err
