"""One logging configuration for worker, beat and CLI: text for a terminal, JSON lines when
``LOG_FORMAT=json``. Context (user, item, job, batch, task, stage) rides on contextvars, so
every line logged while an item is processed carries its ids without threading them through
calls. Secrets are masked in the formatted line itself (message and traceback alike).
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from worker.config import Settings

CONTEXT_KEYS = ("user_id", "item_id", "import_job_id", "batch_id", "task_id", "stage")
# Per-line facts passed with ``extra=``: the summary line of an item, batch or job.
EXTRA_KEYS = ("outcome", "durations_ms", "counts", "event")
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


def bind_context(**values: Any) -> None:
    """Add ids learned part-way (the user, once the row is claimed) to the innermost
    enclosing ``log_context`` block, so lines logged after the callee returns (the task's
    retry or failure line) carry them too. Outside any block it does nothing: a bare set
    would leak the ids into the next task run by this process."""
    current = _context.get()
    if current is not _EMPTY:
        current.update({k: v for k, v in values.items() if v is not None})


def current_context() -> dict[str, Any]:
    return dict(_context.get())


@dataclass
class Stopwatch:
    """Milliseconds per stage, summed when a stage runs more than once; each stage also
    sets the ``stage`` log context. ``failed_stage`` names the stage an exception left."""

    ms: dict[str, float] = field(default_factory=dict)
    failed_stage: str | None = None

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        with log_context(stage=name):
            try:
                yield
            except BaseException:
                self.failed_stage = name
                raise
            finally:
                self.add(name, (time.perf_counter() - start) * 1000)

    def add(self, name: str, ms: float) -> None:
        """Charge ``ms`` to a stage (a share of work done for several items at once)."""
        self.ms[name] = round(self.ms.get(name, 0.0) + ms, 2)


# --- secrets ---------------------------------------------------------------------------------

_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][\w+.-]*://[^\s/:@]*:)[^\s@/]+(?=@)")
_KEY_VALUE = re.compile(
    r"(?i)(?P<head>\b[\w-]*(?:api[_-]?key|token|secret|password|passwd)[\"']?\s*[:=]\s*[\"']?)"
    r"[^\s\"',;&]+"
)
_BEARER = re.compile(r"(?i)(?P<head>\bbearer\s+)[\w.~+/=-]+")
_OPENAI_KEY = re.compile(r"\bsk-[\w-]{8,}")
MASK = "***"


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Mask passwords in URLs, ``api_key=…``-style pairs, bearer tokens, OpenAI-style keys
    and the configured secret values wherever they appear."""
    for secret in secrets:
        text = text.replace(secret, MASK)
    text = _URL_PASSWORD.sub(rf"\g<head>{MASK}", text)
    text = _KEY_VALUE.sub(rf"\g<head>{MASK}", text)
    text = _BEARER.sub(rf"\g<head>{MASK}", text)
    return _OPENAI_KEY.sub(MASK, text)


def configured_secrets(settings: Settings) -> list[str]:
    """The secret values in Settings: masked even where no pattern would spot them (a
    password quoted alone in a driver's error). Very short ones are skipped: masking every
    "a" in every line would hide more than it protects."""
    found = [settings.openai_api_key.get_secret_value()] if settings.openai_api_key else []
    for url in (
        settings.database_url,
        settings.redis_url,
        settings.broker_url,
        settings.result_backend,
    ):
        try:
            password = urlsplit(url).password if url else None
        except ValueError:
            password = None
        if password:
            found.append(password)
    return [s for s in found if len(s) >= 4]


# --- formatters ------------------------------------------------------------------------------


def _duration_text(durations: Mapping[str, float]) -> str:
    parts = [f"{stage} {ms:.1f}ms" for stage, ms in durations.items()]
    return f"{', '.join(parts)} (total {sum(durations.values()):.1f}ms)"


class JsonFormatter(logging.Formatter):
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = list(secrets)

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": redact(record.getMessage(), self.secrets),
        }
        for key in (*CONTEXT_KEYS, *EXTRA_KEYS):
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info), self.secrets)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        self.secrets = list(secrets)

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The message, then (for the summary line of an item, batch or job) its durations
        and counts, which JSON carries as fields, then the context ids; a traceback follows
        on the next lines."""
        line = super().formatMessage(record)
        durations = getattr(record, "durations_ms", None)
        if durations:
            line += f" | {_duration_text(durations)}"
        counts = getattr(record, "counts", None)
        if counts:
            line += " | " + " ".join(f"{k}={v}" for k, v in counts.items())
        ctx = " ".join(
            f"{k}={getattr(record, k)}" for k in CONTEXT_KEYS if getattr(record, k, None)
        )
        return f"{line} [{ctx}]" if ctx else line

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record), self.secrets)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


def configure_logging(settings: Settings, *, stream: Any = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    secrets = configured_secrets(settings)
    handler.setFormatter(
        JsonFormatter(secrets) if settings.log_format == "json" else TextFormatter(secrets)
    )
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    for noisy in ("httpx", "urllib3", "sentence_transformers", "filelock", "alembic.runtime"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
