"""Typed errors: each carries the process exit code and at most one hint line.

This module imports nothing of qatconv (and no torch), so every layer can raise these.
"""

from __future__ import annotations


class QatconvError(Exception):
    """Base of every error qatconv reports to a user as `error: ...` / `hint: ...`."""

    exit_code: int = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(QatconvError):
    """Bad or missing flags, or a combination of them that cannot work (exit 2)."""

    exit_code = 2


class BadInputError(QatconvError):
    """Unreadable, corrupt or mismatched input; output that would clobber an input (exit 3)."""

    exit_code = 3


class ModelSpecError(BadInputError):
    """A `--model` spec that cannot be imported or built."""


class CheckpointError(BadInputError):
    """A checkpoint that cannot be read, or whose tensors do not fit the model."""


class DataError(BadInputError):
    """A calibration / check data file that cannot be read or does not fit the model."""


class NoPairsError(BadInputError):
    """No Linear+BatchNorm1d pair can fold and `--allow-no-pairs` was not given."""


class OutputError(BadInputError):
    """The output path is unusable: exists without --force, is an input, folder missing."""


class CheckFailedError(QatconvError):
    """A verification ran and failed: fold error beyond tolerance, `inspect --strict` (exit 4)."""

    exit_code = 4


class InterruptedError_(QatconvError):
    """SIGINT/SIGTERM during a long command (exit 130)."""

    exit_code = 130


def first_line(text: object, default: str = "") -> str:
    """The first line of ``str(text)`` (an exception, a message), stripped; ``default`` when
    there is none. Errors are one line: this is how a multi-line message becomes one."""
    stripped = str(text).strip()
    return stripped.splitlines()[0] if stripped else default


def describe(e: BaseException) -> str:
    """``Type: first line`` of an exception (just the type when it says nothing)."""
    first = first_line(e)
    return f"{type(e).__name__}: {first}" if first else type(e).__name__
