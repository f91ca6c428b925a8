"""Backfill: re-embed every live item's stored texts with a newly added model.

The shape is the bookmark import's (``worker.bookmarks.importer``): the job and its batches
are staged in the database in the transaction that registers the model
(``worker.models.add_model``); a batch is claimed (``attempts`` + ``claimed_at``), embedded
with no transaction open, and written in one transaction (this model's rows of those items
deleted, the new ones COPYed, the batch marked done, the job's counters advanced). A worker
killed mid-batch leaves it ``processing``; ``worker models resume`` or the requeue hook sends
it again and the newer claim wins, so nothing is written twice.

Nothing is re-parsed: the texts are the serving model's stored ``embedding.content`` (every
chunk, and the -1 title+summary row), written again with the same ``chunk_index``,
``analysis_id`` and ``source``. Items that change while a batch is in flight are left to
the upload path (it embeds with every backfilling model) or to the next sweep.

After the last batch ``finish_job`` sweeps for live items still without this model's
vectors (written by an upload that had read the model list before the model existed), stages
them as more batches, and once there are none builds the model's index ``CONCURRENTLY``
(after the bulk load, not row by row) and measures its recall.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, text
from sqlalchemy.orm import Session

from worker.config import Settings
from worker.db import queries
from worker.db.engine import session_scope
from worker.db.indexes import IndexSpec, create_model_index
from worker.ingest.store import copy_embeddings, writable_models
from worker.ingest.types import EmbeddedChunk

log = logging.getLogger(__name__)

# Task names live here (not in app.py) so this module, the CLI and the tasks share them
# without importing Celery. The finish step builds an index: it goes to the maintenance
# queue (app.routes sends worker.maintenance.* there), so it never holds up ingestion.
TASK_BACKFILL_BATCH = "worker.backfill_batch"
TASK_BACKFILL_FINISH = "worker.maintenance.backfill_finish"

Send = Callable[[str, list[Any], str], None]

# Source rows per batch: about 1000 passages take a transformer ~50 s on two cores (well
# inside the task time limit) and a static model ~40 ms; item ids per batch are capped too.
DEFAULT_BATCH_ROWS = 1000
MAX_BATCH_ITEMS = 500
# The first staging plus sweeps: more than a few means items keep appearing without this
# model's vectors, which is a bug to look at rather than a loop to run forever.
MAX_PASSES = 4
OPEN_JOB = ("queued", "running", "indexing")


# --- what is missing -----------------------------------------------------------------------

# Live items holding the source model's vectors but none of the target's, with their row
# counts. The NOT EXISTS probes the (item_id, model, chunk_index) unique index.
_MISSING = """
    SELECT e.item_id, count(*) AS n
    FROM embedding e JOIN item i ON i.id = e.item_id
    WHERE e.model = :source AND i.deleted_at IS NULL
      AND NOT EXISTS (SELECT 1 FROM embedding t WHERE t.item_id = e.item_id AND t.model = :target)
    GROUP BY e.item_id
"""


def missing_items(conn: Connection | Session, target: str, source: str) -> int:
    """Live items with vectors for ``source`` (the serving model) and none for ``target``:
    zero means ``target`` can serve every item that search can find today."""
    count: int = conn.execute(
        text(f"SELECT count(*) FROM ({_MISSING}) m"), {"source": source, "target": target}
    ).scalar_one()
    return count


def serving_model(conn: Connection | Session) -> str:
    name: str | None = conn.execute(
        text("SELECT name FROM embedding_model WHERE serving")
    ).scalar_one_or_none()
    if name is None:
        from worker.errors import ModelLifecycleError

        raise ModelLifecycleError("no embedding model is serving: see `worker models list`")
    return name


@dataclass(frozen=True)
class Staged:
    batch_ids: list[int]
    items: int
    rows: int


def stage_missing(
    s: Session, job_id: int, target: str, source: str, *, batch_rows: int = DEFAULT_BATCH_ROWS
) -> Staged:
    """In the caller's transaction: cut the items ``target`` lacks into batches of about
    ``batch_rows`` source rows (at most MAX_BATCH_ITEMS items), numbered after the job's
    existing ones. One statement, so staging a million items never passes them through
    Python."""
    seq0 = s.execute(
        text("SELECT coalesce(max(seq) + 1, 0) FROM backfill_batch WHERE job_id = :job"),
        {"job": job_id},
    ).scalar_one()
    # g: the batch of an item, from the rows before it and its position; both only grow,
    # so batches are runs of consecutive item ids.
    rows = s.execute(
        text(
            f"""
            WITH missing AS ({_MISSING}),
            cut AS (
                SELECT item_id, n, greatest(
                    (sum(n) OVER w - n)::bigint / :batch_rows,
                    (row_number() OVER w - 1) / :batch_items) AS g
                FROM missing WINDOW w AS (ORDER BY item_id)
            ),
            groups AS (
                SELECT g, array_agg(item_id ORDER BY item_id) AS ids, sum(n)::int AS n
                FROM cut GROUP BY g
            )
            INSERT INTO backfill_batch (job_id, seq, item_ids, source_rows)
            SELECT :job, :seq0 + row_number() OVER (ORDER BY g) - 1, ids, n FROM groups
            RETURNING id, seq, cardinality(item_ids) AS items, source_rows
            """
        ),
        {
            "source": source,
            "target": target,
            "batch_rows": max(1, batch_rows),
            "batch_items": MAX_BATCH_ITEMS,
            "job": job_id,
            "seq0": seq0,
        },
    ).all()
    rows = sorted(rows, key=lambda r: r.seq)
    staged = Staged(
        [r.id for r in rows], sum(r.items for r in rows), sum(r.source_rows for r in rows)
    )
    s.execute(
        text(
            "UPDATE backfill_job SET total_batches = total_batches + :b, "
            "total_items = total_items + :i, total_rows = total_rows + :r, updated_at = now() "
            "WHERE id = :job"
        ),
        {"b": len(staged.batch_ids), "i": staged.items, "r": staged.rows, "job": job_id},
    )
    return staged


def loading_models(conn: Connection | Session) -> set[str]:
    """Models whose backfill is still writing vectors. Index upkeep should leave their index
    to the backfill's finish step: every row COPYed into an HNSW-indexed table pays about
    1.7 ms (ENVIRONMENT.md), a bulk build afterwards a fraction of that."""
    return set(
        conn.execute(
            text(
                "SELECT m.name FROM backfill_job j JOIN embedding_model m ON m.id = j.model_id "
                "WHERE j.status IN ('queued', 'running')"
            )
        ).scalars()
    )


def pending_batches(conn: Connection | Session, job_id: int) -> list[int]:
    return list(
        conn.execute(
            text(
                "SELECT id FROM backfill_batch WHERE job_id = :job "
                "AND status IN ('queued', 'processing') ORDER BY seq"
            ),
            {"job": job_id},
        ).scalars()
    )


def send_job(send: Send, settings: Settings, job_id: int, batch_ids: Sequence[int]) -> None:
    """Send a job's batches, or its finish step when it has none left (call after commit)."""
    for batch_id in batch_ids:
        send(TASK_BACKFILL_BATCH, [batch_id], settings.queue_ingest)
    if not batch_ids:
        send(TASK_BACKFILL_FINISH, [job_id], settings.queue_maintenance)


# --- a batch -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchClaim:
    batch_id: int
    job_id: int
    model: str
    dimensions: int
    path: str | None
    package: str | None
    item_ids: list[int]
    attempt: int
    claimed_at: datetime


@dataclass(frozen=True)
class ClaimResult:
    """``claim`` when this worker now owns the batch; otherwise ``reason``: missing,
    finished (a redelivered message), cancelled (job or model stopped), exhausted (too many
    attempts: now failed). ``job_complete``: an exhausted batch was the job's last one."""

    claim: BatchClaim | None
    reason: str | None = None
    job_complete: bool = False


def claim_batch(engine: Engine, batch_id: int, *, max_attempts: int) -> ClaimResult:
    with session_scope(engine) as s:
        row = s.execute(
            text(
                "SELECT b.job_id, b.item_ids, b.status, b.attempts, j.status AS job_status, "
                "m.name, m.state, m.dimensions, m.path, m.package FROM backfill_batch b "
                "JOIN backfill_job j ON j.id = b.job_id "
                "JOIN embedding_model m ON m.id = j.model_id WHERE b.id = :id FOR UPDATE OF b"
            ),
            {"id": batch_id},
        ).first()
        if row is None:
            return ClaimResult(None, "missing")
        if row.status not in ("queued", "processing"):
            return ClaimResult(None, "finished")
        if row.job_status not in ("queued", "running") or row.state != "backfilling":
            return ClaimResult(None, "cancelled")
        if row.attempts >= max_attempts:
            complete = _fail_batch(
                s, batch_id, row.job_id, f"gave up after {row.attempts} attempts"
            )
            return ClaimResult(None, "exhausted", complete)
        attempt, claimed_at = s.execute(
            text(
                "UPDATE backfill_batch SET status = 'processing', attempts = attempts + 1, "
                "claimed_at = clock_timestamp(), updated_at = now() WHERE id = :id "
                "RETURNING attempts, claimed_at"
            ),
            {"id": batch_id},
        ).one()
        s.execute(
            text(
                "UPDATE backfill_job SET status = 'running', started_at = coalesce(started_at, "
                "now()), updated_at = now() WHERE id = :job AND status = 'queued'"
            ),
            {"job": row.job_id},
        )
        return ClaimResult(
            BatchClaim(
                batch_id,
                row.job_id,
                row.name,
                row.dimensions,
                row.path,
                row.package,
                list(row.item_ids),
                attempt,
                claimed_at,
            )
        )


@dataclass(frozen=True)
class SourceRow:
    item_id: int
    user_id: str
    analysis_id: int | None
    chunk_index: int
    content: str
    source: dict[str, Any]


@dataclass(frozen=True)
class Loaded:
    source_model: str
    rows: list[SourceRow]
    # Per item, the newest id among its source rows: any rewrite of the item (delete + COPY)
    # changes it, which is how the write notices an item re-processed meanwhile.
    fingerprints: dict[int, int]


def load_batch(engine: Engine, claim: BatchClaim) -> Loaded:
    with session_scope(engine) as s:
        source = serving_model(s)
        rows = s.execute(
            text(
                "SELECT e.id, e.item_id, e.user_id, e.analysis_id, e.chunk_index, e.content, "
                "e.source FROM embedding e JOIN item i ON i.id = e.item_id "
                "WHERE e.model = :source AND e.item_id = ANY(:ids) AND i.deleted_at IS NULL "
                "ORDER BY e.item_id, e.chunk_index"
            ),
            {"source": source, "ids": claim.item_ids},
        ).all()
    fingerprints: dict[int, int] = {}
    for r in rows:
        fingerprints[r.item_id] = max(r.id, fingerprints.get(r.item_id, 0))
    return Loaded(
        source,
        [
            SourceRow(r.item_id, r.user_id, r.analysis_id, r.chunk_index, r.content, r.source)
            for r in rows
        ],
        fingerprints,
    )


@dataclass(frozen=True)
class Written:
    rows: int
    items: int
    skipped: int  # items changed or deleted since the batch was read
    job_complete: bool


def write_batch(
    engine: Engine, claim: BatchClaim, loaded: Loaded, vectors: Sequence[Sequence[float]]
) -> Written | None:
    """This model's vectors of the batch's items replaced, the batch done and the job's
    counters advanced, in one transaction. None (nothing written) when the claim was lost
    or the model was retired meanwhile."""
    with session_scope(engine) as s:
        if not queries.batch_claim_holds(
            s, "backfill_batch", claim.batch_id, claim.attempt, claim.claimed_at
        ):
            return None
        # Item locks, in id order, make an upload of one of them wait (or us wait for it);
        # the fingerprint check below then sees its result.
        live = set(
            s.execute(
                text(
                    "SELECT id FROM item WHERE id = ANY(:ids) AND deleted_at IS NULL "
                    "ORDER BY id FOR UPDATE"
                ),
                {"ids": claim.item_ids},
            ).scalars()
        )
        now: dict[int, int] = {
            r.item_id: r.newest
            for r in s.execute(
                text(
                    "SELECT item_id, max(id) AS newest FROM embedding WHERE model = :source "
                    "AND item_id = ANY(:ids) GROUP BY item_id"
                ),
                {"source": loaded.source_model, "ids": claim.item_ids},
            )
        }
        keep = {i for i, fp in loaded.fingerprints.items() if i in live and now.get(i) == fp}
        conn = s.connection()
        if claim.model not in writable_models(conn, [claim.model]):
            return None
        conn.execute(
            text("DELETE FROM embedding WHERE item_id = ANY(:ids) AND model = :m"),
            {"ids": sorted(keep), "m": claim.model},
        )
        written = copy_embeddings(
            conn,
            (
                (
                    r.item_id,
                    r.analysis_id,
                    r.user_id,
                    EmbeddedChunk(r.chunk_index, r.content, v, r.source),
                )
                for r, v in zip(loaded.rows, vectors, strict=True)
                if r.item_id in keep
            ),
            model=claim.model,
            dimensions=claim.dimensions,
        )
        s.execute(
            text(
                "UPDATE backfill_batch SET status = 'done', rows_written = :n, error = NULL, "
                "updated_at = now() WHERE id = :id"
            ),
            {"n": written, "id": claim.batch_id},
        )
        complete = _advance_job(s, claim.job_id, len(claim.item_ids), written, failed=False)
        return Written(written, len(keep), len(claim.item_ids) - len(keep), complete)


def _advance_job(s: Session, job_id: int, items: int, rows: int, *, failed: bool) -> bool:
    """Count one finished batch on the job; True when it was the last one pending. The job
    row lock makes two batches ending together agree on which one was last."""
    s.execute(text("SELECT 1 FROM backfill_job WHERE id = :id FOR UPDATE"), {"id": job_id})
    s.execute(
        text(
            "UPDATE backfill_job SET done_batches = done_batches + :ok, "
            "failed_batches = failed_batches + :bad, done_items = done_items + :items, "
            "rows_written = rows_written + :rows, updated_at = now() WHERE id = :id"
        ),
        {
            "ok": 0 if failed else 1,
            "bad": 1 if failed else 0,
            "items": items,
            "rows": rows,
            "id": job_id,
        },
    )
    return not pending_batches(s, job_id)


def _fail_batch(s: Session, batch_id: int, job_id: int, message: str) -> bool:
    s.execute(
        text(
            "UPDATE backfill_batch SET status = 'failed', error = :e, updated_at = now() "
            "WHERE id = :id"
        ),
        {"e": message, "id": batch_id},
    )
    return _advance_job(s, job_id, 0, 0, failed=True)


def fail_batch(engine: Engine, batch_id: int, message: str) -> tuple[int, bool] | None:
    """Record a batch's permanent failure; returns (job id, whether it was the job's last
    pending batch), or None when the batch was already finished."""
    with session_scope(engine) as s:
        row = s.execute(
            text("SELECT job_id, status FROM backfill_batch WHERE id = :id FOR UPDATE"),
            {"id": batch_id},
        ).first()
        if row is None or row.status not in ("queued", "processing"):
            return None
        return row.job_id, _fail_batch(s, batch_id, row.job_id, message[:2000])


def run_batch(engine: Engine, settings: Settings, batch_id: int) -> dict[str, Any]:
    """Claim, embed and write one batch. ``job_complete`` tells the caller to send the
    finish step."""
    from worker.runtime import embedder_for_model

    claimed = claim_batch(engine, batch_id, max_attempts=settings.max_attempts)
    if claimed.claim is None:
        log.info("backfill batch %s not processed: %s", batch_id, claimed.reason)
        return {
            "batch_id": batch_id,
            "status": claimed.reason,
            "job_complete": claimed.job_complete,
        }
    claim = claimed.claim
    started = time.perf_counter()
    loaded = load_batch(engine, claim)
    embedder = embedder_for_model(claim.model, claim.path, claim.package)
    vectors = embedder.encode([r.content for r in loaded.rows])
    encoded = time.perf_counter()
    result = write_batch(engine, claim, loaded, vectors.tolist())
    seconds = time.perf_counter() - started
    out: dict[str, Any] = {
        "batch_id": batch_id,
        "job_id": claim.job_id,
        "model": claim.model,
        "status": "stale" if result is None else "done",
        "encode_s": round(encoded - started, 3),
        "seconds": round(seconds, 3),
        "job_complete": bool(result and result.job_complete),
    }
    if result is not None:
        out.update(rows=result.rows, items=result.items, skipped=result.skipped)
    log.info(
        "backfill batch %s of job %s (%s) %s: %s rows in %.2fs",
        batch_id,
        claim.job_id,
        claim.model,
        out["status"],
        out.get("rows", 0),
        seconds,
    )
    return out


# --- the end of a job ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Decision:
    status: str  # running | failed | cancelled | swept | indexing | <a finished status>
    model: str = ""
    batch_ids: tuple[int, ...] = ()
    error: str | None = None


def _decide(engine: Engine, job_id: int, batch_rows: int) -> _Decision:
    """Under the job's row lock: still running, failed, cancelled, more to sweep, or ready
    to index."""
    with session_scope(engine) as s:
        job = s.execute(
            text(
                "SELECT j.status, j.passes, m.name, m.state FROM backfill_job j "
                "JOIN embedding_model m ON m.id = j.model_id WHERE j.id = :id FOR UPDATE OF j"
            ),
            {"id": job_id},
        ).first()
        if job is None:
            return _Decision("missing")
        if job.status not in OPEN_JOB:
            return _Decision(job.status, job.name)
        if job.state != "backfilling":
            _set_job(s, job_id, "cancelled", f"model is {job.state}")
            return _Decision("cancelled", job.name)
        if job.status == "indexing":  # a resent finish after a crash while indexing
            return _Decision("indexing", job.name)
        if pending_batches(s, job_id):
            return _Decision("running", job.name)
        failed = s.execute(
            text(
                "SELECT count(*), max(error) FROM backfill_batch WHERE job_id = :id "
                "AND status = 'failed'"
            ),
            {"id": job_id},
        ).one()
        if failed[0]:
            error = (
                f"{failed[0]} batch(es) failed (e.g. {failed[1]}); "
                f"`worker models resume {job.name}` retries them"
            )
            _set_job(s, job_id, "failed", error)
            return _Decision("failed", job.name, error=error)
        source = serving_model(s)
        missing = missing_items(s, job.name, source)
        if missing:
            if job.passes >= MAX_PASSES:
                error = (
                    f"{missing} live item(s) still lack {job.name} vectors after "
                    f"{job.passes} passes"
                )
                _set_job(s, job_id, "failed", error)
                return _Decision("failed", job.name, error=error)
            staged = stage_missing(s, job_id, job.name, source, batch_rows=batch_rows)
            s.execute(
                text("UPDATE backfill_job SET passes = passes + 1 WHERE id = :id"), {"id": job_id}
            )
            log.info("backfill job %s: %s item(s) swept into another pass", job_id, staged.items)
            return _Decision("swept", job.name, tuple(staged.batch_ids))
        _set_job(s, job_id, "indexing", None)
        return _Decision("indexing", job.name)


def _set_job(s: Session, job_id: int, status: str, error: str | None) -> None:
    done = status in ("done", "failed", "cancelled")
    s.execute(
        text(
            "UPDATE backfill_job SET status = :st, error = :e, updated_at = now(), "
            "finished_at = CASE WHEN :done THEN now() END WHERE id = :id"
        ),
        {"st": status, "e": error, "done": done, "id": job_id},
    )


def finish_job(
    engine: Engine, settings: Settings, job_id: int, *, batch_rows: int = DEFAULT_BATCH_ROWS
) -> dict[str, Any]:
    """After the last batch: sweep, then build the index and measure recall. Returns the
    decision; ``batch_ids`` are a sweep's new batches for the caller to send. Idempotent,
    and a second copy running at the same time skips (advisory lock)."""
    from worker.maintenance.runs import advisory_lock

    with advisory_lock(engine, f"backfill:{job_id}") as taken:
        if not taken:
            return {"job_id": job_id, "status": "skipped: another finish is running"}
        decision = _decide(engine, job_id, batch_rows)
        out: dict[str, Any] = {"job_id": job_id, "model": decision.model, "status": decision.status}
        if decision.batch_ids:
            out["batch_ids"] = list(decision.batch_ids)
        if decision.error:
            out["error"] = decision.error
        if decision.status != "indexing":
            return out
        # An exception leaves the job 'indexing': the task retries a transient one and
        # fails the job (fail_job) otherwise; a resent finish starts here again.
        details = index_and_measure(engine, settings, decision.model)
        with session_scope(engine) as s:
            s.execute(
                text(
                    "UPDATE backfill_job SET details = details || CAST(:d AS jsonb) WHERE id = :id"
                ),
                {"d": _json(details), "id": job_id},
            )
            _set_job(s, job_id, "done", None)
        log.info("backfill job %s of %s done: %s", job_id, decision.model, details)
        return {**out, "status": "done", **details}


def fail_job(engine: Engine, job_id: int, message: str) -> None:
    """Record why a job stopped (``worker models resume`` carries it on)."""
    with session_scope(engine) as s:
        s.execute(
            text(
                "UPDATE backfill_job SET status = 'failed', error = :e, finished_at = now(), "
                "updated_at = now() WHERE id = :id AND status IN ('queued', 'running', 'indexing')"
            ),
            {"e": message[:2000], "id": job_id},
        )


def index_and_measure(engine: Engine, settings: Settings, model: str) -> dict[str, Any]:
    """Build the model's index concurrently (IVFFlat lists sized to today's rows), then let
    index upkeep measure its recall and tune ef_search/probes; both land on the model row."""
    from worker.maintenance.indexes import ivfflat_lists, run_index_upkeep

    with engine.begin() as conn:
        row = conn.execute(
            text(
                "SELECT name, dimensions, distance, index_kind, index_precision, index_params "
                "FROM embedding_model WHERE name = :name"
            ),
            {"name": model},
        ).one()
        spec = IndexSpec.from_row(row)
        if spec.kind == "ivfflat":
            rows = conn.execute(
                text("SELECT count(*) FROM embedding WHERE model = :m"), {"m": model}
            ).scalar_one()
            params = {**spec.params, "lists": ivfflat_lists(rows)}
            conn.execute(
                text(
                    "UPDATE embedding_model SET index_params = index_params || CAST(:p AS jsonb) "
                    "WHERE name = :name"
                ),
                {"p": _json(params), "name": model},
            )
            spec = IndexSpec(
                spec.model, spec.dimensions, spec.distance, spec.kind, spec.precision, params
            )
    started = time.monotonic()
    index = create_model_index(engine, spec)
    build_s = round(time.monotonic() - started, 3)
    upkeep = run_index_upkeep(engine, settings, models=[model])
    with engine.connect() as conn:
        recall = conn.execute(
            text("SELECT last_recall FROM embedding_model WHERE name = :name"), {"name": model}
        ).scalar_one()
    details: dict[str, Any] = {"index": index, "build_seconds": build_s, "recall": recall}
    if upkeep.get("skipped"):
        # Another upkeep run holds the lock; the next scheduled one measures this index.
        details["recall_note"] = "not measured: index upkeep was busy"
    else:
        details["upkeep_run_id"] = upkeep.get("run_id")
        details["upkeep_decision"] = upkeep.get("models", {}).get(model, {}).get("decision")
    return details


def _json(value: Any) -> str:
    import json

    return json.dumps(value, default=str)
