"""Thin Celery tasks: parse arguments, call a plain function, map errors to retry or fail.

Only this module (with app.py and client.py) knows Celery exists. Transient errors retry
with exponential backoff and jitter up to a cap; permanent ones are recorded at once.
"""

from __future__ import annotations

import logging
import os
import random
import socket
from collections.abc import Callable
from typing import Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded

from worker import __version__, metrics
from worker.app import (
    TASK_DISPATCH_BULK,
    TASK_EMBED_BOOKMARKS,
    TASK_HEALTH,
    TASK_IMPORT_BOOKMARKS,
    TASK_INDEX_SEGMENT,
    TASK_MAINT_INDEXES,
    TASK_MAINT_PURGE,
    TASK_MAINT_REQUEUE,
    TASK_MAINT_STATS,
    TASK_MAINT_VACUUM,
    TASK_PROCESS_UPLOAD,
    app,
)
from worker.config import get_settings
from worker.errors import TransientError, describe
from worker.logs import configured_secrets, log_context, redact

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


def retry_if_transient(task: Task, exc: BaseException) -> None:
    """Retry a transient failure with backoff (raises Celery's Retry); return otherwise."""
    settings = get_settings()
    if is_transient(exc) and task.request.retries < settings.task_max_retries:
        delay = backoff_seconds(task.request.retries, cap=settings.retry_backoff_max)
        log.warning(
            "transient failure, retry %s in %.1fs: %s",
            task.request.retries + 1,
            delay,
            exc,
            extra={"stage": "retry"},
        )
        metrics.task_retried(task.name)
        raise task.retry(exc=exc, countdown=delay)


def send_after_commit(task: str, queue: str, *args: Any, **kwargs: Any) -> bool:
    """Send a follow-up task for rows this task has committed. When the broker cannot take
    it now (Redis restarting), nothing is lost: the rows stay queued and the requeue task
    sends them again. So the failure is logged, not raised: raising would fail (and record
    as failed) work that is already done."""
    try:
        app.send_task(task, args=list(args), kwargs=kwargs or None, queue=queue)
    except Exception as exc:
        log.warning(
            "could not send %s%s now (%s: %s); the requeue task will send it",
            task,
            list(args),
            exc.__class__.__name__,
            exc,
            extra={"stage": "send"},
        )
        return False
    return True


@app.task(name=TASK_HEALTH)
def health() -> dict[str, Any]:
    """Answered by a live worker: proves broker → worker → result backend works."""
    return {
        "ok": True,
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "version": __version__,
    }


def run_guarded(
    task: Task, what: str, run: Callable[[], dict[str, Any]], fail: Callable[[str], None]
) -> dict[str, Any]:
    """Run one unit of work. A transient failure retries with backoff; a time-out, a
    transient failure past its retries, or any other error is recorded through ``fail`` with
    a reason a person can act on, so nothing stays stuck, and the message is acknowledged:
    a poison message is failed once, never redelivered forever."""
    settings = get_settings()
    try:
        return run()
    except SoftTimeLimitExceeded:
        message = (
            f"timed out after {settings.task_soft_time_limit}s (TASK_SOFT_TIME_LIMIT); "
            "split the input or raise the limit"
        )
        log.warning("%s failed: %s", what, message, extra={"stage": "fail"})
    except Exception as exc:
        retry_if_transient(task, exc)
        message = describe(exc)
        if is_transient(exc):
            message = f"gave up after {task.request.retries} retries: {message}"
        log.exception("%s failed", what, extra={"stage": "fail"})
    # Recorded on the row and shown by `worker failures`: masked like a log line.
    message = redact(message, configured_secrets(settings))[:2000]
    fail(message)
    return {"status": "failed", "error": message}


# The work tasks keep no result and no STARTED state in Redis: their truth is the item, batch
# and job rows (what producers poll), and the two result writes were a third of the time of
# an unchanged re-upload's task. Health and upkeep tasks keep theirs: callers wait on them.
@app.task(name=TASK_PROCESS_UPLOAD, bind=True, ignore_result=True)
def process_upload(self: Task, item_id: int) -> dict[str, Any]:
    """Parse, chunk, analyse, embed and store one uploaded file."""
    from worker.bookmarks.dispatch import note_interactive
    from worker.db.engine import get_engine
    from worker.ingest import process, store

    item_id = int(item_id)
    note_interactive(get_settings())  # also when requeue or a retry sent it, not a producer
    engine = get_engine(get_settings())
    # The pipeline adds the user and the stage; this block keeps the ids on the retry and
    # failure lines, logged after the pipeline returned.
    with log_context(item_id=item_id, task_id=self.request.id):
        return run_guarded(
            self,
            f"item {item_id}",
            lambda: process.process_upload(
                item_id,
                trace_id=self.request.id,
                # An adopted item this group could not finish goes back to the queue.
                resend=lambda adopted: send_after_commit(
                    TASK_PROCESS_UPLOAD, get_settings().queue_ingest, adopted
                ),
            ).as_dict(),
            lambda message: store.fail_item(engine, item_id, message),
        )


@app.task(name=TASK_IMPORT_BOOKMARKS, bind=True, ignore_result=True)
def import_bookmarks(self: Task, job_id: int) -> dict[str, Any]:
    """Parse, deduplicate and stage a bookmark export, then fan out its embedding batches."""
    from worker.bookmarks import dispatch, importer
    from worker.db.engine import get_engine

    job_id = int(job_id)
    settings = get_settings()
    engine = get_engine(settings)

    def stage() -> dict[str, Any]:
        try:
            batch_ids = importer.run_import(engine, settings, job_id)
        except dispatch.ImportCancelled:
            log.info("import job %s cancelled before staging: nothing staged", job_id)
            return {"job_id": job_id, "status": "cancelled"}
        # Sent after the staging transaction committed; a lost send is found by requeue.
        # An interactive job's batches all go now; a bulk job's as the dispatcher allows.
        # A send the broker refuses is not lost: requeue finds the batch and sends it again.
        messages = dispatch.after_staging(engine, settings, job_id, batch_ids)
        sent = sum(send_after_commit(task, queue, *args) for task, args, queue in messages)
        return {"job_id": job_id, "batches": len(batch_ids), "sent": sent}

    with log_context(import_job_id=job_id, task_id=self.request.id):
        return run_guarded(
            self,
            f"import job {job_id}",
            stage,
            lambda message: importer.fail_job(engine, job_id, message),
        )


@app.task(name=TASK_EMBED_BOOKMARKS, bind=True, ignore_result=True)
def embed_bookmark_batch(self: Task, batch_id: int) -> dict[str, Any]:
    """Embed one batch of an import and advance its job."""
    from worker.bookmarks import importer
    from worker.db.engine import get_engine

    batch_id = int(batch_id)
    settings = get_settings()
    engine = get_engine(settings)
    if (self.request.delivery_info or {}).get("routing_key") == settings.queue_ingest:
        from worker.bookmarks.dispatch import note_interactive

        note_interactive(settings)  # a small import's batch is interactive work
    with log_context(batch_id=batch_id, task_id=self.request.id):
        result = run_guarded(
            self,
            f"bookmark batch {batch_id}",
            lambda: importer.embed_batch(engine, settings, batch_id),
            lambda message: importer.fail_batch(engine, batch_id, message),
        )
    if result.get("job_finished"):
        if result.get("segment"):
            # Its partition has no vector index yet: build it in bulk now (it is searched
            # exactly meanwhile), then ANALYZE. Index upkeep catches a lost message.
            if not send_after_commit(
                TASK_INDEX_SEGMENT, settings.queue_maintenance, result["job_id"]
            ):
                _analyze_after_import(settings)  # upkeep builds the index, and analyzes nothing
        else:
            _analyze_after_import(settings)
    _release_bulk(engine, settings)
    return result


def _analyze_after_import(settings: Any) -> None:
    """Fresh statistics for the planner right after a bulk load."""
    send_after_commit(
        TASK_MAINT_VACUUM,
        settings.queue_maintenance,
        analyze_only=["item", "bookmark", "embedding"],
    )


# A bulk HNSW build of a million-row segment runs well past the per-item limits; cutting it
# short leaves an INVALID index to drop and the same build to start again.
SEGMENT_INDEX_TIME_LIMIT = 4 * 3600


@app.task(
    name=TASK_INDEX_SEGMENT,
    bind=True,
    soft_time_limit=SEGMENT_INDEX_TIME_LIMIT,
    time_limit=SEGMENT_INDEX_TIME_LIMIT + 60,
)
def index_import_segment(self: Task, job_id: int) -> dict[str, Any]:
    """Bulk-build the vector indexes of a finished large import's partition."""
    from worker.bookmarks.segments import index_segment
    from worker.db.engine import get_engine

    job_id = int(job_id)
    engine = get_engine(get_settings())

    def leave_to_upkeep(message: str) -> None:
        # Nothing is lost: the segment is searched exactly until then, and index upkeep
        # builds whatever segment is still unindexed (index_pending_segments).
        log.warning("segment of import job %s left to index upkeep: %s", job_id, message)

    with log_context(import_job_id=job_id, task_id=self.request.id):
        result = run_guarded(
            self,
            f"segment index of import job {job_id}",
            lambda: index_segment(engine, job_id),
            leave_to_upkeep,
        )
    # After the build, not beside it: on a small machine the two would share the cores and
    # the segment would wait longer for its index.
    _analyze_after_import(get_settings())
    return result


def _release_bulk(engine: Any, settings: Any) -> None:
    """A batch ended: its slot is free for the next bulk batch (round-robin between users).
    A failure here costs only time: the beat tick releases it later."""
    from worker.bookmarks import dispatch

    try:
        dispatch.dispatch(engine, settings, _send)
    except Exception as exc:
        log.warning("bulk release after a batch failed (%s); the next tick retries", exc)


def _send(task: str, args: list[Any], queue: str) -> None:
    app.send_task(task, args=args, queue=queue)


@app.task(name=TASK_DISPATCH_BULK, ignore_result=True)
def dispatch_bulk() -> dict[str, Any]:
    """Beat's tick: release bulk batches that a lost release or a closed EMBED_WINDOW left
    waiting in the database."""
    from worker.bookmarks import dispatch
    from worker.db.engine import get_engine

    settings = get_settings()
    return dispatch.dispatch(get_engine(settings), settings, _send)


# --- maintenance (beat) --------------------------------------------------------------------
# Each run holds an advisory lock and records a maintenance_run row (worker.maintenance.runs),
# so a second beat or a manual run at the same time skips instead of doubling the work.


def _maintenance(name: str, *, dry_run: bool = False) -> dict[str, Any]:
    from worker.db.engine import get_engine
    from worker.maintenance.commands import run_one

    settings = get_settings()
    try:
        result = run_one(name, get_engine(settings), settings, dry_run=dry_run)
    except Exception:
        metrics.maintenance_done(name, None)
        raise
    metrics.maintenance_done(name, result)
    return result


@app.task(name=TASK_MAINT_REQUEUE)
def maintenance_requeue(dry_run: bool = False) -> dict[str, Any]:
    """Resend uploads, batches and imports stuck past STUCK_AFTER_SECONDS; fail those past
    MAX_ATTEMPTS."""
    result = _maintenance("requeue", dry_run=dry_run)
    metrics.requeued(result)
    return result


@app.task(name=TASK_MAINT_INDEXES)
def maintenance_indexes(dry_run: bool = False) -> dict[str, Any]:
    """Vector index upkeep: ensure, measure recall and drift, rebuild when they call for it."""
    return _maintenance("indexes", dry_run=dry_run)


@app.task(name=TASK_MAINT_VACUUM)
def maintenance_vacuum(
    dry_run: bool = False, analyze_only: list[str] | None = None
) -> dict[str, Any]:
    """VACUUM (ANALYZE) by table statistics; ``analyze_only`` just ANALYZEs (after an import)."""
    if analyze_only:
        from worker.db.engine import get_engine
        from worker.maintenance.vacuum import analyze_tables

        return analyze_tables(get_engine(get_settings()), analyze_only)
    return _maintenance("vacuum", dry_run=dry_run)


@app.task(name=TASK_MAINT_PURGE)
def maintenance_purge(dry_run: bool = False) -> dict[str, Any]:
    """Hard-delete soft-deleted items past PURGE_AFTER_DAYS."""
    return _maintenance("purge", dry_run=dry_run)


@app.task(name=TASK_MAINT_STATS)
def maintenance_stats() -> dict[str, Any]:
    """Record a statistics snapshot."""
    return _maintenance("stats")


# --- embedding-model backfill (worker.backfill, worker.models) --------------------------------
# Imported here rather than at the top because this section is appended to a shared module;
# worker.backfill imports neither Celery nor torch.
from worker.backfill import TASK_BACKFILL_BATCH, TASK_BACKFILL_FINISH  # noqa: E402


def _send_backfill_finish(job_id: int) -> None:
    send_after_commit(TASK_BACKFILL_FINISH, get_settings().queue_maintenance, job_id)


@app.task(name=TASK_BACKFILL_BATCH, bind=True, ignore_result=True)
def backfill_batch(self: Task, batch_id: int) -> dict[str, Any]:
    """Re-embed one staged batch of items with a backfilling model; the job's last batch
    sends the finish step (sweep, index build, recall)."""
    from worker import backfill
    from worker.db.engine import get_engine

    batch_id = int(batch_id)
    settings = get_settings()
    engine = get_engine(settings)
    failed: list[tuple[int, bool]] = []

    def fail(message: str) -> None:
        outcome = backfill.fail_batch(engine, batch_id, message)
        if outcome is not None:
            failed.append(outcome)

    with log_context(backfill_batch_id=batch_id, task_id=self.request.id):
        result = run_guarded(
            self,
            f"backfill batch {batch_id}",
            lambda: backfill.run_batch(engine, settings, batch_id),
            fail,
        )
    if failed:  # a failed batch may still have been its job's last one
        result.update(batch_id=batch_id, job_id=failed[0][0], job_complete=failed[0][1])
    if result.get("job_complete") and result.get("job_id") is not None:
        _send_backfill_finish(int(result["job_id"]))
    return result


@app.task(name=TASK_BACKFILL_FINISH, bind=True)
def backfill_finish(self: Task, job_id: int) -> dict[str, Any]:
    """After a backfill's last batch: sweep for items it missed (sending their batches), or
    build the model's index concurrently and measure its recall."""
    from worker import backfill
    from worker.db.engine import get_engine

    job_id = int(job_id)
    settings = get_settings()
    engine = get_engine(settings)
    with log_context(backfill_job_id=job_id, task_id=self.request.id):
        result = run_guarded(
            self,
            f"backfill job {job_id}",
            lambda: backfill.finish_job(engine, settings, job_id),
            lambda message: backfill.fail_job(engine, job_id, message),
        )
    for batch_id in result.get("batch_ids", []):
        send_after_commit(TASK_BACKFILL_BATCH, settings.queue_ingest, batch_id)
    return result
