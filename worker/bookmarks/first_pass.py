"""A bulk import searchable as soon as it is staged: its new bookmarks embedded with the
first-pass model inside the staging transaction.

The serving model (a transformer) embeds a few hundred bookmark texts a second on two cores,
so a 100,000-bookmark import takes minutes before its last bookmark can be found. A static
model2vec model embeds tens of thousands a second. When one is registered as the first-pass
model (``worker models add NAME --path DIR --first-pass``), an import with at least
``FIRST_PASS_MIN_BOOKMARKS`` new bookmarks is embedded with it before its staging commits:
the items, their batches and these vectors commit together (a crash leaves none of them),
and from that commit on semantic search ranks the bookmarks that have no serving-model
vector yet by their first-pass vector (``worker.search``).

The serving model's vectors follow batch by batch as usual; each batch's write deletes its
items' first-pass rows in the same transaction (``importer.write_batch``), so the stand-ins
are gone when the import is done. A bookmark whose batch fails keeps its stand-in and stays
findable.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import Connection, text
from sqlalchemy.orm import Session

from worker.bookmarks.segments import SEARCHED_COLUMNS
from worker.config import Settings
from worker.db.indexes import segment_table
from worker.ingest.store import copy_bare_vectors, psycopg_connection, writable_models
from worker.ingest.types import Embedder

# Texts per encode call: large enough that the tokenizer's batch call dominates, small enough
# that the encoder thread keeps ahead of the COPY with little memory (10,000 x 256 floats).
BLOCK_ROWS = 10_000

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FirstPassModel:
    name: str
    dimensions: int
    path: str | None
    package: str | None


def first_pass_model(session: Session) -> FirstPassModel | None:
    """The registered first-pass model (at most one), if any."""
    row = session.execute(
        text(
            "SELECT name, dimensions, path, package FROM embedding_model WHERE state = 'first_pass'"
        )
    ).first()
    if row is None:
        return None
    return FirstPassModel(row.name, int(row.dimensions), row.path, row.package)


def wanted(settings: Settings, new_bookmarks: int) -> bool:
    """Whether an import with ``new_bookmarks`` new bookmarks gets a first pass (when a
    first-pass model is registered)."""
    threshold = settings.first_pass_min_bookmarks
    return threshold > 0 and new_bookmarks >= threshold


def embed_first_pass(
    session: Session, job_id: int, user_id: str, *, segment: int
) -> dict[str, Any] | None:
    """In the staging transaction, after the batches are cut: embed every new bookmark of
    the job with the first-pass model and COPY the vectors into the job's segment. Returns
    what it did, or None when there is no first-pass model (or it was retired meanwhile).

    The first pass only makes an import searchable sooner, so it never fails one: anything
    that goes wrong (the model's files gone, a bad vector) rolls back to a savepoint, is
    logged, and the import goes on as if there were no first-pass model."""
    model = first_pass_model(session)
    if model is None:
        return None
    savepoint = session.begin_nested()
    try:
        written = _write(session, model, job_id, user_id, segment)
    except Exception as exc:
        savepoint.rollback()
        log.warning(
            "import job %s: first pass with %s failed, the import goes on without it: %s",
            job_id,
            model.name,
            exc,
            extra={"counts": {"first_pass_vectors": 0}},
        )
        return None
    savepoint.commit()
    if written is None:
        return None
    return {"model": model.name, "vectors": written}


def _write(
    session: Session, model: FirstPassModel, job_id: int, user_id: str, segment: int
) -> int | None:
    conn = session.connection()
    # Share-locks the registry row until commit: a retire waits for this write, or it went
    # first and nothing is written (as for any other model's vectors).
    if model.name not in writable_models(conn, [model.name]):
        return None
    from worker.runtime import embedder_for_model

    embedder = embedder_for_model(model.name, model.path, model.package)
    rows = _new_bookmarks(conn, job_id, user_id)
    # No text is stored with a stand-in: the generated full-text column and its GIN index
    # made the COPY 2.2x slower (3.6 s against 1.6 s for 100,000 rows). Full-text search
    # finds a bookmark once its batch has written the real row.
    written = copy_bare_vectors(
        conn,
        _encoded_blocks(embedder, rows),
        user_id=user_id,
        model=model.name,
        dimensions=model.dimensions,
        segment=segment,
    )
    if segment:
        # The partition is new and full at commit: without statistics the planner took it for
        # empty and searched it with a nested loop, 4 minutes for 100,000 rows instead of
        # tens of milliseconds. Nothing else uses it yet, so this waits for no lock; only the
        # columns searches filter and join on (0.2 s).
        columns = ", ".join(SEARCHED_COLUMNS)
        session.execute(text(f"ANALYZE {segment_table(segment)} ({columns})"))
    # clock_timestamp(), not now(): the transaction began before the file was parsed.
    session.execute(
        text(
            "UPDATE import_job SET first_pass_at = clock_timestamp(), first_pass_model = :m "
            "WHERE id = :job"
        ),
        {"m": model.name, "job": job_id},
    )
    return written


def _new_bookmarks(conn: Connection, job_id: int, user_id: str) -> list[tuple[Any, ...]]:
    """(item id, the ``joined_bookmark_text`` arguments) of the job's own new bookmarks in
    their final (merged) state, as the batches will read them (``importer.load_batch``).
    Plain psycopg tuples: SQLAlchemy rows took 1.0 s for 100,000 of them, these 0.27 s."""
    from worker.bookmarks.importer import BOOKMARK_TEXT_COLUMNS

    return (
        psycopg_connection(conn)
        .execute(
            f"SELECT i.id, {BOOKMARK_TEXT_COLUMNS} FROM bookmark b JOIN item i ON i.id = b.item_id "
            "WHERE b.user_id = %s AND b.import_job_id = %s AND b.deleted_at IS NULL ORDER BY i.id",
            (user_id, job_id),
        )
        .fetchall()
    )


def _encoded_blocks(
    embedder: Embedder, rows: Sequence[tuple[Any, ...]]
) -> Iterator[tuple[list[int], NDArray[np.float32]]]:
    """(item ids, vectors) block by block. The next block's texts are made and encoded in a
    thread while the caller writes this one, so that the encoding overlaps the COPY (the
    server's side of it, and the tokenizer's, run without the GIL)."""
    from worker.bookmarks.importer import joined_bookmark_text

    def encode(block: Sequence[tuple[Any, ...]]) -> NDArray[np.float32]:
        return np.asarray(
            embedder.encode([joined_bookmark_text(*r[1:]) for r in block]), dtype=np.float32
        )

    with ThreadPoolExecutor(1, thread_name_prefix="first-pass") as pool:
        pending: deque[tuple[list[int], Future[NDArray[np.float32]]]] = deque()
        starts = iter(range(0, len(rows), BLOCK_ROWS))

        def submit() -> None:
            start = next(starts, None)
            if start is not None:
                block = rows[start : start + BLOCK_ROWS]
                pending.append(([r[0] for r in block], pool.submit(encode, block)))

        submit()
        submit()
        while pending:
            ids, future = pending.popleft()
            submit()
            yield ids, future.result()
