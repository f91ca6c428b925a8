"""The two kinds of failure the worker knows.

Tasks retry a ``TransientError`` with backoff (the world may be different in a minute:
database down, deadlock, broker gone) and record a ``PermanentError`` at once (the input
itself is wrong: retrying would fail the same way and waste the model's time).
Every message names the file or item and says what a person can do about it.
"""

from __future__ import annotations


class WorkerError(Exception):
    """Base of every error the worker raises on purpose."""


class TransientError(WorkerError):
    """Retry later: the cause is outside the input (database, broker, a lock, a timeout)."""


class PermanentError(WorkerError):
    """Do not retry: the input cannot be processed as it is. ``skip`` marks inputs that are
    valid but hold nothing to index (an empty file): they end ``skipped``, not ``failed``."""

    def __init__(self, message: str, *, skip: bool = False) -> None:
        super().__init__(message)
        self.skip = skip


class SourceError(PermanentError):
    """The file cannot be read: outside the upload root, missing, too large, not a regular file."""


class ParseError(PermanentError):
    """The file was read but its content cannot be turned into text."""


class UnsupportedTypeError(ParseError):
    """The file's type is not one the worker parses."""


class BookmarkFormatError(PermanentError):
    """A bookmark export is not in a format we recognise, or is damaged beyond use."""


class ConfigError(WorkerError):
    """A setting is missing or invalid; raised at start-up with the variable's name."""


class ModelLifecycleError(PermanentError):
    """An embedding-model operation was refused (``worker models``): an unknown model, files
    that are missing or hold no model, a backfill not complete, the serving model retired."""


def describe(exc: BaseException) -> str:
    """``ExceptionClass: message``, as error fields and log lines show an exception."""
    return f"{exc.__class__.__name__}: {exc}"
