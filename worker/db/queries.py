"""Reads and small writes shared by the client, the CLI and the tasks. Every function that
touches user data takes ``user_id`` and filters by it: no query here crosses users."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session

from worker.db.models import Bookmark, EmbeddingModel, ImportJob, Item

# One statement each way (the producer's enqueue is on its request path, and a re-upload
# of an unchanged folder is mostly this): the live item already registered for the path,
# locked and queued again; or a new item and its upload row together.
_REQUEUE_UPLOAD = text(
    "WITH found AS (SELECT i.id FROM item i JOIN upload u ON u.item_id = i.id "
    "WHERE u.user_id = :u AND u.file_path = :path AND i.user_id = :u "
    "AND i.deleted_at IS NULL ORDER BY i.id LIMIT 1 FOR UPDATE OF i), "
    "requeued AS (UPDATE item SET status = 'queued', attempts = 0, error = NULL, "
    "updated_at = now() FROM found WHERE item.id = found.id RETURNING item.id), "
    "touched AS (UPDATE upload SET file_size = :size, original_filename = :original, "
    "mime_type = :mime, updated_at = now() FROM requeued WHERE upload.item_id = requeued.id) "
    "SELECT id FROM requeued"
)
_NEW_UPLOAD = text(
    "WITH new_item AS (INSERT INTO item (user_id, kind, status, title) "
    "VALUES (:u, 'upload', 'queued', :original) RETURNING id), "
    "new_upload AS (INSERT INTO upload (item_id, user_id, filename, original_filename, "
    "file_path, file_size, mime_type) SELECT id, :u, :filename, :original, :path, :size, :mime "
    "FROM new_item) SELECT id FROM new_item"
)


def insert_upload(
    session: Session,
    *,
    user_id: str,
    file_path: str,
    filename: str,
    original_filename: str | None,
    file_size: int | None,
    mime_type: str | None,
) -> int:
    """The item for this user's file: a new one, or the live one already registered for the
    same path, queued again (so re-enqueueing a file never duplicates it; unchanged content
    is then a no-op in the worker)."""
    params = {
        "u": user_id,
        "path": file_path,
        "filename": filename,
        "original": original_filename,
        "size": file_size,
        "mime": mime_type,
    }
    existing = session.execute(_REQUEUE_UPLOAD, params).scalar_one_or_none()
    if existing is not None:
        return int(existing)
    return int(session.execute(_NEW_UPLOAD, params).scalar_one())


def insert_import_job(
    session: Session,
    *,
    user_id: str,
    filename: str,
    file_size: int | None,
    source_format: str | None = None,
) -> int:
    """``source_format``: the format the producer named (None: detect it from the content);
    once parsed, the format the file was read as."""
    job = ImportJob(
        user_id=user_id,
        filename=filename,
        file_size_bytes=file_size,
        source_format=source_format,
    )
    session.add(job)
    session.flush()
    return job.id


@dataclass(frozen=True)
class ItemStatus:
    id: int
    user_id: str
    kind: str
    status: str
    title: str | None
    attempts: int
    error: str | None
    created_at: datetime
    processed_at: datetime | None
    chunks: int
    analysis_version: int | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def item_status(session: Session, user_id: str, item_id: int) -> ItemStatus | None:
    row = session.execute(
        text(
            "SELECT i.id, i.user_id, i.kind, i.status, i.title, i.attempts, i.error, "
            "i.created_at, i.processed_at, "
            "(SELECT count(*) FROM embedding e WHERE e.item_id = i.id AND e.user_id = i.user_id "
            " AND e.chunk_index >= 0) AS chunks, "
            "(SELECT max(version) FROM analysis a WHERE a.item_id = i.id "
            " AND a.user_id = i.user_id) AS analysis_version "
            "FROM item i WHERE i.id = :id AND i.user_id = :user_id AND i.deleted_at IS NULL"
        ),
        {"id": item_id, "user_id": user_id},
    ).first()
    return ItemStatus(**row._mapping) if row else None


def items_status_counts(session: Session, user_id: str, item_ids: list[int]) -> dict[str, int]:
    rows = session.execute(
        select(Item.status, func.count())
        .where(Item.user_id == user_id, Item.id.in_(item_ids))
        .group_by(Item.status)
    ).all()
    return {status: count for status, count in rows}


def list_items(
    session: Session,
    user_id: str,
    *,
    kind: str | None = None,
    status: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> list[dict[str, Any]]:
    stmt = (
        select(Item.id, Item.kind, Item.status, Item.title, Item.error, Item.created_at)
        .where(Item.user_id == user_id, Item.deleted_at.is_(None))
        .order_by(Item.created_at.desc(), Item.id.desc())
        .limit(limit)
        .offset(offset)
    )
    if kind:
        stmt = stmt.where(Item.kind == kind)
    if status:
        stmt = stmt.where(Item.status == status)
    return [dict(r._mapping) for r in session.execute(stmt)]


def import_job(session: Session, user_id: str, job_id: int) -> ImportJob | None:
    return session.scalar(
        select(ImportJob).where(ImportJob.id == job_id, ImportJob.user_id == user_id)
    )


def soft_delete_item(session: Session, user_id: str, item_id: int) -> bool:
    now = datetime.now(UTC)
    result = session.execute(
        update(Item)
        .where(Item.id == item_id, Item.user_id == user_id, Item.deleted_at.is_(None))
        .values(deleted_at=now)
    )
    session.execute(
        update(Bookmark)
        .where(Bookmark.item_id == item_id, Bookmark.user_id == user_id)
        .values(deleted_at=now)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def embedding_models(session: Session, states: tuple[str, ...]) -> list[EmbeddingModel]:
    return list(
        session.scalars(
            select(EmbeddingModel)
            .where(EmbeddingModel.state.in_(states))
            .order_by(EmbeddingModel.id)
        )
    )


def db_now(session: Session) -> datetime:
    """The database's clock: rates and deadlines must not mix two machines' clocks."""
    now: datetime = session.execute(text("SELECT now()")).scalar_one()
    return now


def batch_claim_holds(
    session: Session,
    table: Literal["import_batch", "backfill_batch"],
    batch_id: int,
    attempt: int,
    claimed_at: datetime,
) -> bool:
    """Lock the batch row and tell whether this claim (its attempt number and claim time)
    is still the current one: a batch re-claimed by another worker after this one was
    presumed dead must not be written twice."""
    row = session.execute(
        text(f"SELECT status, attempts, claimed_at FROM {table} WHERE id = :id FOR UPDATE"),
        {"id": batch_id},
    ).first()
    return row is not None and (row.status, row.attempts, row.claimed_at) == (
        "processing",
        attempt,
        claimed_at,
    )
