"""Find work stuck in ``queued``/``processing`` and send it again, or give up on it.

A lost message (broker restart, a producer that died between commit and send, a worker
killed after acknowledging) must not be a lost job: the row in PostgreSQL is the truth, and
this run re-sends what has not moved for ``stuck_after_seconds``. Rows are picked in bulk
with ``FOR UPDATE SKIP LOCKED`` (a worker claiming a row right now keeps it), their
``updated_at`` is touched so the next run does not send them again at once, and messages go
out only after that transaction has committed (DESIGN §4: send after commit).

Bookmark items are not resent one by one: their ``import_batch`` row carries them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, text

from worker.app import TASK_EMBED_BOOKMARKS, TASK_IMPORT_BOOKMARKS, TASK_PROCESS_UPLOAD
from worker.bookmarks.importer import fail_batch
from worker.config import Settings
from worker.maintenance.runs import maintenance_run

log = logging.getLogger(__name__)

Send = Callable[[str, list[Any], str], None]
BATCH = 500


@dataclass(frozen=True)
class StuckKind:
    """One kind of row that can be stuck, and how to resend it."""

    name: str
    table: str
    extra: str  # more conditions on rows of ``table`` (alias t)
    task: str
    queue_setting: str  # the Settings field naming the queue
    on_fail: str = ""  # more assignments when giving up (alias u)
    failed_by_importer: bool = False  # past max_attempts: importer.fail_batch, not here


def _lane_is(lane: str) -> str:
    return f"EXISTS (SELECT 1 FROM import_job j WHERE j.id = t.import_job_id AND j.lane = '{lane}')"


KINDS = (
    StuckKind(
        "uploads",
        "item",
        "AND t.kind = 'upload' AND t.deleted_at IS NULL",
        TASK_PROCESS_UPLOAD,
        "queue_ingest",
        on_fail=", processed_at = CASE WHEN s.attempts >= :max THEN now() ELSE u.processed_at END",
    ),
    # Batches past max_attempts are not failed here but by the importer's own fail_batch:
    # it also fails the batch's items and advances the job's counters (and closes the job
    # after its last batch), which a bare status change would leave hanging. Held batches
    # are not stuck: they wait in the database for the dispatcher or a resume (and a bulk
    # batch goes back to the bulk queue, never ahead of interactive work).
    StuckKind(
        "batches",
        "import_batch",
        f"AND NOT t.held AND {_lane_is('interactive')}",
        TASK_EMBED_BOOKMARKS,
        "queue_ingest",
        failed_by_importer=True,
    ),
    StuckKind(
        "bulk_batches",
        "import_batch",
        f"AND NOT t.held AND {_lane_is('bulk')}",
        TASK_EMBED_BOOKMARKS,
        "queue_bulk",
        failed_by_importer=True,
    ),
    StuckKind(
        "jobs",
        "import_job",
        "AND NOT EXISTS (SELECT 1 FROM import_batch b WHERE b.import_job_id = t.id)",
        TASK_IMPORT_BOOKMARKS,
        "queue_imports",
        on_fail=", finished_at = CASE WHEN s.attempts >= :max THEN now() ELSE u.finished_at END",
    ),
)


def give_up_message(attempts: int, error: str | None, status: str) -> str:
    return f"gave up after {attempts} attempts (last: {error or f'stuck in {status}'})"


def _stuck_where(kind: StuckKind) -> str:
    return (
        f"FROM {kind.table} t WHERE t.status IN ('queued', 'processing') "
        f"AND t.updated_at < :cutoff {kind.extra}"
    )


def _claim_batch_sql(kind: StuckKind, fail_here: bool) -> str:
    """Lock a batch of stuck rows, fail the exhausted ones (when ``fail_here``), touch the
    rest; return each row's id, attempts, last error and status before the change."""
    give_up = "s.attempts >= :max" if fail_here else "false"
    message = (
        "format('gave up after %s attempts (last: %s)', s.attempts, "
        "coalesce(s.error, 'stuck in ' || s.status))"
    )
    return (
        f"WITH s AS (SELECT t.id, t.attempts, t.error, t.status {_stuck_where(kind)} "
        "ORDER BY t.updated_at, t.id LIMIT :batch FOR UPDATE OF t SKIP LOCKED) "
        f"UPDATE {kind.table} u SET "
        f"status = CASE WHEN {give_up} THEN 'failed' ELSE u.status END, "
        f"error = CASE WHEN {give_up} THEN {message} ELSE u.error END, "
        f"updated_at = now(){kind.on_fail if fail_here else ''} "
        "FROM s WHERE u.id = s.id "
        "RETURNING u.id, s.attempts, s.error, s.status"
    )


def _cutoff(conn: Connection, settings: Settings) -> datetime:
    # Fixed once per run, on the database's clock: rows touched by this run are newer than
    # it, so the batch loop always ends.
    cutoff: datetime = conn.execute(
        text("SELECT now() - make_interval(secs => :s)"), {"s": settings.stuck_after_seconds}
    ).scalar_one()
    return cutoff


def _requeue_kind(
    engine: Engine, settings: Settings, kind: StuckKind, send: Send, cutoff: datetime
) -> dict[str, int]:
    counts = {"resent": 0, "failed": 0}
    queue = str(getattr(settings, kind.queue_setting))
    fail_here = not kind.failed_by_importer
    params = {"cutoff": cutoff, "batch": BATCH, "max": settings.max_attempts}
    while True:
        with engine.begin() as conn:
            rows = conn.execute(text(_claim_batch_sql(kind, fail_here)), params).all()
        exhausted = [r for r in rows if r.attempts >= settings.max_attempts]
        resend = [r.id for r in rows if r.attempts < settings.max_attempts]
        for row in exhausted:
            if not fail_here:
                fail_batch(engine, row.id, give_up_message(row.attempts, row.error, row.status))
            log.warning("%s %s: gave up after %s attempts", kind.name, row.id, row.attempts)
        # Committed above: the task can see the touched row when the message arrives.
        for row_id in resend:
            send(kind.task, [row_id], queue)
        counts["resent"] += len(resend)
        counts["failed"] += len(exhausted)
        if len(rows) < BATCH:
            return counts


def _count_kind(
    conn: Connection, settings: Settings, kind: StuckKind, cutoff: datetime
) -> dict[str, Any]:
    row = conn.execute(
        text(
            "SELECT count(*) FILTER (WHERE t.attempts < :max) AS resend, "
            "count(*) FILTER (WHERE t.attempts >= :max) AS fail, "
            f"(array_agg(t.id ORDER BY t.id))[1:20] AS ids {_stuck_where(kind)}"
        ),
        {"cutoff": cutoff, "max": settings.max_attempts},
    ).one()
    return {"would_resend": row.resend, "would_fail": row.fail, "ids": list(row.ids or [])}


def find_and_requeue(
    engine: Engine,
    settings: Settings,
    send: Callable[[str, list[Any], str], None],
    *,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Resend stuck uploads, import batches and batch-less import jobs with
    ``send(task_name, [id], queue)`` after commit; fail those past ``max_attempts``.
    Returns counts per kind."""
    with maintenance_run(engine, "requeue", None, dry_run=dry_run) as run:
        if run.skipped:
            return {"skipped": True, "run_id": run.id, **run.details}
        with engine.connect() as conn:
            cutoff = _cutoff(conn, settings)
            if dry_run:
                for kind in KINDS:
                    run.details[kind.name] = _count_kind(conn, settings, kind, cutoff)
        if not dry_run:
            for kind in KINDS:
                run.details[kind.name] = _requeue_kind(engine, settings, kind, send, cutoff)
        run.details["stuck_before"] = cutoff.isoformat()
        return {"skipped": False, "run_id": run.id, "dry_run": dry_run, **run.details}
