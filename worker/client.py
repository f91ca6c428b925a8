"""What producer services import: enqueue uploads and bookmark imports, read their status.

Imports Celery, kombu and SQLAlchemy only, never torch (tests check ``sys.modules``). The
row is committed before its message is sent: a worker never receives an id it cannot see,
and a message lost after the commit is found again by the requeue task.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from celery import Celery

from worker import app as app_module
from worker.bookmarks.parse import FORMATS
from worker.config import Settings, get_settings
from worker.db import queries
from worker.db.engine import session_scope
from worker.errors import SourceError
from worker.ingest.sources import resolve_inside

log = logging.getLogger(__name__)


def _require_user(user_id: str) -> str:
    if not isinstance(user_id, str) or not user_id.strip():
        raise ValueError("user_id must be a non-empty string")
    return user_id


def _stored_file(path: str | os.PathLike[str], settings: Settings) -> tuple[Path, str]:
    """The real path of a file a producer stored under UPLOAD_ROOT, and the path relative to
    the root that is recorded (so the root can move). Refused early, with the reason, when it
    is outside the root or not a regular file: the producer learns it at once."""
    real = resolve_inside(path, settings.upload_root)
    if not real.is_file():
        raise SourceError(f"{path}: not a regular file (missing, a directory or a device)")
    return real, str(real.relative_to(settings.upload_root.resolve()))


def _send(celery: Celery, task: str, args: list[Any], queue: str) -> None:
    try:
        celery.send_task(task, args=args, queue=queue)
    except Exception as exc:  # the row is committed: requeue will send it later
        log.warning("could not send %s%s now (%s); requeue will send it", task, args, exc)


def enqueue_upload(
    user_id: str,
    path: str | os.PathLike[str],
    *,
    original_filename: str | None = None,
    mime_type: str | None = None,
    settings: Settings | None = None,
    celery: Celery | None = None,
) -> int:
    """Register an uploaded file (already stored under UPLOAD_ROOT) and queue its processing.
    Returns the item id."""
    settings = settings or get_settings()
    _require_user(user_id)
    real, rel = _stored_file(path, settings)
    with session_scope(user_id=user_id) as session:
        item_id = queries.insert_upload(
            session,
            user_id=user_id,
            file_path=rel,
            filename=real.name,
            original_filename=original_filename or Path(path).name,
            file_size=real.stat().st_size,
            mime_type=mime_type,
        )
    _send(
        celery or app_module.app, app_module.TASK_PROCESS_UPLOAD, [item_id], settings.queue_ingest
    )
    # Bulk imports leave a process free for the next while uploads keep coming.
    from worker.bookmarks.dispatch import note_interactive

    note_interactive(settings)
    log.info("queued upload %s as item %s", rel, item_id, extra={"user_id": user_id})
    return item_id


def import_bookmarks(
    user_id: str,
    path: str | os.PathLike[str],
    *,
    fmt: str | None = None,
    settings: Settings | None = None,
    celery: Celery | None = None,
) -> int:
    """Register a bookmark export (stored under UPLOAD_ROOT) and queue its import.
    ``fmt`` names its format (one of ``worker.bookmarks.parse.FORMATS``) when detection
    from the content should not decide. Returns the import job id."""
    settings = settings or get_settings()
    _require_user(user_id)
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown bookmark format {fmt!r}; the formats are {', '.join(FORMATS)}")
    real, rel = _stored_file(path, settings)
    with session_scope(user_id=user_id) as session:
        job_id = queries.insert_import_job(
            session,
            user_id=user_id,
            filename=rel,
            file_size=real.stat().st_size,
            source_format=fmt,
        )
    _send(
        celery or app_module.app, app_module.TASK_IMPORT_BOOKMARKS, [job_id], settings.queue_imports
    )
    log.info("queued bookmark import %s as job %s", rel, job_id, extra={"user_id": user_id})
    return job_id


def item_status(user_id: str, item_id: int) -> dict[str, Any] | None:
    """The item's status, attempts, error, chunk count and analysis version; None when the
    item does not exist for this user."""
    with session_scope(user_id=_require_user(user_id)) as session:
        status = queries.item_status(session, user_id, item_id)
    return status.as_dict() if status else None


def list_items(user_id: str, **filters: Any) -> list[dict[str, Any]]:
    with session_scope(user_id=_require_user(user_id)) as session:
        return queries.list_items(session, user_id, **filters)


def delete_item(user_id: str, item_id: int) -> bool:
    """Soft-delete one of the user's items: it leaves search and listings at once, and the
    purge task removes its rows after PURGE_AFTER_DAYS. False when there is no such live
    item for this user."""
    with session_scope(user_id=_require_user(user_id)) as session:
        return queries.soft_delete_item(session, user_id, item_id)


@dataclass(frozen=True)
class ImportProgress:
    id: int
    status: str
    filename: str
    source_format: str | None
    total: int
    processed: int
    created: int
    duplicates: int
    skipped: int
    failed: int
    skipped_reasons: dict[str, int]
    error: str | None
    rate_per_s: float | None
    eta_s: float | None
    lane: str = "interactive"  # bulk: released a few batches at a time, after others' uploads
    note: str | None = None  # why it is not moving: paused, waiting for EMBED_WINDOW
    # When every new bookmark became searchable through the first-pass model, before the
    # serving model's vectors (None: the import had no first pass).
    searchable_at: datetime | None = None

    @property
    def fraction(self) -> float:
        return self.processed / self.total if self.total else (1.0 if self.finished else 0.0)

    @property
    def finished(self) -> bool:
        return self.status in ("done", "failed", "cancelled")


def import_status(user_id: str, job_id: int) -> ImportProgress | None:
    """Counts, progress, rate and ETA (from the recent batches' rate; see
    ``worker.bookmarks.progress``), and why it is not moving when it is not."""
    from worker.bookmarks import progress

    with session_scope(user_id=_require_user(user_id)) as session:
        job = queries.import_job(session, user_id, job_id)
        if job is None:
            return None
        est = progress.estimate_job(
            session, job, window=get_settings().window, now=queries.db_now(session)
        )
        return ImportProgress(
            id=job.id,
            status=job.status,
            filename=job.filename,
            source_format=job.source_format,
            total=job.total,
            processed=job.processed,
            created=job.created_count,
            duplicates=job.duplicate_count,
            skipped=job.skipped_count,
            failed=job.failed_count,
            skipped_reasons=dict(job.skipped_reasons or {}),
            error=job.error,
            rate_per_s=est.rate_per_s,
            eta_s=est.eta_s,
            lane=job.lane,
            note=est.note,
            searchable_at=job.first_pass_at,
        )


def pause_import(user_id: str, job_id: int) -> dict[str, Any]:
    """Hold the import's unfinished batches in the database; nothing staged is lost.
    Returns ``{"job_id", "ok", "status", "message", "removed"}``."""
    from worker.bookmarks import control
    from worker.db.engine import get_engine

    return control.pause(get_engine(), job_id, user_id=_require_user(user_id)).as_dict()


def resume_import(
    user_id: str, job_id: int, *, settings: Settings | None = None, celery: Celery | None = None
) -> dict[str, Any]:
    """Continue a paused import where it stopped (finished batches are not redone)."""
    from worker.bookmarks import control
    from worker.db.engine import get_engine

    def send(task: str, args: list[Any], queue: str) -> None:
        _send(celery or app_module.app, task, args, queue)

    result = control.resume(
        get_engine(), settings or get_settings(), job_id, user_id=_require_user(user_id), send=send
    )
    return result.as_dict()


def cancel_import(user_id: str, job_id: int, *, keep: bool = False) -> dict[str, Any]:
    """Stop the import and remove the bookmarks it created (with ``keep``: only those not
    embedded yet, so importing the file again adds exactly them). ``removed`` counts them."""
    from worker.bookmarks import control
    from worker.db.engine import get_engine

    return control.cancel(get_engine(), job_id, user_id=_require_user(user_id), keep=keep).as_dict()


def wait_for_items(
    user_id: str, item_ids: list[int], *, timeout: float = 600, poll: float = 0.5
) -> dict[str, int]:
    """Block until no item is queued or processing (or the timeout); return status counts."""
    deadline = time.monotonic() + timeout
    while True:
        with session_scope(user_id=_require_user(user_id)) as session:
            counts = queries.items_status_counts(session, user_id, item_ids)
        if not (counts.get("queued") or counts.get("processing")) or time.monotonic() > deadline:
            return counts
        time.sleep(poll)


def wait_for_import(
    user_id: str, job_id: int, *, timeout: float = 3600, poll: float = 0.5
) -> ImportProgress:
    """Block until the import is done, failed or cancelled (or the timeout); return its
    progress. Raises LookupError when the job does not exist for this user."""
    deadline = time.monotonic() + timeout
    while True:
        progress = import_status(user_id, job_id)
        if progress is None:
            raise LookupError(f"no import job {job_id} for user {user_id}")
        if progress.finished or time.monotonic() > deadline:
            return progress
        time.sleep(poll)
