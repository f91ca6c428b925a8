"""SQLAlchemy 2 typed models: the schema of DESIGN section 2.

Alembic migrations create the tables; these classes describe them (and autogenerate
compares the two in ``tests/test_migrations.py``). Conventions: identity primary keys,
``user_id`` first in every user index, named constraints, ``created_at``/``updated_at``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pgvector.sqlalchemy import Vector
from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Computed,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, TSVECTOR
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

ITEM_KINDS = ("upload", "bookmark")
ITEM_STATUSES = ("queued", "processing", "done", "failed", "skipped")
JOB_STATUSES = ("queued", "processing", "done", "failed", "cancelled", "paused")
BATCH_STATUSES = ("queued", "processing", "done", "failed")
# interactive: its batches go to the ingest queue at once; bulk: the dispatcher releases them
# to the bulk queue a few at a time (worker.bookmarks.dispatch).
IMPORT_LANES = ("interactive", "bulk")
# first_pass: a fast stand-in that embeds a bulk import while it is staged; the serving
# model's vectors replace its rows batch by batch (worker.bookmarks.first_pass).
MODEL_STATES = ("active", "backfilling", "retired", "first_pass")
BACKFILL_JOB_STATUSES = ("queued", "running", "indexing", "done", "failed", "cancelled")
DISTANCES = ("cosine", "l2", "ip")
INDEX_KINDS = ("hnsw", "ivfflat")

# English stemming for full-text search; the generated columns need an immutable
# expression, hence the explicit regconfig and the immutable array helper (migration 0002).
TS_CONFIG = "english"


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSONB, list[str]: ARRAY(Text)}


def _pk() -> Mapped[int]:
    return mapped_column(BigInteger, Identity(always=True), primary_key=True)


def _created() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)


def _updated() -> Mapped[datetime]:
    return mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now(), nullable=False
    )


class Item(Base):
    __tablename__ = "item"

    id: Mapped[int] = _pk()
    user_id: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text, server_default="queued")
    title: Mapped[str | None] = mapped_column(Text)
    content_sha256: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    error: Mapped[str | None] = mapped_column(Text)
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    processed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()

    __table_args__ = (
        CheckConstraint(_in("kind", ITEM_KINDS), name="kind"),
        CheckConstraint(_in("status", ITEM_STATUSES), name="status"),
        Index("ix_item_user_id_status", "user_id", "status"),
        Index("ix_item_user_id_created_at", "user_id", "created_at"),
        # The requeue scan looks across users for stuck rows only: a small partial index.
        Index(
            "ix_item_stuck",
            "status",
            "updated_at",
            postgresql_where=text("status IN ('queued', 'processing')"),
        ),
    )


class Upload(Base):
    __tablename__ = "upload"

    item_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("item.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[str] = mapped_column(Text)
    filename: Mapped[str] = mapped_column(Text)
    original_filename: Mapped[str | None] = mapped_column(Text)
    file_path: Mapped[str] = mapped_column(Text)
    file_size: Mapped[int | None] = mapped_column(BigInteger)
    mime_type: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()

    __table_args__ = (Index("ix_upload_user_id_file_path", "user_id", "file_path"),)


class ImportJob(Base):
    __tablename__ = "import_job"

    id: Mapped[int] = _pk()
    user_id: Mapped[str] = mapped_column(Text)
    source_format: Mapped[str | None] = mapped_column(Text)
    filename: Mapped[str] = mapped_column(Text)
    file_size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(Text, server_default="queued")
    total: Mapped[int] = mapped_column(Integer, server_default="0")
    processed: Mapped[int] = mapped_column(Integer, server_default="0")
    created_count: Mapped[int] = mapped_column(Integer, server_default="0")
    duplicate_count: Mapped[int] = mapped_column(Integer, server_default="0")
    skipped_count: Mapped[int] = mapped_column(Integer, server_default="0")
    failed_count: Mapped[int] = mapped_column(Integer, server_default="0")
    skipped_reasons: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    error: Mapped[str | None] = mapped_column(Text)
    # The embedding partition of a large import (its job id), None when the import wrote
    # into the main one; indexed_at is set when its vector indexes are built.
    segment: Mapped[int | None] = mapped_column(BigInteger)
    segment_indexed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # When the first-pass model's vectors of the new bookmarks committed with the staging:
    # from then on the import is searchable (NULL: no first pass).
    first_pass_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    first_pass_model: Mapped[str | None] = mapped_column(Text)
    lane: Mapped[str] = mapped_column(Text, server_default="interactive")
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()

    __table_args__ = (
        CheckConstraint(_in("status", JOB_STATUSES), name="status"),
        CheckConstraint(_in("lane", IMPORT_LANES), name="lane"),
        Index("ix_import_job_user_id_created_at", "user_id", "created_at"),
    )


class ImportBatch(Base):
    """A slice of an import's bookmarks embedded by one task. Staged here, not only in Redis,
    so a killed worker or a lost message resumes from the database (requeue finds it)."""

    __tablename__ = "import_batch"

    id: Mapped[int] = _pk()
    import_job_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("import_job.id", ondelete="CASCADE")
    )
    user_id: Mapped[str] = mapped_column(Text)
    seq: Mapped[int] = mapped_column(Integer)
    item_ids: Mapped[list[int]] = mapped_column(ARRAY(BigInteger))
    status: Mapped[str] = mapped_column(Text, server_default="queued")
    # held: staged in the database, waiting for the dispatcher (bulk lane) or for a resume;
    # no message for it is meant to be in Redis, and a stale one finds nothing to do.
    held: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    released_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()

    __table_args__ = (
        CheckConstraint(_in("status", BATCH_STATUSES), name="status"),
        UniqueConstraint("import_job_id", "seq", name="uq_import_batch_import_job_id_seq"),
        Index("ix_import_batch_user_id_import_job_id", "user_id", "import_job_id"),
        # The dispatcher's candidates: each user's held batches in release order.
        Index(
            "ix_import_batch_held",
            "user_id",
            "import_job_id",
            "seq",
            postgresql_where=text("held AND status = 'queued'"),
        ),
        Index(
            "ix_import_batch_stuck",
            "status",
            "updated_at",
            postgresql_where=text("status IN ('queued', 'processing')"),
        ),
    )


class Bookmark(Base):
    __tablename__ = "bookmark"

    item_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("item.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[str] = mapped_column(Text)
    url: Mapped[str] = mapped_column(Text)
    canonical_url: Mapped[str] = mapped_column(Text)
    domain: Mapped[str | None] = mapped_column(Text)
    folder_path: Mapped[list[str]] = mapped_column(server_default=text("'{}'::text[]"))
    tags: Mapped[list[str]] = mapped_column(server_default=text("'{}'::text[]"))
    description: Mapped[str | None] = mapped_column(Text)
    added_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The user's own note, and read/archived state (None: the export did not say); extra
    # holds what the export said that has no column (favourite, tab group, ...).
    note: Mapped[str | None] = mapped_column(Text)
    is_read: Mapped[bool | None] = mapped_column(Boolean)
    is_archived: Mapped[bool | None] = mapped_column(Boolean)
    extra: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    import_job_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("import_job.id", ondelete="SET NULL")
    )
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()

    __table_args__ = (
        Index(
            "uq_bookmark_user_id_canonical_url_live",
            "user_id",
            "canonical_url",
            unique=True,
            postgresql_where=text("deleted_at IS NULL"),
        ),
        Index("ix_bookmark_user_id_domain", "user_id", "domain"),
        Index("ix_bookmark_user_id_tags", "user_id", "tags", postgresql_using="gin"),
        Index("ix_bookmark_import_job_id", "import_job_id"),
    )


ANALYSIS_TSV = (
    f"setweight(to_tsvector('{TS_CONFIG}'::regconfig, coalesce(title, '')), 'A') || "
    f"setweight(to_tsvector('{TS_CONFIG}'::regconfig, coalesce(summary, '')), 'B') || "
    f"setweight(to_tsvector('{TS_CONFIG}'::regconfig, "
    "worker_immutable_array_to_string(keywords)), 'B')"
)
EMBEDDING_TSV = f"to_tsvector('{TS_CONFIG}'::regconfig, coalesce(content, ''))"


class Analysis(Base):
    __tablename__ = "analysis"

    id: Mapped[int] = _pk()
    item_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("item.id", ondelete="CASCADE"))
    user_id: Mapped[str] = mapped_column(Text)
    version: Mapped[int] = mapped_column(Integer)
    title: Mapped[str | None] = mapped_column(Text)
    summary: Mapped[str | None] = mapped_column(Text)
    category: Mapped[str | None] = mapped_column(Text)
    keywords: Mapped[list[str]] = mapped_column(server_default=text("'{}'::text[]"))
    language: Mapped[str | None] = mapped_column(Text)
    word_count: Mapped[int | None] = mapped_column(Integer)
    content_sha256: Mapped[str | None] = mapped_column(Text)
    raw_response: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    provider: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(Text)
    trace_id: Mapped[str | None] = mapped_column(Text)
    search_vector: Mapped[Any] = mapped_column(
        TSVECTOR, Computed(ANALYSIS_TSV, persisted=True), nullable=True
    )
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()

    __table_args__ = (
        UniqueConstraint("item_id", "version", name="uq_analysis_item_id_version"),
        Index("ix_analysis_item_id_version", "item_id", text("version DESC")),
        Index("ix_analysis_user_id_category", "user_id", "category"),
        Index("ix_analysis_search_vector", "search_vector", postgresql_using="gin"),
    )


class Embedding(Base):
    """Partitioned by ``segment`` (migration 0004): 0 is ``embedding_main``, where uploads and
    small imports go and the per-model vector indexes live; a large import writes into a
    partition of its own that gets its vector index in one bulk build at the end
    (worker.bookmarks.segments)."""

    __tablename__ = "embedding"

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    segment: Mapped[int] = mapped_column(BigInteger, primary_key=True, server_default="0")
    item_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("item.id", ondelete="CASCADE"))
    analysis_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("analysis.id", ondelete="CASCADE")
    )
    user_id: Mapped[str] = mapped_column(Text)
    chunk_index: Mapped[int] = mapped_column(Integer)
    content: Mapped[str] = mapped_column(Text)
    # No fixed dimension: vectors of several models share the table, each model indexed by
    # a partial expression index that casts to its own dimension (worker.db.indexes).
    embedding: Mapped[Any] = mapped_column(Vector())
    model: Mapped[str] = mapped_column(Text)
    dimensions: Mapped[int] = mapped_column(Integer)
    source: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    search_vector: Mapped[Any] = mapped_column(
        TSVECTOR, Computed(EMBEDDING_TSV, persisted=True), nullable=True
    )
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()

    __table_args__ = (
        # A redelivered task can never write a chunk twice (an item's rows all live in one
        # segment; a partitioned table's unique keys must hold the partition key).
        UniqueConstraint("item_id", "model", "chunk_index", "segment"),
        Index("ix_embedding_user_id_model", "user_id", "model"),
        Index("ix_embedding_search_vector", "search_vector", postgresql_using="gin"),
        Index("ix_embedding_analysis_id", "analysis_id"),
        {"postgresql_partition_by": "LIST (segment)"},
    )


class EmbeddingModel(Base):
    __tablename__ = "embedding_model"

    id: Mapped[int] = _pk()
    name: Mapped[str] = mapped_column(Text)
    dimensions: Mapped[int] = mapped_column(Integer)
    distance: Mapped[str] = mapped_column(Text, server_default="cosine")
    state: Mapped[str] = mapped_column(Text, server_default="active")
    # Which model answers searches: exactly one (unique partial index). Kept apart from
    # ``state`` because the previous model stays embedded (active) after a cut-over.
    serving: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    path: Mapped[str | None] = mapped_column(Text)
    package: Mapped[str | None] = mapped_column(Text)
    index_kind: Mapped[str] = mapped_column(Text, server_default="hnsw")
    index_precision: Mapped[str] = mapped_column(Text, server_default="vector")
    index_params: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    rows_at_build: Mapped[int | None] = mapped_column(BigInteger)
    built_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_recall: Mapped[float | None] = mapped_column()
    last_recall_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()

    __table_args__ = (
        UniqueConstraint("name", name="uq_embedding_model_name"),
        CheckConstraint(_in("state", MODEL_STATES), name="state"),
        CheckConstraint(_in("distance", DISTANCES), name="distance"),
        CheckConstraint(_in("index_kind", INDEX_KINDS), name="index_kind"),
        CheckConstraint(_in("index_precision", ("vector", "halfvec")), name="index_precision"),
        CheckConstraint("dimensions BETWEEN 1 AND 16000", name="dimensions"),
        CheckConstraint("NOT serving OR state = 'active'", name="serving_active"),
        Index(
            "uq_embedding_model_serving",
            "serving",
            unique=True,
            postgresql_where=text("serving"),
        ),
        Index(
            "uq_embedding_model_first_pass",
            "state",
            unique=True,
            postgresql_where=text("state = 'first_pass'"),
        ),
    )


class BackfillJob(Base):
    """Re-embedding every live item's stored chunk texts with a newly added model
    (worker.backfill). Counters advance in the same transaction as each batch's vectors."""

    __tablename__ = "backfill_job"

    id: Mapped[int] = _pk()
    model_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("embedding_model.id", ondelete="CASCADE")
    )
    source_model: Mapped[str] = mapped_column(Text)  # the serving model when it was staged
    status: Mapped[str] = mapped_column(Text, server_default="queued")
    total_batches: Mapped[int] = mapped_column(Integer, server_default="0")
    total_items: Mapped[int] = mapped_column(Integer, server_default="0")
    total_rows: Mapped[int] = mapped_column(BigInteger, server_default="0")
    done_batches: Mapped[int] = mapped_column(Integer, server_default="0")
    done_items: Mapped[int] = mapped_column(Integer, server_default="0")
    rows_written: Mapped[int] = mapped_column(BigInteger, server_default="0")
    failed_batches: Mapped[int] = mapped_column(Integer, server_default="0")
    passes: Mapped[int] = mapped_column(Integer, server_default="0")
    error: Mapped[str | None] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()

    __table_args__ = (
        CheckConstraint(_in("status", BACKFILL_JOB_STATUSES), name="status"),
        Index("ix_backfill_job_model_id_created_at", "model_id", "created_at"),
        Index(
            "ix_backfill_job_open",
            "status",
            "updated_at",
            postgresql_where=text("status IN ('queued', 'running', 'indexing')"),
        ),
    )


class BackfillBatch(Base):
    """A slice of a backfill's items, re-embedded and written by one task; staged here so
    a killed worker or a lost message resumes from the database."""

    __tablename__ = "backfill_batch"

    id: Mapped[int] = _pk()
    job_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("backfill_job.id", ondelete="CASCADE")
    )
    seq: Mapped[int] = mapped_column(Integer)
    item_ids: Mapped[list[int]] = mapped_column(ARRAY(BigInteger))
    source_rows: Mapped[int] = mapped_column(Integer, server_default="0")
    status: Mapped[str] = mapped_column(Text, server_default="queued")
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    rows_written: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()

    __table_args__ = (
        CheckConstraint(_in("status", BATCH_STATUSES), name="status"),
        UniqueConstraint("job_id", "seq", name="uq_backfill_batch_job_id_seq"),
        Index("ix_backfill_batch_job_id_status", "job_id", "status"),
        Index(
            "ix_backfill_batch_stuck",
            "status",
            "updated_at",
            postgresql_where=text("status IN ('queued', 'processing')"),
        ),
    )


class MaintenanceRun(Base):
    __tablename__ = "maintenance_run"

    id: Mapped[int] = _pk()
    kind: Mapped[str] = mapped_column(Text)
    target: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text, server_default="running")
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    details: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()

    __table_args__ = (
        CheckConstraint(_in("status", ("running", "done", "skipped", "failed")), name="status"),
        Index("ix_maintenance_run_kind_started_at", "kind", "started_at"),
    )
