"""What failed, why, what to do about it, and putting it back in the queue.

``list_failures`` finds failed uploads and failed or partly failed bookmark imports, each
with its stored reason and a short hint derived from that reason. ``retry_item`` /
``retry_job`` / ``retry_failed`` reset the rows and send their tasks again: always after the
transaction that reset them has committed, so a worker never receives an id whose row still
says 'failed' (DESIGN §4). Every query is scoped by ``user_id`` when one is given.

Failed bookmark items are not listed one by one: they fail with their batch, and their
import job is the unit a person retries.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, text

from worker.app import TASK_EMBED_BOOKMARKS, TASK_IMPORT_BOOKMARKS, TASK_PROCESS_UPLOAD
from worker.bookmarks import dispatch
from worker.config import Settings

Send = Callable[[str, list[Any], str], None]

# (cause, pattern in the stored error, what to do). First match wins, so the most specific
# causes come first; each hint fits a table column.
_HINT_RULES = (
    ("crashed", r"gave up after \d+ attempts", "worker died on it: check its log, then retry"),
    ("timeout", r"timed out|TIME_LIMIT", "retry; if again, split it or raise the limit"),
    ("transient", r"gave up after \d+ retries", "retry once database and Redis are healthy"),
    (
        "missing",
        r"not found|deleted or moved|cannot (open|stat|resolve)|outside",
        "put the file back under UPLOAD_ROOT, then retry",
    ),
    ("too large", r"over the cap|MAX_\w+_BYTES|zip bomb", "upload a smaller file or raise the cap"),
    ("encrypted", r"encrypted", "remove the password, upload again, then retry"),
    (
        "format",
        r"bookmark (export|format)|header row|JSON array|file is empty",
        "export again as HTML, Pinboard JSON or CSV",
    ),
    (
        "bad file",
        r"binary|damaged|not valid|cannot be read|truncated|upload one of|text layer|DTD",
        "fix or replace the file, then retry",
    ),
    ("transient", r"OperationalError|ConnectionError|TimeoutError|Deadlock", "retry"),
)
_HINTS = tuple((cause, re.compile(p, re.IGNORECASE), hint) for cause, p, hint in _HINT_RULES)


_PATH_PREFIX = re.compile(r"^[^\s:]*/[^:]*: ")


def strip_path(error: str) -> str:
    return _PATH_PREFIX.sub("", error, count=1)


def hint_for(error: str | None) -> tuple[str, str]:
    """(kind of failure, what to do) for a stored error message."""
    # Most messages start with the file's path, whose words must not decide the cause.
    reason = strip_path(error or "")
    for kind, pattern, hint in _HINTS:
        if pattern.search(reason):
            return kind, hint
    return "other", "read the error and the worker log; retry when fixed"


@dataclass(frozen=True)
class Failure:
    kind: str  # item | job
    id: int
    user_id: str
    status: str
    what: str  # the upload's file name, or the import's file with its failed count
    error: str
    cause: str
    hint: str
    updated_at: datetime

    @property
    def reason(self) -> str:
        """The error without the file path most messages start with (``what`` names it)."""
        return strip_path(self.error)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_ITEMS = (
    "SELECT i.id, i.user_id, i.status, i.error, i.updated_at, "
    "coalesce(u.original_filename, u.file_path) AS what FROM item i "
    "JOIN upload u ON u.item_id = i.id "
    "WHERE i.status = 'failed' AND i.deleted_at IS NULL "
    "AND (CAST(:u AS text) IS NULL OR i.user_id = :u) AND i.updated_at >= :since "
    "ORDER BY i.updated_at DESC, i.id DESC LIMIT :limit"
)
# A job that finished with failed batches is partly failed: its own error is empty, so the
# reason is the latest failed batch's.
_JOBS = (
    "SELECT j.id, j.user_id, j.status, j.updated_at, j.filename, j.failed_count, j.total, "
    "coalesce(j.error, (SELECT b.error FROM import_batch b WHERE b.import_job_id = j.id "
    "AND b.status = 'failed' ORDER BY b.updated_at DESC LIMIT 1)) AS error "
    "FROM import_job j WHERE (j.status = 'failed' OR (j.failed_count > 0 "
    "AND j.status NOT IN ('queued', 'processing'))) "
    "AND (CAST(:u AS text) IS NULL OR j.user_id = :u) AND j.updated_at >= :since "
    "ORDER BY j.updated_at DESC, j.id DESC LIMIT :limit"
)


def list_failures(
    engine: Engine,
    *,
    since: timedelta | None = None,
    user_id: str | None = None,
    limit: int = 50,
) -> list[Failure]:
    """Failed uploads and failed/partly failed imports, newest first (at most ``limit``)."""
    with engine.connect() as conn:
        params = {"u": user_id, "since": _since(conn, since), "limit": limit}
        items = conn.execute(text(_ITEMS), params).all()
        jobs = conn.execute(text(_JOBS), params).all()
    found = [_failure("item", r.id, r, str(r.what)) for r in items]
    found += [
        _failure("job", r.id, r, f"{r.filename} ({r.failed_count} of {r.total} failed)")
        for r in jobs
    ]
    found.sort(key=lambda f: f.updated_at, reverse=True)
    return found[:limit]


def _since(conn: Connection, since: timedelta | None) -> datetime:
    # On the database's clock, which wrote updated_at.
    seconds = since.total_seconds() if since is not None else 100 * 365 * 86400
    cutoff: datetime = conn.execute(
        text("SELECT now() - make_interval(secs => :s)"), {"s": seconds}
    ).scalar_one()
    return cutoff


def _failure(kind: str, row_id: int, row: Any, what: str) -> Failure:
    error = row.error or f"{row.status} (no reason recorded)"
    cause, hint = hint_for(row.error)
    return Failure(kind, row_id, row.user_id, row.status, what, error, cause, hint, row.updated_at)


# --- retry -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Retried:
    kind: str  # item | job
    id: int
    ok: bool
    message: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_send(task: str, args: list[Any], queue: str) -> None:
    from worker.app import app

    app.send_task(task, args=args, queue=queue)


def retry_item(
    engine: Engine,
    settings: Settings,
    item_id: int,
    *,
    user_id: str | None = None,
    send: Send = default_send,
) -> Retried:
    """A failed upload back to 'queued' (error cleared, attempts from zero) and sent again."""
    with engine.begin() as conn:
        row = conn.execute(
            text(
                "SELECT i.kind, i.status, b.import_job_id FROM item i "
                "LEFT JOIN bookmark b ON b.item_id = i.id WHERE i.id = :id "
                "AND i.deleted_at IS NULL AND (CAST(:u AS text) IS NULL OR i.user_id = :u) "
                "FOR UPDATE OF i"
            ),
            {"id": item_id, "u": user_id},
        ).first()
        refused = _refuse_item(item_id, row, user_id)
        if refused:
            return refused
        conn.execute(
            text(
                "UPDATE item SET status = 'queued', error = NULL, attempts = 0, "
                "claimed_at = NULL, processed_at = NULL, updated_at = now() WHERE id = :id"
            ),
            {"id": item_id},
        )
    # Committed: the worker that receives the id sees a queued row.
    send(TASK_PROCESS_UPLOAD, [item_id], settings.queue_ingest)
    return Retried("item", item_id, True, "queued again")


def _refuse_item(item_id: int, row: Any, user_id: str | None) -> Retried | None:
    if row is None:
        owner = f" for user {user_id}" if user_id else ""
        return Retried("item", item_id, False, f"no item {item_id}{owner}")
    if row.kind == "bookmark":
        return Retried(
            "item",
            item_id,
            False,
            f"a bookmark: retry its import instead (`worker retry job {row.import_job_id}`)",
        )
    if row.status != "failed":
        return Retried("item", item_id, False, f"not failed (status {row.status})")
    return None


def retry_job(
    engine: Engine,
    settings: Settings,
    job_id: int,
    *,
    user_id: str | None = None,
    send: Send = default_send,
) -> Retried:
    """An import that failed before staging goes back to 'queued' (parsed again); one that
    was staged gets its failed batches (and their bookmarks) queued again, its counters
    reduced by them, and its status back to 'processing'."""
    with engine.begin() as conn:
        job = conn.execute(
            text(
                "SELECT status, failed_count, lane FROM import_job WHERE id = :id "
                "AND (CAST(:u AS text) IS NULL OR user_id = :u) FOR UPDATE"
            ),
            {"id": job_id, "u": user_id},
        ).first()
        if job is None:
            owner = f" for user {user_id}" if user_id else ""
            return Retried("job", job_id, False, f"no import job {job_id}{owner}")
        if job.status in ("queued", "processing"):
            return Retried("job", job_id, False, f"still running (status {job.status})")
        if job.status == "paused":
            return Retried("job", job_id, False, f"paused: `worker import resume {job_id}`")
        if job.status == "cancelled":
            return Retried("job", job_id, False, "cancelled: import the file again")
        staged = conn.execute(
            text("SELECT EXISTS (SELECT 1 FROM import_batch WHERE import_job_id = :id)"),
            {"id": job_id},
        ).scalar_one()
        if not staged:
            if job.status != "failed":
                return Retried("job", job_id, False, f"not failed (status {job.status})")
            _requeue_unstaged_job(conn, job_id)
            task, ids, queue = TASK_IMPORT_BOOKMARKS, [job_id], settings.queue_imports
            message = "queued again (parsed from the start)"
        else:
            ids = _requeue_batches(conn, job_id, stranded=job.status == "failed")
            if not ids:
                return Retried("job", job_id, False, "no failed batch to retry")
            task, queue = TASK_EMBED_BOOKMARKS, settings.queue_ingest
            message = f"{len(ids)} batch(es) queued again"
            if job.lane == "bulk":
                # Back in the database, released by the dispatcher like the rest of a bulk
                # import: retrying many failed batches must not flood the queues either.
                conn.execute(
                    text("UPDATE import_batch SET held = true WHERE id = ANY(:ids)"), {"ids": ids}
                )
                ids = []
    if job.lane == "bulk" and staged:
        dispatch.dispatch(engine, settings, send)
    for one in ids:  # after commit
        send(task, [one], queue)
    return Retried("job", job_id, True, message)


def _requeue_unstaged_job(conn: Connection, job_id: int) -> None:
    conn.execute(
        text(
            "UPDATE import_job SET status = 'queued', error = NULL, attempts = 0, "
            "finished_at = NULL, updated_at = now() WHERE id = :id"
        ),
        {"id": job_id},
    )


def _requeue_batches(conn: Connection, job_id: int, *, stranded: bool) -> list[int]:
    """Failed batches back to 'queued' with their items; the job's processed and failed
    counters lose what those batches had added, so finishing them counts them once. With
    ``stranded`` (the job itself failed after staging), batches still 'queued' are sent
    again too: no worker takes a batch of a failed job."""
    failed = conn.execute(
        text(
            "UPDATE import_batch SET status = 'queued', attempts = 0, error = NULL, "
            "claimed_at = NULL, updated_at = now() "
            "WHERE import_job_id = :id AND status = 'failed' RETURNING id, user_id, item_ids"
        ),
        {"id": job_id},
    ).all()
    waiting: list[int] = []
    if stranded:
        waiting = list(
            conn.execute(
                text(
                    "SELECT id FROM import_batch WHERE import_job_id = :id AND status = 'queued' "
                    "AND NOT (id = ANY(:failed))"
                ),
                {"id": job_id, "failed": [b.id for b in failed]},
            ).scalars()
        )
    if not failed and not waiting:
        return []
    item_ids = [i for b in failed for i in b.item_ids]
    if item_ids:
        conn.execute(
            text(
                "UPDATE item SET status = 'queued', error = NULL, attempts = 0, "
                "updated_at = now() WHERE id = ANY(:ids) AND user_id = :u "
                "AND status IN ('failed', 'queued')"
            ),
            {"ids": item_ids, "u": failed[0].user_id},
        )
    conn.execute(
        text(
            "UPDATE import_job SET status = 'processing', error = NULL, finished_at = NULL, "
            "failed_count = greatest(failed_count - :n, 0), "
            "processed = greatest(processed - :n, 0), updated_at = now() WHERE id = :id"
        ),
        {"n": len(item_ids), "id": job_id},
    )
    return sorted([*(b.id for b in failed), *waiting])


def retry_failed(
    engine: Engine,
    settings: Settings,
    *,
    user_id: str | None = None,
    since: timedelta | None = None,
    send: Send = default_send,
    limit: int = 1000,
) -> list[Retried]:
    """Every failure ``list_failures`` shows (for the user, in the window), retried."""
    out = []
    for failure in list_failures(engine, since=since, user_id=user_id, limit=limit):
        retry = retry_item if failure.kind == "item" else retry_job
        out.append(retry(engine, settings, failure.id, user_id=failure.user_id, send=send))
    return out


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(value: str) -> timedelta:
    """``90s``, ``15m``, ``1h``, ``2d``, ``1w`` (a bare number is seconds)."""
    match = _DURATION.match(value.lower())
    if match is None:
        raise ValueError(f"{value!r}: expected a duration such as 30m, 1h or 2d")
    return timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])
