"""The project's own error type: a user mistake with a message that says where and how to fix it."""


class TuneforgeError(Exception):
    """A problem the user can fix (config, data, paths, resources).

    The CLI prints the message without a traceback and exits non-zero.
    """


class DataError(TuneforgeError):
    """A bad record or data file; the message names the file and line (or key)."""


class ConfigError(TuneforgeError):
    """A bad config key or value; the message names the key."""


class ModelError(TuneforgeError):
    """A model reference that cannot be resolved or loaded."""


class StopTraining(TuneforgeError):  # noqa: N818 (a signal, not a failure of the user's)
    """Raised by a training callback to end the run early; the run saves what it has."""
