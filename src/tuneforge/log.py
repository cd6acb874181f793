"""One logging path for every module: ``logging`` under the ``tuneforge`` name, rank 0 only under torchrun.

Progress bars (tqdm) show progress; everything else a user should read goes through :func:`get_logger`.
A command's own result (a table, a path) is its output and goes to stdout with :func:`emit`.
"""

from __future__ import annotations

import logging
import os
import sys

_ROOT = "tuneforge"


class _StderrHandler(logging.StreamHandler):
    """Writes to the current ``sys.stderr`` (tests and tools replace it after start-up)."""

    @property
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


class _MainRankOnly(logging.Filter):
    """Under torchrun every process runs the same code; only rank 0 speaks."""

    def filter(self, record: logging.LogRecord) -> bool:
        return os.environ.get("RANK", "0") == "0"


def get_logger(name: str) -> logging.Logger:
    """The logger of a module (pass ``__name__``); messages print as ``[tuneforge] ...``."""
    root = logging.getLogger(_ROOT)
    if not root.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[tuneforge] %(message)s"))
        handler.addFilter(_MainRankOnly())
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
    return logging.getLogger(name if name.startswith(_ROOT) else f"{_ROOT}.{name}")


def set_quiet(quiet: bool) -> None:
    """Silence informational messages (warnings and errors still print)."""
    get_logger(_ROOT).setLevel(logging.WARNING if quiet else logging.INFO)


def emit(text: str) -> None:
    """A command's result on stdout (rank 0 only), separate from log messages on stderr."""
    if os.environ.get("RANK", "0") == "0":
        print(text, flush=True)
