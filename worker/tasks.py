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
    TASK_EMBED_BOOKMARKS,
    TASK_HEALTH,
    TASK_IMPORT_BOOKMARKS,
    TASK_MAINT_VACUUM,
    TASK_PROCESS_UPLOAD,
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


@app.task(name=TASK_PROCESS_UPLOAD, bind=True)
def process_upload(self: Task, item_id: int) -> dict[str, Any]:
    """Parse, chunk, analyse, embed and store one uploaded file."""
    from worker.db.engine import get_engine
    from worker.ingest import process, store

    item_id = int(item_id)
    settings = get_settings()
    try:
        return process.process_upload(item_id, trace_id=self.request.id).as_dict()
    except SoftTimeLimitExceeded:
        message = (
            f"timed out after {settings.task_soft_time_limit}s (TASK_SOFT_TIME_LIMIT); "
            "split the file or raise the limit"
        )
        store.fail_item(get_engine(settings), item_id, message)
        return {"item_id": item_id, "status": "failed", "error": message}
    except Exception as exc:
        retry_or_raise(self, exc)
        # Not transient, or retries exhausted: record the reason so the item is not stuck.
        message = f"{exc.__class__.__name__}: {exc}"
        if is_transient(exc):
            message = f"gave up after {self.request.retries} retries: {message}"
        log.exception("item %s failed", item_id)
        store.fail_item(get_engine(settings), item_id, message[:2000])
        return {"item_id": item_id, "status": "failed", "error": message[:2000]}


@app.task(name=TASK_IMPORT_BOOKMARKS, bind=True)
def import_bookmarks(self: Task, job_id: int) -> dict[str, Any]:
    """Parse, deduplicate and stage a bookmark export, then fan out its embedding batches."""
    from worker.bookmarks import importer
    from worker.db.engine import get_engine

    job_id = int(job_id)
    settings = get_settings()
    engine = get_engine(settings)
    try:
        batch_ids = importer.run_import(engine, settings, job_id)
    except SoftTimeLimitExceeded:
        importer.fail_job(engine, job_id, "timed out while parsing (TASK_SOFT_TIME_LIMIT)")
        return {"job_id": job_id, "status": "failed"}
    except Exception as exc:
        retry_or_raise(self, exc)
        log.exception("import job %s failed", job_id)
        importer.fail_job(engine, job_id, f"{exc.__class__.__name__}: {exc}"[:2000])
        return {"job_id": job_id, "status": "failed"}
    # Sent after the staging transaction committed; a lost send is found by requeue.
    for batch_id in batch_ids:
        app.send_task(TASK_EMBED_BOOKMARKS, args=[batch_id], queue=settings.queue_ingest)
    return {"job_id": job_id, "batches": len(batch_ids)}


@app.task(name=TASK_EMBED_BOOKMARKS, bind=True)
def embed_bookmark_batch(self: Task, batch_id: int) -> dict[str, Any]:
    """Embed one batch of an import and advance its job."""
    from worker.bookmarks import importer
    from worker.db.engine import get_engine

    batch_id = int(batch_id)
    settings = get_settings()
    engine = get_engine(settings)
    try:
        result = importer.embed_batch(engine, settings, batch_id)
    except SoftTimeLimitExceeded:
        importer.fail_batch(engine, batch_id, "timed out (TASK_SOFT_TIME_LIMIT)")
        return {"batch_id": batch_id, "status": "failed"}
    except Exception as exc:
        retry_or_raise(self, exc)
        log.exception("bookmark batch %s failed", batch_id)
        importer.fail_batch(engine, batch_id, f"{exc.__class__.__name__}: {exc}"[:2000])
        return {"batch_id": batch_id, "status": "failed"}
    if result.get("job_finished"):
        # Fresh statistics for the planner right after a bulk load.
        app.send_task(
            TASK_MAINT_VACUUM,
            kwargs={"analyze_only": ["item", "bookmark", "embedding"]},
            queue=settings.queue_maintenance,
        )
    return result
