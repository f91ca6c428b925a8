"""Pause, resume and cancel a bookmark import (`worker import pause|resume|cancel JOB`,
``worker.client.pause_import`` …).

* **pause** holds every unfinished batch of the job in the database (``held``) and sets the
  job ``paused``. Nothing staged is lost, and nothing more is written for it: a batch task
  that arrives for a held batch, or for a paused job, does nothing and counts nothing.
* **resume** sets the job running again and releases its held batches: all at once for an
  interactive import, through the dispatcher (caps, round-robin, window) for a bulk one. It
  continues where it stopped: finished batches are never redone.
* **cancel** stops the job and removes what it created: its bookmarks (their items,
  embeddings and analyses go with them by cascade) and its unfinished batches. With
  ``keep`` it keeps the bookmarks that were embedded and removes only the unfinished ones,
  so that importing the same file again adds exactly what was missing. Bookmarks that
  existed before the import and were merged with it (tags, folders) are never removed.

A batch mid-embedding when pause or cancel arrives: both lock the job's unfinished batch
rows first (in id order), the same row the batch's write transaction locks to check that
its claim still holds. So either the write commits first (the batch is done and counted;
pause/cancel then see it finished), or pause/cancel commit first (the claim no longer holds,
the write stores nothing, and the batch is redone after a resume). The job row is locked
after the batch rows, in the same order as a batch's write, so the two never deadlock.

Every function takes an optional ``user_id`` (the client always passes it): a job of
another user is "not found". Messages are sent only after the transaction commits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Connection, Engine, text

from worker.app import TASK_EMBED_BOOKMARKS
from worker.bookmarks import dispatch
from worker.bookmarks.dispatch import Message, Send, default_send
from worker.bookmarks.segments import drop_segment
from worker.config import Settings
from worker.db.engine import declare_user

# Items deleted per transaction when a cancel removes what an import created: short
# transactions, and a cancel interrupted half-way finishes when it is run again.
DELETE_CHUNK = 2000
_OPEN = "('queued', 'processing')"


@dataclass(frozen=True)
class ControlResult:
    job_id: int
    ok: bool
    status: str | None  # the job's status afterwards (None: no such job)
    message: str
    removed: int = 0  # bookmarks a cancel removed

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Job:
    user_id: str
    status: str
    lane: str
    staged: bool


def _lock(conn: Connection, job_id: int, user_id: str | None) -> _Job | None:
    """Lock the job's unfinished batches, then the job row (the order of a batch's write)."""
    if user_id is not None:
        declare_user(conn, user_id)  # ROW_LEVEL_SECURITY: the policies see this user only
    owner = conn.execute(
        text(
            "SELECT user_id FROM import_job WHERE id = :id "
            "AND (CAST(:u AS text) IS NULL OR user_id = :u)"
        ),
        {"id": job_id, "u": user_id},
    ).scalar_one_or_none()
    if owner is None:
        return None
    conn.execute(
        text(
            f"SELECT id FROM import_batch WHERE import_job_id = :id AND status IN {_OPEN} "
            "ORDER BY id FOR UPDATE"
        ),
        {"id": job_id},
    )
    row = conn.execute(
        text(
            "SELECT user_id, status, lane, EXISTS (SELECT 1 FROM import_batch b "
            "WHERE b.import_job_id = j.id) AS staged FROM import_job j WHERE id = :id "
            # Not FOR UPDATE: a staging transaction holds the job row KEY SHARE (the foreign
            # key of every bookmark it inserts) for as long as the file is read, and a pause
            # or cancel must not wait for that. The staging sees a cancel between blocks.
            "FOR NO KEY UPDATE"
        ),
        {"id": job_id},
    ).one()
    return _Job(row.user_id, row.status, row.lane, bool(row.staged))


def _missing(job_id: int, user_id: str | None) -> ControlResult:
    owner = f" for user {user_id}" if user_id else ""
    return ControlResult(job_id, False, None, f"no import job {job_id}{owner}")


def pause(engine: Engine, job_id: int, *, user_id: str | None = None) -> ControlResult:
    with engine.begin() as conn:
        job = _lock(conn, job_id, user_id)
        if job is None:
            return _missing(job_id, user_id)
        if job.status == "paused":
            return ControlResult(job_id, False, job.status, "already paused")
        if job.status not in ("queued", "processing"):
            return ControlResult(job_id, False, job.status, f"finished (status {job.status})")
        if not job.staged:
            # Its file is not parsed yet: there is nothing to hold, and a second job task
            # sent on resume could race the first. Cancelling is always possible.
            return ControlResult(
                job_id,
                False,
                job.status,
                "not staged yet (its file is being parsed): pause it again in a moment, "
                "or cancel it",
            )
        held = conn.execute(
            text(
                "UPDATE import_batch SET held = true, status = 'queued', claimed_at = NULL, "
                # An interrupted claim was not a failed attempt.
                "attempts = CASE WHEN status = 'processing' THEN greatest(attempts - 1, 0) "
                f"ELSE attempts END, updated_at = now() WHERE import_job_id = :id "
                f"AND status IN {_OPEN} RETURNING id"
            ),
            {"id": job_id},
        ).all()
        conn.execute(
            text("UPDATE import_job SET status = 'paused', updated_at = now() WHERE id = :id"),
            {"id": job_id},
        )
    return ControlResult(job_id, True, "paused", f"paused: {len(held)} batch(es) held")


def resume(
    engine: Engine,
    settings: Settings,
    job_id: int,
    *,
    user_id: str | None = None,
    send: Send = default_send,
) -> ControlResult:
    messages: list[Message] = []
    with engine.begin() as conn:
        job = _lock(conn, job_id, user_id)
        if job is None:
            return _missing(job_id, user_id)
        if job.status != "paused":
            return ControlResult(job_id, False, job.status, f"not paused (status {job.status})")
        conn.execute(
            text("UPDATE import_job SET status = 'processing', updated_at = now() WHERE id = :id"),
            {"id": job_id},
        )
        waiting = conn.execute(
            text(
                "SELECT count(*) FROM import_batch WHERE import_job_id = :id "
                "AND held AND status = 'queued'"
            ),
            {"id": job_id},
        ).scalar_one()
        if job.lane == dispatch.INTERACTIVE:
            released = conn.execute(
                text(
                    "UPDATE import_batch SET held = false, released_at = now(), "
                    "updated_at = now() WHERE import_job_id = :id AND held "
                    "AND status = 'queued' RETURNING id, seq"
                ),
                {"id": job_id},
            ).all()
            messages = [
                (TASK_EMBED_BOOKMARKS, [r.id], settings.queue_ingest)
                for r in sorted(released, key=lambda r: r.seq)
            ]
    if job.lane == dispatch.BULK:
        messages = dispatch.release(engine, settings)
    for task, args, queue in messages:  # committed above
        send(task, args, queue)
    how = "sent now" if job.lane == dispatch.INTERACTIVE else "released as the dispatcher allows"
    return ControlResult(job_id, True, "processing", f"resumed: {waiting} batch(es) waiting, {how}")


def cancel(
    engine: Engine, job_id: int, *, user_id: str | None = None, keep: bool = False
) -> ControlResult:
    """Cancel the job and remove what it created (``keep``: only its unfinished bookmarks).
    Cancelling a cancelled job again finishes an interrupted removal, and without ``keep``
    removes what an earlier ``keep`` kept."""
    with engine.begin() as conn:
        job = _lock(conn, job_id, user_id)
        if job is None:
            return _missing(job_id, user_id)
        if job.status in ("done", "failed"):
            return ControlResult(
                job_id,
                False,
                job.status,
                f"finished (status {job.status}): nothing to cancel; delete its bookmarks instead",
            )
        conn.execute(
            text(
                "UPDATE import_job SET status = 'cancelled', "
                "finished_at = coalesce(finished_at, now()), updated_at = now() WHERE id = :id"
            ),
            {"id": job_id},
        )
        # Unfinished batches go (a write waiting on one finds its claim gone); with keep,
        # the finished ones stay as the record of what was kept.
        conn.execute(
            text(
                "DELETE FROM import_batch WHERE import_job_id = :id "
                + ("AND status <> 'done'" if keep else "")
            ),
            {"id": job_id},
        )
    removed = _remove_created(engine, job_id, job.user_id, keep=keep)
    if not keep:
        # Its embedding partition (a large import's) is empty now: drop it rather than keep
        # an empty partition in every search plan.
        drop_segment(engine, job_id)
    what = "unfinished bookmark(s)" if keep else "bookmark(s) it created"
    return ControlResult(job_id, True, "cancelled", f"cancelled: removed {removed} {what}", removed)


def _remove_created(engine: Engine, job_id: int, user_id: str, *, keep: bool) -> int:
    """Delete the job's own bookmarks' items (cascading to bookmark, embedding, analysis),
    DELETE_CHUNK per transaction; with ``keep``, only those not embedded."""
    unfinished = "AND i.status <> 'done' " if keep else ""
    removed = 0
    while True:
        with engine.begin() as conn:
            declare_user(conn, user_id)
            n = conn.execute(
                text(
                    "DELETE FROM item WHERE id IN (SELECT b.item_id FROM bookmark b "
                    "JOIN item i ON i.id = b.item_id WHERE b.import_job_id = :id "
                    f"AND b.user_id = :u {unfinished}LIMIT :n)"
                ),
                {"id": job_id, "u": user_id, "n": DELETE_CHUNK},
            ).rowcount
        removed += n
        if n < DELETE_CHUNK:
            return removed
