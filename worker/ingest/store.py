"""Every write of the upload pipeline, each in its own short transaction.

The protocol (DESIGN sections 1.2-1.4): ``claim_upload`` marks the item ``processing`` and bumps
``attempts`` (the claim is that attempt number); nothing is held open while the model runs;
``write_upload`` locks the item row, checks that the claim still holds (no later claim took
over, the item was not deleted), and replaces analysis + vectors + status in one
transaction. A crash at any point leaves the old complete state or the new one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from sqlalchemy import Connection, Engine, text
from sqlalchemy.orm import Session

from worker.db.engine import session_scope
from worker.ingest.types import AnalysisResult, EmbeddedChunk

log = logging.getLogger(__name__)

EMBEDDING_COPY = (
    "COPY embedding (item_id, analysis_id, user_id, chunk_index, content, embedding, model, "
    "dimensions, source, segment) FROM STDIN (FORMAT BINARY)"
)
EMBEDDING_TYPES = [
    "int8",
    "int8",
    "text",
    "int4",
    "text",
    "vector",
    "text",
    "int4",
    "jsonb",
    "int8",
]


@dataclass(frozen=True)
class ModelRow:
    """A model new items are embedded with (active or backfilling), as the claim read it."""

    name: str
    dimensions: int
    path: str | None
    package: str | None
    serving: bool


@dataclass(frozen=True)
class LastResult:
    """What the item's last processing left: enough to tell an unchanged re-upload."""

    provider: str
    model: str
    content_sha256: str | None
    models: frozenset[str]  # models that have vectors for the item


@dataclass(frozen=True)
class Claim:
    item_id: int
    user_id: str
    attempt: int
    claimed_at: datetime  # with ``attempt``, identifies this claim even if attempts reset
    file_path: str
    content_sha256: str | None
    # Read in the claim's transaction, so that the pipeline (and above all an unchanged
    # re-upload, which needs nothing else) does not open one more for each.
    models: tuple[ModelRow, ...] = ()
    last: LastResult | None = None


def _claim_select(where: str) -> str:
    """The rows a claim reads, locked: the item and its upload, the models new items are
    embedded with, and what its last processing left (to tell an unchanged re-upload)."""
    return (
        "SELECT i.id, i.user_id, i.status, i.attempts, i.deleted_at, i.content_sha256, "
        "u.file_path, "
        "(SELECT json_agg(json_build_object('name', m.name, 'dimensions', m.dimensions, "
        "'path', m.path, 'package', m.package, 'serving', m.serving) ORDER BY m.id) "
        "FROM embedding_model m WHERE m.state IN ('active', 'backfilling')) AS models, "
        # Only an item processed before can be unchanged (an untaken CASE branch runs nothing).
        "CASE WHEN i.content_sha256 IS NOT NULL THEN (SELECT json_build_object("
        "'provider', a.provider, 'model', a.model, 'sha', a.content_sha256, "
        "'models', ARRAY(SELECT DISTINCT e.model FROM embedding e "
        "WHERE e.item_id = i.id AND e.user_id = i.user_id)) "
        "FROM analysis a WHERE a.item_id = i.id AND a.user_id = i.user_id "
        "ORDER BY a.version DESC LIMIT 1) END AS last "
        f"FROM item i JOIN upload u ON u.item_id = i.id WHERE {where} AND i.kind = 'upload' "
        "FOR UPDATE OF i"
    )


_CLAIM_SELECT = _claim_select("i.id = :id")
_CLAIM_UPDATE = (
    "UPDATE item SET status = 'processing', attempts = attempts + 1, "
    "claimed_at = clock_timestamp(), updated_at = now() WHERE id = ANY(:ids) "
    "RETURNING id, attempts, claimed_at"
)
# An upload that a group holds (see ``adopted_uploads``): a session-level advisory lock per
# item on the group's own connection, so that it goes the moment that worker dies.
_GROUP_LOCK = "hashtextextended('upload:' || {}, 0)"
# A worker's host that dies without closing its connections (power, kernel panic, a network
# cut) leaves the server holding the group's locks until TCP keepalive notices: two hours and
# more with the kernel's defaults, during which the group's items are acknowledged as
# adopted and stay unprocessed. The group's connection asks the server to probe after a
# minute of silence, every 10 s, and to give up after 6 unanswered probes (about 2 min).
# A session setting (no superuser, no server config); ignored over a Unix socket.
GROUP_KEEPALIVE = {
    "tcp_keepalives_idle": "60",
    "tcp_keepalives_interval": "10",
    "tcp_keepalives_count": "6",
}


@dataclass(frozen=True)
class ClaimResult:
    """``claim`` is set when this worker now owns the item; otherwise ``reason`` says why
    not: 'missing' (no such item), 'finished' (done/failed/skipped/deleted: a redelivered
    message), 'exhausted' (too many attempts: now failed), 'adopted' (a live worker is
    processing it in a group: this message is not needed)."""

    claim: Claim | None
    reason: str | None = None
    user_id: str | None = None  # of an adopted or finished item, for the log line


def _claim_of(row: Any, attempt: int, claimed_at: datetime) -> Claim:
    last = row.last
    return Claim(
        row.id,
        row.user_id,
        attempt,
        claimed_at,
        row.file_path,
        row.content_sha256,
        models=tuple(ModelRow(**m) for m in row.models or ()),
        last=LastResult(last["provider"], last["model"], last["sha"], frozenset(last["models"]))
        if last
        else None,
    )


def claim_upload(engine: Engine, item_id: int, *, max_attempts: int) -> ClaimResult:
    with session_scope(engine) as s:
        row = s.execute(text(_CLAIM_SELECT), {"id": item_id}).first()
        if row is None:
            return ClaimResult(None, "missing")
        if row.deleted_at is not None or row.status not in ("queued", "processing"):
            return ClaimResult(None, "finished", row.user_id)
        if (
            row.status == "processing"
            and not s.execute(
                text(f"SELECT pg_try_advisory_xact_lock({_GROUP_LOCK.format(':id')})"),
                {"id": item_id},
            ).scalar_one()
        ):
            return ClaimResult(None, "adopted", row.user_id)
        if row.attempts >= max_attempts:
            _set_failed(
                s,
                item_id,
                row.attempts,
                f"gave up after {row.attempts} attempts (the worker died or timed out each "
                "time); check the worker logs, then `worker retry` the item",
            )
            return ClaimResult(None, "exhausted")
        _, attempt, claimed_at = s.execute(text(_CLAIM_UPDATE), {"ids": [item_id]}).one()
        return ClaimResult(_claim_of(row, attempt, claimed_at))


@contextmanager
def adopted_uploads(
    engine: Engine,
    claim: Claim,
    *,
    limit: int,
    max_bytes: int,
    max_attempts: int,
    processes: int = 1,
) -> Iterator[list[Claim]]:
    """Claim up to ``limit`` more queued uploads of ``claim``'s user (at most ``max_bytes`` of
    files in all), so that one task encodes their chunks in shared batches: a document's few
    chunks make small batches padded to their longest (README, bench.ingest_uploads). Only a
    ``processes``-th of what waits is taken, so that a burst still spreads over every
    worker process.

    Each adopted item is claimed as its own message would claim it (attempts + 1), under a
    session advisory lock held on a connection of its own until the block ends; so is
    ``claim``'s item. A message for any of them meanwhile (its own, a redelivery, a resend)
    sees the lock and is acknowledged as 'adopted'. If this worker dies, its connection
    closes and the locks go with it: a message still queued claims the item as usual, and
    one already acknowledged is sent again by the requeue task (the row stays
    ``processing``): nothing is lost."""
    if limit < 1:
        yield []
        return
    with engine.connect() as conn:
        try:
            with conn.begin():
                _keep_alive(conn)
                claims = _adopt(conn, claim, limit, max_bytes, max_attempts, processes)
            yield claims
        finally:
            try:
                conn.execute(text("SELECT pg_advisory_unlock_all()"))
                _keep_alive(conn, on=False)
                conn.commit()
            except Exception:  # the connection broke: the server dropped its locks with it
                conn.invalidate()


def _keep_alive(conn: Connection, *, on: bool = True) -> None:
    """``GROUP_KEEPALIVE`` for this session (the locks outlive the transaction), or with
    ``on=False`` the server's own values again, before the connection goes back to the pool."""
    conn.execute(
        text(
            "SELECT set_config(name, CASE WHEN :on THEN (CAST(:values AS jsonb) ->> name) "
            "ELSE reset_val END, false) FROM pg_settings WHERE name = ANY(:names)"
        ),
        {"on": on, "values": json.dumps(GROUP_KEEPALIVE), "names": list(GROUP_KEEPALIVE)},
    )


def _adopt(
    conn: Connection, claim: Claim, limit: int, max_bytes: int, max_attempts: int, processes: int
) -> list[Claim]:
    conn.execute(
        text(f"SELECT pg_try_advisory_lock({_GROUP_LOCK.format(':id')})"), {"id": claim.item_id}
    )
    waiting = conn.execute(
        text(
            "SELECT i.id, coalesce(u.file_size, 0) AS size FROM item i "
            "JOIN upload u ON u.item_id = i.id WHERE i.user_id = :user AND i.kind = 'upload' "
            "AND i.status = 'queued' AND i.deleted_at IS NULL AND i.attempts < :max "
            "AND i.id <> :id ORDER BY i.id LIMIT :limit FOR UPDATE OF i SKIP LOCKED"
        ),
        {
            "user": claim.user_id,
            "max": max_attempts,
            "id": claim.item_id,
            "limit": limit * max(1, processes),
        },
    ).all()
    picked: list[int] = []
    total = 0
    for item_id, size in waiting[: len(waiting) // max(1, processes)]:
        total += size
        if total > max_bytes:
            break
        picked.append(item_id)
    locked = list(
        conn.execute(
            text(
                "SELECT id FROM unnest(CAST(:ids AS bigint[])) AS id "
                f"WHERE pg_try_advisory_lock({_GROUP_LOCK.format('id')})"
            ),
            {"ids": picked},
        ).scalars()
    )
    if not locked:
        return []
    rows = {r.id: r for r in conn.execute(text(_claim_select("i.id = ANY(:ids)")), {"ids": locked})}
    claimed = conn.execute(text(_CLAIM_UPDATE), {"ids": locked}).all()
    return sorted(
        (_claim_of(rows[item_id], attempt, at) for item_id, attempt, at in claimed),
        key=lambda c: c.item_id,
    )


def release_claims(engine: Engine, claims: Iterable[Claim]) -> list[int]:
    """Put adopted items back in ``queued`` (their attempts kept) when their group could not
    finish them; returns the ids whose claim still held, for the caller to send again."""
    released = []
    with session_scope(engine) as s:
        for claim in claims:
            if _lock_if_claimed(s, claim):
                s.execute(
                    text("UPDATE item SET status = 'queued', updated_at = now() WHERE id = :id"),
                    {"id": claim.item_id},
                )
                released.append(claim.item_id)
    return released


def _lock_if_claimed(s: Session, claim: Claim) -> bool:
    """Lock the item and report whether ``claim`` is still the current one."""
    row = s.execute(
        text("SELECT status, attempts, claimed_at, deleted_at FROM item WHERE id = :id FOR UPDATE"),
        {"id": claim.item_id},
    ).first()
    return (
        row is not None
        and row.deleted_at is None
        and row.status == "processing"
        and row.attempts == claim.attempt
        and row.claimed_at == claim.claimed_at
    )


def _set_failed(
    s: Session, item_id: int, attempt: int, message: str, *, skip: bool = False
) -> None:
    s.execute(
        text(
            "UPDATE item SET status = :status, error = :error, processed_at = now(), "
            "updated_at = now() WHERE id = :id AND attempts = :attempt"
        ),
        {
            "status": "skipped" if skip else "failed",
            "error": message,
            "id": item_id,
            "attempt": attempt,
        },
    )


def mark_failed(engine: Engine, claim: Claim, message: str, *, skip: bool = False) -> bool:
    """Record a permanent failure (or a skip) if the claim still holds."""
    with session_scope(engine) as s:
        if not _lock_if_claimed(s, claim):
            return False
        _set_failed(s, claim.item_id, claim.attempt, message, skip=skip)
        return True


def fail_item(engine: Engine, item_id: int, message: str) -> None:
    """Fail an item whatever its claim (retries exhausted, time limit hit)."""
    with session_scope(engine) as s:
        s.execute(
            text(
                "UPDATE item SET status = 'failed', error = :error, processed_at = now(), "
                "updated_at = now() WHERE id = :id AND status IN ('queued', 'processing')"
            ),
            {"id": item_id, "error": message},
        )


def finish_if_unchanged(
    engine: Engine, claim: Claim, sha256: str, *, provider: str, model: str, models: Sequence[str]
) -> str | None:
    """Same bytes, same analyzer, vectors present for every model: nothing to recompute, so
    the item is marked done (a re-upload of an unchanged folder is mostly this). What the
    last processing left was read with the claim, and the claim is checked again under the
    row lock here. Returns "unchanged", "stale" (the claim was taken over meanwhile) or
    None: the content must be processed."""
    last = claim.last
    if (
        claim.content_sha256 != sha256
        or last is None
        or (last.provider, last.model, last.content_sha256) != (provider, model, sha256)
        or not set(models) <= last.models
    ):
        return None
    with session_scope(engine) as s:
        if not _lock_if_claimed(s, claim):
            return "stale"
        s.execute(
            text(
                "UPDATE item SET status = 'done', error = NULL, processed_at = now(), "
                "updated_at = now() WHERE id = :id"
            ),
            {"id": claim.item_id},
        )
        return "unchanged"


def psycopg_connection(conn: Connection) -> psycopg.Connection[Any]:
    """The psycopg 3 connection under a SQLAlchemy one, for COPY (same transaction)."""
    raw = conn.connection.dbapi_connection
    if not isinstance(raw, psycopg.Connection):
        raise TypeError("the database driver must be psycopg 3 (postgresql+psycopg://)")
    return raw


def copy_embeddings(
    conn: Connection,
    rows: Iterable[tuple[int, int | None, str, EmbeddedChunk]],
    *,
    model: str,
    dimensions: int,
    segment: int = 0,
) -> int:
    """Binary COPY of vectors (2-2.4x psycopg's pipelined executemany for 100,000 vectors
    in bench.copy_rows, 44x executemany with text literals; a hand-built numpy COPY buffer
    was slower than psycopg's C row writer); ``rows`` are (item_id, analysis_id,
    user_id, chunk). ``segment`` picks the partition (worker.bookmarks.segments; 0 = main).
    Runs inside the caller's transaction."""
    import numpy as np

    count = 0
    with psycopg_connection(conn).cursor() as cur, cur.copy(EMBEDDING_COPY) as copy:
        copy.set_types(EMBEDDING_TYPES)
        for item_id, analysis_id, user_id, chunk in rows:
            copy.write_row(
                (
                    item_id,
                    analysis_id,
                    user_id,
                    chunk.chunk_index,
                    chunk.content.replace("\x00", ""),
                    np.asarray(chunk.vector, dtype=np.float32),
                    model,
                    dimensions,
                    Jsonb(chunk.source),
                    segment,
                )
            )
            count += 1
    return count


# Vectors alone (first-pass stand-ins): no text, no source, chunk 0.
BARE_VECTOR_COPY = (
    "COPY embedding (item_id, user_id, chunk_index, content, embedding, model, dimensions, "
    "segment) FROM STDIN (FORMAT BINARY)"
)
# The vector travels as bytes already in pgvector's binary form: a binary COPY hands each
# field to the column's own receive function whatever the client called its type.
BARE_VECTOR_TYPES = ["int8", "text", "int4", "text", "bytea", "text", "int4", "int8"]


def copy_bare_vectors(
    conn: Connection,
    blocks: Iterable[tuple[Sequence[int], Any]],
    *,
    user_id: str,
    model: str,
    dimensions: int,
    segment: int = 0,
) -> int:
    """Binary COPY of (item ids, float vectors) blocks as chunk-0 rows without text, in the
    caller's transaction. Each block's vectors are turned into pgvector's binary form
    (``dim``, ``0``, big-endian float4s) by one numpy conversion: the per-row vector and
    jsonb dumpers of ``copy_embeddings`` were two thirds of its Python time for 100,000
    rows."""
    import struct

    import numpy as np

    header = struct.pack(">HH", dimensions, 0)
    count = 0
    with psycopg_connection(conn).cursor() as cur, cur.copy(BARE_VECTOR_COPY) as copy:
        copy.set_types(BARE_VECTOR_TYPES)
        for item_ids, vectors in blocks:
            body = np.ascontiguousarray(vectors, dtype=">f4")
            if body.shape != (len(item_ids), dimensions):
                raise ValueError(
                    f"{len(item_ids)} ids but vectors of shape {body.shape} ({dimensions} dims)"
                )
            for item_id, row in zip(item_ids, body, strict=True):
                copy.write_row(
                    (item_id, user_id, 0, "", header + row.tobytes(), model, dimensions, segment)
                )
            count += len(item_ids)
    return count


def writable_models(conn: Connection, names: Sequence[str]) -> set[str]:
    """Which of ``names`` may still receive vectors (not retired), with their registry rows
    share-locked until the caller's transaction ends: ``worker models retire`` flips the state
    first and deletes afterwards, so a write either lands before the flip (and is deleted) or
    sees the model retired and skips it; none is left behind."""
    rows = conn.execute(
        text(
            "SELECT name FROM embedding_model WHERE name = ANY(:names) AND state <> 'retired' "
            "ORDER BY id FOR SHARE"
        ),
        {"names": list(names)},
    ).scalars()
    return set(rows)


def write_upload(
    engine: Engine,
    claim: Claim,
    *,
    sha256: str,
    title: str,
    analysis: AnalysisResult,
    trace_id: str | None,
    vectors: Mapping[str, tuple[int, Sequence[EmbeddedChunk]]],
) -> bool:
    """Analysis version n+1, this item's vectors replaced per model, status done — in one
    transaction. Returns False (writing nothing) when the claim no longer holds."""
    with session_scope(engine) as s:
        if not _lock_if_claimed(s, claim):
            log.info("claim %s of item %s lost; discarding result", claim.attempt, claim.item_id)
            return False
        analysis_id = insert_analysis(s, claim, analysis, sha256=sha256, trace_id=trace_id)
        conn = s.connection()
        writable = writable_models(conn, list(vectors))
        for model, (dimensions, chunks) in vectors.items():
            if model not in writable:
                continue  # retired while this item was being processed
            conn.execute(
                text("DELETE FROM embedding WHERE item_id = :id AND model = :model"),
                {"id": claim.item_id, "model": model},
            )
            copy_embeddings(
                conn,
                ((claim.item_id, analysis_id, claim.user_id, c) for c in chunks),
                model=model,
                dimensions=dimensions,
            )
        s.execute(
            text(
                "UPDATE item SET status = 'done', error = NULL, title = :title, "
                "content_sha256 = :sha, processed_at = now(), updated_at = now() WHERE id = :id"
            ),
            {"id": claim.item_id, "title": title or None, "sha": sha256},
        )
        return True


def insert_analysis(
    s: Session, claim: Claim, result: AnalysisResult, *, sha256: str, trace_id: str | None
) -> int:
    params: dict[str, Any] = {
        "item_id": claim.item_id,
        "user_id": claim.user_id,
        "title": result.title or None,
        "summary": result.summary,
        "category": result.category,
        "keywords": list(result.keywords),
        "language": result.language,
        "word_count": result.word_count,
        "sha": sha256,
        "raw": Jsonb(result.raw_response),
        "provider": result.provider,
        "model": result.model,
        "trace_id": trace_id,
    }
    analysis_id: int = s.execute(
        text(
            "INSERT INTO analysis (item_id, user_id, version, title, summary, category, keywords,"
            " language, word_count, content_sha256, raw_response, provider, model, trace_id) "
            "SELECT :item_id, :user_id, coalesce(max(version), 0) + 1, :title, :summary, "
            ":category, :keywords, :language, :word_count, :sha, :raw, :provider, :model, "
            ":trace_id FROM analysis WHERE item_id = :item_id RETURNING id"
        ),
        params,
    ).scalar_one()
    return analysis_id
