"""`tuneforge chat` reads multi-line messages: a trailing backslash continues, triple quotes wrap a block."""

from tuneforge.eval.interactive import read_message


def reader(lines):
    it = iter(lines)

    def read(prompt):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None
    return read


def test_one_line():
    assert read_message(reader(["Upper-case: pear"])) == "Upper-case: pear"


def test_backslash_continues():
    assert read_message(reader(["Summarize:\\", "line one\\", "line two", "next"])) == "Summarize:\nline one\nline two"


def test_triple_quotes_keep_blank_lines():
    assert read_message(reader(['"""', "def f():", "", "    return 1", '"""'])) == "def f():\n\n    return 1"


def test_empty_line_and_eof_end_the_chat():
    assert read_message(reader([""])) is None
    assert read_message(reader([])) is None
    assert read_message(reader(['"""', "unclosed"])) == "unclosed"  # Ctrl-D inside a block sends what was typed
