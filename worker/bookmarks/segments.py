"""Embedding segments: a large import writes its vectors without paying a live vector index.

Inserting a row into a table with an HNSW index searches and patches the graph for that row:
about 1.7 ms a row on our machines, more than the model spends on a bookmark title, while a
bulk build costs about an eighth of that per row (shared/ENVIRONMENT.md). So an import of at
least ``BULK_SEGMENT_MIN_BOOKMARKS`` new bookmarks gets a partition of ``embedding`` of its own
(segment = its job id, table ``embedding_s<job>``), with the btree/GIN indexes of the parent but
no vector index:

- while it runs, searches see its rows at once: the planner merges the main partition's index
  scan with an exact scan of the segment (a tenant's rows found through ``(user_id, model)``);
- when its last batch is written, ``index_segment`` builds each model's vector index on the
  segment with ``CREATE INDEX CONCURRENTLY`` (searches and writes go on meanwhile), then
  ANALYZEs it and stamps ``import_job.segment_indexed_at``;
- index upkeep calls ``index_pending_segments`` every run, so a build lost to a crash is
  made later; an INVALID leftover is dropped and built again.

Segments stay partitions for good: each adds one index scan to a search. Folding many small
segments into one is left to upkeep in a later version; until then the threshold keeps
segments few (one per import of thousands of bookmarks).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.orm import Session

from worker.db.engine import autocommit_session
from worker.db.indexes import (
    IndexSpec,
    create_model_index,
    index_state,
    segment_index_name,
    segment_table,
)

log = logging.getLogger(__name__)

INDEX_MEMORY = "512MB"


def create_segment(session: Session, job_id: int) -> int:
    """In the caller's (staging) transaction: the job's partition, empty and attached, so
    a batch written later lands there by its ``segment`` value. Returns the segment."""
    table = segment_table(job_id)
    session.execute(
        text(
            f"CREATE TABLE IF NOT EXISTS {table} "
            "(LIKE embedding INCLUDING DEFAULTS INCLUDING GENERATED INCLUDING STORAGE)"
        )
    )
    attached = session.execute(
        text(
            "SELECT 1 FROM pg_inherits WHERE inhrelid = CAST(:t AS regclass) "
            "AND inhparent = 'embedding'::regclass"
        ),
        {"t": table},
    ).first()
    if attached is None:
        # SHARE UPDATE EXCLUSIVE on the parent: reads and writes of other segments go on.
        session.execute(
            text(f"ALTER TABLE embedding ATTACH PARTITION {table} FOR VALUES IN ({int(job_id)})")
        )
    session.execute(
        text("UPDATE import_job SET segment = :s WHERE id = :s"),
        {"s": job_id},
    )
    return job_id


# The columns of a segment that searches filter and join on: the only ones worth the
# statistics while it is being filled (sampling the vectors is most of a full ANALYZE).
SEARCHED_COLUMNS = ("user_id", "model", "item_id")


def analyze_segment(engine: Engine, segment: int) -> bool:
    """ANALYZE a segment's partition on ``SEARCHED_COLUMNS``."""
    return analyze_quietly(engine, segment_table(segment), SEARCHED_COLUMNS)


def analyze_quietly(engine: Engine, table: str, columns: Sequence[str]) -> bool:
    """``maintenance.vacuum.analyze_tables`` (SKIP_LOCKED) during an import, where
    statistics are a help, not a duty: a table dropped meanwhile (a cancelled import's
    segment) is logged, not raised into the batch that has just committed. Returns whether
    it ran."""
    from worker.maintenance.vacuum import analyze_tables  # it imports this module

    try:
        return bool(analyze_tables(engine, [table], columns=columns)["analyzed"])
    except (OperationalError, ProgrammingError) as exc:
        log.info("ANALYZE %s skipped: %s", table, exc.orig or exc)
        return False


def _segment_models(conn: Connection, segment: int) -> list[IndexSpec]:
    """The models embedded with (active or backfilling) that have rows in the segment."""
    rows = conn.execute(
        text(
            "SELECT m.name, m.dimensions, m.distance, m.index_kind, m.index_precision, "
            "m.index_params FROM embedding_model m WHERE m.state IN ('active', 'backfilling') "
            f"AND EXISTS (SELECT 1 FROM {segment_table(segment)} e WHERE e.model = m.name) "
            "ORDER BY m.id"
        )
    ).all()
    return [IndexSpec.from_row(r) for r in rows]


def index_segment(engine: Engine, job_id: int, *, workers: int = 2) -> dict[str, Any]:
    """Build the vector indexes of a finished import's segment (idempotent) and ANALYZE it."""
    started = time.monotonic()
    with engine.connect() as conn:
        job = conn.execute(
            text("SELECT segment, status, segment_indexed_at FROM import_job WHERE id = :id"),
            {"id": job_id},
        ).first()
        if job is None or job.segment is None:
            return {"job_id": job_id, "status": "no segment"}
        if job.status in ("queued", "processing"):
            return {"job_id": job_id, "status": "import still running"}
        specs = _segment_models(conn, job.segment)
    table = segment_table(job.segment)
    built = []
    for spec in specs:
        if spec.kind == "ivfflat":
            continue  # IVFFlat lists are trained on the main partition's upkeep, not here
        name = segment_index_name(spec, job.segment)
        with engine.connect() as conn:
            state = index_state(conn, name)
        if state == "valid":
            continue
        create_model_index(
            engine,
            spec,
            name=name,
            maintenance_work_mem=INDEX_MEMORY,
            parallel_workers=workers,
            table=table,
        )
        built.append(name)
    with autocommit_session(engine, statement_timeout=0) as conn:
        conn.execute(text(f"ANALYZE {table}"))
        conn.execute(
            text(
                "UPDATE import_job SET segment_indexed_at = now(), updated_at = now() "
                "WHERE id = :id"
            ),
            {"id": job_id},
        )
    seconds = round(time.monotonic() - started, 3)
    log.info(
        "segment %s of import job %s indexed: %s built in %.1fs",
        job.segment,
        job_id,
        ", ".join(built) or "nothing to build",
        seconds,
    )
    return {"job_id": job_id, "segment": job.segment, "built": built, "seconds": seconds}


def pending_segments(conn: Connection) -> list[int]:
    """Jobs whose import has ended but whose segment is not indexed yet."""
    return list(
        conn.execute(
            text(
                "SELECT id FROM import_job WHERE segment IS NOT NULL "
                "AND segment_indexed_at IS NULL AND status NOT IN ('queued', 'processing') "
                "ORDER BY id"
            )
        ).scalars()
    )


def index_pending_segments(engine: Engine, *, dry_run: bool = False) -> list[dict[str, Any]]:
    """Upkeep's catch-up for segments whose build was lost (a worker killed mid-build)."""
    with engine.connect() as conn:
        jobs = pending_segments(conn)
    if dry_run:
        return [{"job_id": j, "status": "would index"} for j in jobs]
    return [index_segment(engine, j) for j in jobs]


def segment_index_names(conn: Connection, base: str) -> list[str]:
    """The model's index on every segment (``<base>_s<job>``), for retire to drop."""
    return list(
        conn.execute(
            text(
                "SELECT relname FROM pg_class WHERE relkind = 'i' "
                "AND relnamespace = 'public'::regnamespace AND relname ~ :pattern ORDER BY 1"
            ),
            {"pattern": f"^{base}_s[0-9]+$"},
        ).scalars()
    )


def drop_segment(engine: Engine, job_id: int) -> bool:
    """Remove a segment's partition and every vector in it (an import cancelled or deleted
    with its items). DETACH … CONCURRENTLY lets searches and other imports go on. Returns
    whether there was one."""
    table = segment_table(job_id)
    with autocommit_session(engine, statement_timeout=0) as conn:
        attached = conn.execute(
            text(
                "SELECT 1 FROM pg_inherits WHERE inhrelid = to_regclass(:t) "
                "AND inhparent = 'embedding'::regclass"
            ),
            {"t": table},
        ).first()
        if attached is not None:
            conn.execute(text(f"ALTER TABLE embedding DETACH PARTITION {table} CONCURRENTLY"))
        existed = conn.execute(text("SELECT to_regclass(:t)"), {"t": table}).scalar()
        conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
        conn.execute(
            text("UPDATE import_job SET segment = NULL, segment_indexed_at = NULL WHERE id = :id"),
            {"id": job_id},
        )
    return existed is not None
