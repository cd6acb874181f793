"""The one conversation form every dataset format is normalized to."""

from __future__ import annotations

from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")


@dataclass
class Message:
    """One turn. ``train`` overrides the default loss mask (assistant turns trained) when set."""

    role: str
    content: str
    train: bool | None = None


@dataclass
class Example:
    """A normalized training example.

    Either ``messages`` (a conversation) or ``text`` (plain text for continued pre-training).
    ``source`` is ``file:line`` (or ``builtin:tasks#i``) for error messages; ``task`` names the task
    or dataset, for mixtures, held-out tasks and per-task evaluation.
    """

    messages: list[Message] = field(default_factory=list)
    text: str | None = None
    source: str = ""
    task: str | None = None


@dataclass
class Tokenized:
    """Token ids and labels (-100 where no loss) of one example."""

    input_ids: list[int]
    labels: list[int]
    source: str = ""
    task: str | None = None

    @property
    def n_trained(self) -> int:
        return sum(1 for x in self.labels if x != -100)
