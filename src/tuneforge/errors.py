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


# Messages of torch errors that a user's setting causes (a device that is not there), not a bug of ours.
_DEVICE_ERRORS = ("Torch not compiled with CUDA enabled", "No CUDA GPUs are available", "invalid device ordinal",
                  "Expected one of cpu, cuda", "CUDA driver", "no kernel image is available",
                  "CUDA out of memory", "MPS backend out of memory")


def user_error_message(e: BaseException) -> str | None:
    """The one-line message of an exception the user can fix (bad input, paths, resources), or None for a bug.

    User errors: :class:`TuneforgeError`; ``OSError`` (a path, permissions, a full disk); YAML and decoding
    errors of the user's files; ``MemoryError`` and out-of-memory errors; torch errors about a device the user
    asked for. Anything else is a bug in tuneforge.
    """
    if isinstance(e, TuneforgeError):
        return str(e)
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return (f"out of memory ({e or type(e).__name__}); lower train.batch_size or data.max_seq_len, use "
                "method qlora or gradient checkpointing, or see `tuneforge plan`")
    if isinstance(e, OSError):
        where = f"'{e.filename}'" if e.filename is not None else "a file"
        return f"{where}: {e.strerror or e}; check the path and its permissions (and the free disk space)"
    if isinstance(e, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({e}); convert it to UTF-8"
    if type(e).__module__.startswith("yaml"):
        return f"not valid YAML: {e}"
    text = str(e)
    if any(m in text for m in _DEVICE_ERRORS):
        return (f"{text.splitlines()[0]}; check train.device (or --device): auto, cpu, cuda or cuda:N on a machine "
                "that has one")
    return None
