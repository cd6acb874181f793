"""eval's output folder is never overwritten silently; loss on plain text (perplexity) needs no reference."""

import pytest

from tuneforge.errors import ConfigError
from tuneforge.eval.run import check_metrics, check_output
from tuneforge.eval.sources import load_items


def test_new_or_empty_output_is_fine(tmp_path):
    check_output(tmp_path / "new", overwrite=False)
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", overwrite=False)


def test_earlier_evaluation_needs_overwrite(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(ConfigError, match="--overwrite"):
        check_output(tmp_path, overwrite=False)
    check_output(tmp_path, overwrite=True)


def test_a_folder_that_is_not_an_evaluation_is_never_replaced(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a tuneforge evaluation"):
        check_output(tmp_path, overwrite=True)


def test_loss_on_plain_text_needs_no_reference(tmp_path):
    text = tmp_path / "general.txt"
    text.write_text("The river runs past the mill.\n\nA library is a quiet place.\n")
    check_metrics(["loss"], load_items(str(text)), None, None)
    with pytest.raises(Exception, match="reference"):
        check_metrics(["exact"], load_items(str(text)), None, None)


def test_cli_eval_twice_needs_overwrite(tiny_model_dir, tmp_path, capsys):
    from tuneforge.cli import main

    text = tmp_path / "general.txt"
    text.write_text("Hello world. The quick brown fox jumps over the lazy dog.\n")
    args = ["eval", "--model", str(tiny_model_dir), "--data", str(text), "--metric", "loss", "-o", str(tmp_path / "o")]
    assert main(args) == 0
    assert "ppl" in capsys.readouterr().out  # perplexity of plain text
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
