"""User-facing errors: the CLI prints ``str(error)`` as one line and exits with ``exit_code``."""

from __future__ import annotations


class CbtoolError(Exception):
    """A problem with the user's input or environment, not a bug in cbtool."""

    exit_code = 2
    prefix = "error: "  # the CLI prints "cbtool: " + prefix + message


class SpecError(CbtoolError):
    """An invalid Context Broadcasting spec (variant, position or layers)."""


class ModelSourceError(CbtoolError):
    """A model name, path or checkpoint that cannot be resolved or read."""


class UnsupportedModelError(CbtoolError):
    """A model whose architecture cbtool cannot rewrite or measure."""


class CheckpointError(CbtoolError):
    """A file that is missing, corrupt, or lacks the metadata cbtool needs."""


class DatasetError(CbtoolError):
    """A dataset that cannot be found, read, or does not fit the model."""


class OutputError(CbtoolError):
    """An output path that cannot be written (missing folder, existing file without --force)."""


class NetworkError(CbtoolError):
    """A download that needs the network (or a Hub token) that is not available."""


class TrainingError(CbtoolError):
    """Training stopped on a condition the user must act on (non-finite loss, out of memory)."""


class OutOfMemory(CbtoolError):
    """The machine could not give the memory a batch needs; the message names the option to lower."""


class RegressionError(CbtoolError):
    """``cbtool check`` found a real regression."""

    exit_code = 1


class VizError(CbtoolError):
    """An attention picture that cannot be drawn as asked (a query outside the grid, a layer kind without it)."""


class Interrupted(CbtoolError):
    """Ctrl-C stopped a command; the message (starting with "interrupted") says what was saved, if anything."""

    exit_code = 130
    prefix = ""


# What the CLI prints under the traceback of an exception that is not a CbtoolError: a bug in cbtool, never the user's.
BUG_EXIT_CODE = 70  # sysexits' EX_SOFTWARE: neither success, a regression (1) nor bad input (2)
BUG_REPORT_HINT = ("this is a bug in cbtool, not a problem with your input: please report it on cbtool's issue tracker "
                   "(where you got cbtool) with the command line and the traceback above")


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first non-empty line of ``error``'s message (its type name when the message is empty), cut to ``limit``."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
