"""One logging configuration for worker, beat and CLI: text for a terminal, JSON lines when
``LOG_FORMAT=json``. Context (user, item, job, task, stage) rides on contextvars, so every
line logged while an item is processed carries its ids without threading them through calls.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from worker.config import Settings, mask_url

CONTEXT_KEYS = ("user_id", "item_id", "import_job_id", "task_id", "stage")
# An immutable default: every change goes through log_context, which copies the dict.
_EMPTY: dict[str, Any] = {}
_context: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar(
    "log_context",
    default=_EMPTY,  # never mutated in place
)


@contextmanager
def log_context(**values: Any) -> Iterator[None]:
    """Add ids to every log line inside the block (nested blocks merge)."""
    token = _context.set({**_context.get(), **{k: v for k, v in values.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


def current_context() -> dict[str, Any]:
    return dict(_context.get())


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class _Redact(logging.Filter):
    """Last line of defence: a URL with a password never reaches a handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "://" in msg and "@" in msg:
            record.msg = " ".join(mask_url(w) if "://" in w else w for w in msg.split(" "))
            record.args = None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in (*CONTEXT_KEYS, "outcome", "durations_ms", "event"):
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        ctx = " ".join(
            f"{k}={getattr(record, k)}" for k in CONTEXT_KEYS if getattr(record, k, None)
        )
        return f"{base} [{ctx}]" if ctx else base


def configure_logging(settings: Settings, *, stream: Any = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter())
    handler.addFilter(_ContextFilter())
    handler.addFilter(_Redact())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    for noisy in ("httpx", "urllib3", "sentence_transformers", "filelock", "alembic.runtime"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
