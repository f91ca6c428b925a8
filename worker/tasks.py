"""Thin Celery tasks: parse arguments, call a plain function, map errors to retry or fail.

Only this module (with app.py and client.py) knows Celery exists. Transient errors retry
with exponential backoff and jitter up to a cap; permanent ones are recorded at once.
"""

from __future__ import annotations

import logging
import os
import random
import socket
from typing import Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded

from worker import __version__
from worker.app import (
    TASK_HEALTH,
    app,
)
from worker.config import get_settings
from worker.errors import TransientError

log = logging.getLogger(__name__)


def backoff_seconds(retries: int, *, cap: int) -> float:
    """Exponential backoff with full jitter: 1, 2, 4 … seconds, capped, randomised so that
    a hundred tasks failing together do not come back together."""
    return random.uniform(0, min(cap, 2**retries))


def is_transient(exc: BaseException) -> bool:
    """Failures where the same call may succeed later: broker or database gone, deadlock,
    serialization failure, a pool timeout."""
    import psycopg
    import redis
    from sqlalchemy import exc as sa_exc

    if isinstance(exc, TransientError | redis.ConnectionError | redis.TimeoutError):
        return True
    if isinstance(exc, sa_exc.OperationalError | sa_exc.TimeoutError | sa_exc.InterfaceError):
        return True
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        exc = exc.orig or exc
    return isinstance(
        exc,
        psycopg.errors.DeadlockDetected
        | psycopg.errors.SerializationFailure
        | psycopg.errors.LockNotAvailable
        | psycopg.OperationalError,
    )


def retry_or_raise(task: Task, exc: BaseException) -> None:
    """Retry a transient failure with backoff; re-raise anything else."""
    settings = get_settings()
    if is_transient(exc) and task.request.retries < settings.task_max_retries:
        delay = backoff_seconds(task.request.retries, cap=settings.retry_backoff_max)
        log.warning(
            "transient failure, retry %s in %.1fs: %s", task.request.retries + 1, delay, exc
        )
        raise task.retry(exc=exc, countdown=delay)


@app.task(name=TASK_HEALTH)
def health() -> dict[str, Any]:
    """Answered by a live worker: proves broker → worker → result backend works."""
    return {
        "ok": True,
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "version": __version__,
    }


__all__ = ["SoftTimeLimitExceeded", "backoff_seconds", "health", "is_transient", "retry_or_raise"]
