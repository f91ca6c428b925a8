"""The embedding-model registry and its lifecycle: add → backfill → activate → retire.

``embedding_model`` rows are the registry. ``state`` says whether new items are embedded
with a model (``active``, ``backfilling``) or not (``retired``); ``serving`` marks the one
model search uses. A change of model is a background re-embed and a cut-over, never
downtime:

1. ``add_model`` reads the model's files (a local directory or an installed package; never a
   download), learns its dimension by encoding a probe, registers it ``backfilling`` and
   stages a backfill (``worker.backfill``) in the same transaction. From then on uploads and
   bookmark batches are embedded with it too.
2. The backfill re-embeds every live item's stored texts batch by batch, then builds the
   model's index concurrently and measures its recall. Search keeps using the serving model.
3. ``activate`` flips ``serving`` in one transaction, and only when every live item the
   serving model can find has this model's vectors and its index is valid. The previous
   model stays ``active`` (still embedded), so switching back is just as instant.
4. ``retire`` stops embedding with a non-serving model, drops its index and deletes its
   vectors in small transactions.

A fast static model can also be added as the ``first_pass`` model (``add_model(...,
first_pass=True)``, at most one): it is never backfilled, indexed or served on its own; it
embeds a bulk import's new bookmarks while they are staged so that the import is searchable
at once, and the serving model's vectors replace those rows batch by batch
(``worker.bookmarks.first_pass``).

Plain functions over an Engine; ``worker.model_commands`` is the CLI, ``worker.tasks`` runs
the batches.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from worker.backfill import (
    DEFAULT_BATCH_ROWS,
    OPEN_JOB,
    TASK_BACKFILL_BATCH,
    TASK_BACKFILL_FINISH,
    Send,
    missing_items,
    pending_batches,
    send_job,
    serving_model,
    stage_missing,
)
from worker.bookmarks.segments import segment_index_names
from worker.config import Settings, get_settings
from worker.db.engine import session_scope
from worker.db.indexes import check_model_name, drop_model_index, index_name, index_state
from worker.db.models import DISTANCES, INDEX_KINDS
from worker.errors import ModelLifecycleError

log = logging.getLogger(__name__)

RETIRE_BATCH_ROWS = 5000
# pgvector indexes vectors of up to 2000 dimensions (halfvec 4000).
MAX_INDEX_DIMENSIONS = {"vector": 2000, "halfvec": 4000}


def _default_send(task: str, args: list[Any], queue: str) -> None:
    from worker.app import app

    app.send_task(task, args=args, queue=queue)


# --- add -----------------------------------------------------------------------------------


def model_files(path: str | None, package: str | None) -> tuple[str, str]:
    """The model directory (absolute) and its kind, from exactly one of ``path`` and
    ``package``. Raises ModelLifecycleError saying what is wrong."""
    from worker.ingest.static_embed import model_kind
    from worker.runtime import package_model_path

    if (path is None) == (package is None):
        raise ModelLifecycleError("give the model's files as exactly one of a path or a package")
    try:
        where = (
            str(Path(path).expanduser().resolve()) if path else package_model_path(package or "")
        )
        return where, model_kind(where)
    except ValueError as exc:
        raise ModelLifecycleError(str(exc)) from exc


def probe_dimensions(name: str, where: str, kind: str) -> int:
    """Load the model from its files and encode one text: the dimension it really produces
    (a config can be wrong), and proof that the files load offline before anything is
    registered."""
    from worker.ingest.embed import SentenceTransformerEmbedder
    from worker.ingest.static_embed import StaticModelEmbedder
    from worker.ingest.types import Embedder
    from worker.runtime import configure_process

    configure_process(get_settings())  # offline flags before transformers is imported
    embedder: Embedder
    try:
        if kind == "static":
            embedder = StaticModelEmbedder(where, name=name)
        else:
            embedder = SentenceTransformerEmbedder(where, name=name)
        vector = embedder.encode(["a short probe sentence"])
    except Exception as exc:  # unreadable weights, a broken tokenizer: say which files
        raise ModelLifecycleError(f"cannot load the model in {where}: {exc}") from exc
    if vector.shape != (1, embedder.dimensions):
        raise ModelLifecycleError(
            f"{where}: the config says {embedder.dimensions} dimensions, the model produces "
            f"{vector.shape[-1]}"
        )
    return int(embedder.dimensions)


def add_model(
    engine: Engine,
    name: str,
    *,
    path: str | None = None,
    package: str | None = None,
    distance: str = "cosine",
    index_kind: str = "hnsw",
    index_precision: str = "vector",
    batch_rows: int = DEFAULT_BATCH_ROWS,
    send: Send | None = None,
    settings: Settings | None = None,
    first_pass: bool = False,
) -> dict[str, Any]:
    """Register a model as ``backfilling`` and start re-embedding every live item with it.
    A retired model of the same name is brought back the same way.

    ``first_pass``: register it as the first-pass model instead (nothing is backfilled; bulk
    imports are embedded with it while they are staged). Refused while another model has
    that role."""
    settings = settings or get_settings()
    try:
        check_model_name(name)
    except ValueError as exc:
        raise ModelLifecycleError(str(exc)) from exc
    if distance not in DISTANCES:
        raise ModelLifecycleError(f"distance must be one of {', '.join(DISTANCES)}")
    if index_kind not in INDEX_KINDS:
        raise ModelLifecycleError(f"index kind must be one of {', '.join(INDEX_KINDS)}")
    if index_precision not in MAX_INDEX_DIMENSIONS:
        raise ModelLifecycleError("index precision must be vector or halfvec")
    where, kind = model_files(path, package)
    started = time.monotonic()
    dims = probe_dimensions(name, where, kind)
    if dims > MAX_INDEX_DIMENSIONS[index_precision]:
        raise ModelLifecycleError(
            f"{name} has {dims} dimensions; pgvector indexes {index_precision} up to "
            f"{MAX_INDEX_DIMENSIONS[index_precision]}"
        )
    load_s = round(time.monotonic() - started, 3)
    with session_scope(engine) as s:
        source = serving_model(s)
        try:
            model_id = _register(
                s,
                name,
                dims=dims,
                distance=distance,
                path=where if path else None,
                package=package,
                index_kind=index_kind,
                index_precision=index_precision,
                state="first_pass" if first_pass else "backfilling",
            )
        except IntegrityError as exc:
            # Two adds at once: _register's check saw no other row, the unique index did.
            if "uq_embedding_model_first_pass" in str(exc):
                raise ModelLifecycleError(
                    "another first-pass model was added meanwhile: see `worker models list`"
                ) from exc
            raise
        added = {
            "model": name,
            "kind": kind,
            "files": where,
            "dimensions": dims,
            "distance": distance,
            "load_seconds": load_s,
        }
        if first_pass:
            log.info("model %s added (%s, %s dims) as the first-pass model", name, kind, dims)
            return {**added, "state": "first_pass"}
        job_id = s.execute(
            text(
                "INSERT INTO backfill_job (model_id, source_model, passes) "
                "VALUES (:m, :source, 1) RETURNING id"
            ),
            {"m": model_id, "source": source},
        ).scalar_one()
        staged = stage_missing(s, job_id, name, source, batch_rows=batch_rows)
    # Committed: a worker that receives these ids can see their rows.
    send_job(send or _default_send, settings, job_id, staged.batch_ids)
    log.info("model %s added (%s, %s dims): backfill job %s", name, kind, dims, job_id)
    return {
        **added,
        "index_kind": index_kind,
        "source_model": source,
        "job_id": job_id,
        "batches": len(staged.batch_ids),
        "items": staged.items,
        "rows": staged.rows,
    }


def _register(
    s: Session,
    name: str,
    *,
    dims: int,
    distance: str,
    path: str | None,
    package: str | None,
    index_kind: str,
    index_precision: str,
    state: str,
) -> int:
    existing = s.execute(
        text("SELECT id, state FROM embedding_model WHERE name = :name FOR UPDATE"), {"name": name}
    ).first()
    if existing is not None and existing.state != "retired":
        raise ModelLifecycleError(f"model {name} is already registered ({existing.state})")
    if state == "first_pass":
        other = s.execute(
            text("SELECT name FROM embedding_model WHERE state = 'first_pass' FOR UPDATE")
        ).scalar_one_or_none()
        if other is not None:
            raise ModelLifecycleError(
                f"{other} is the first-pass model: `worker models retire {other}` first"
            )
    params = {
        "state": state,
        "name": name,
        "dims": dims,
        "distance": distance,
        "path": path,
        "package": package,
        "kind": index_kind,
        "precision": index_precision,
    }
    if existing is not None:
        # Everything measured about its old index is void: the vectors are made anew.
        s.execute(
            text(
                "UPDATE embedding_model SET dimensions = :dims, distance = :distance, "
                "state = :state, serving = false, path = :path, package = :package, "
                "index_kind = :kind, index_precision = :precision, index_params = '{}', "
                "rows_at_build = NULL, built_at = NULL, last_recall = NULL, "
                "last_recall_at = NULL, updated_at = now() WHERE id = :id"
            ),
            {**params, "id": existing.id},
        )
        return int(existing.id)
    model_id: int = s.execute(
        text(
            "INSERT INTO embedding_model (name, dimensions, distance, state, path, package, "
            "index_kind, index_precision) VALUES (:name, :dims, :distance, :state, "
            ":path, :package, :kind, :precision) RETURNING id"
        ),
        params,
    ).scalar_one()
    return model_id


# --- list ----------------------------------------------------------------------------------


def list_models(engine: Engine) -> list[dict[str, Any]]:
    """Every registered model: state, serving, vectors stored, backfill progress, index state
    (valid / invalid / missing), last measured recall, and whether it could serve now."""
    with engine.connect() as conn:
        models = conn.execute(
            text(
                "SELECT m.id, m.name, m.dimensions, m.distance, m.state, m.serving, m.path, "
                "m.package, m.index_kind, m.last_recall, m.last_recall_at, m.built_at, "
                "j.id AS job_id, j.status AS job_status, j.total_batches, j.done_batches, "
                "j.failed_batches, j.total_items, j.done_items, j.total_rows, j.rows_written, "
                "j.passes, j.error AS job_error, j.started_at, j.finished_at, j.details, "
                "now() AS now FROM embedding_model m LEFT JOIN LATERAL (SELECT * FROM "
                "backfill_job b WHERE b.model_id = m.id ORDER BY b.id DESC LIMIT 1) j ON true "
                "ORDER BY m.id"
            )
        ).all()
        counts = {
            r.model: (r.rows, r.items)
            for r in conn.execute(
                text(
                    "SELECT model, count(*) AS rows, count(DISTINCT item_id) AS items "
                    "FROM embedding GROUP BY model"
                )
            )
        }
        serving = next((m.name for m in models if m.serving), None)
        out = []
        for m in models:
            rows, items = counts.get(m.name, (0, 0))
            index = index_name(m.name, m.index_kind)
            missing = (
                missing_items(conn, m.name, serving)
                if serving and m.name != serving and m.state in ("active", "backfilling")
                else 0
            )
            state_of_index = index_state(conn, index)
            backfill = _backfill_view(m) if m.job_id is not None else None
            open_job = bool(backfill and backfill["status"] in OPEN_JOB)
            out.append(
                {
                    "name": m.name,
                    "state": m.state,
                    "serving": m.serving,
                    "dimensions": m.dimensions,
                    "distance": m.distance,
                    "files": m.path or m.package,
                    "rows": rows,
                    "items": items,
                    "missing_items": missing,
                    "index": index,
                    "index_state": state_of_index,
                    "last_recall": m.last_recall,
                    "last_recall_at": m.last_recall_at,
                    "backfill": backfill,
                    "ready": m.state in ("active", "backfilling")
                    and not open_job
                    and missing == 0
                    and state_of_index == "valid",
                }
            )
    return out


def _backfill_view(m: Any) -> dict[str, Any]:
    end: datetime = m.finished_at or m.now
    seconds = (end - m.started_at).total_seconds() if m.started_at else None
    return {
        "job_id": m.job_id,
        "status": m.job_status,
        "batches": f"{m.done_batches}/{m.total_batches}",
        "failed_batches": m.failed_batches,
        "items": f"{m.done_items}/{m.total_items}",
        "rows_written": m.rows_written,
        "percent": round(100.0 * m.done_items / m.total_items, 1) if m.total_items else 100.0,
        "rows_per_s": round(m.rows_written / seconds, 1) if seconds else None,
        "passes": m.passes,
        "error": m.job_error,
        "started_at": m.started_at,
        "finished_at": m.finished_at,
        "recall": (m.details or {}).get("recall"),
    }


# --- activate ------------------------------------------------------------------------------


def activate(engine: Engine, name: str) -> dict[str, Any]:
    """Make ``name`` the serving model, in one transaction, if it can serve every item: its
    backfill finished, every live item with vectors for the current serving model has
    vectors for it, and its index is valid. Refuses (ModelLifecycleError) saying why not."""
    with session_scope(engine) as s:
        rows = s.execute(
            text(
                "SELECT id, name, state, serving, index_kind FROM embedding_model "
                "WHERE serving OR name = :name ORDER BY id FOR UPDATE"
            ),
            {"name": name},
        ).all()
        target = next((r for r in rows if r.name == name), None)
        current = next((r for r in rows if r.serving), None)
        if target is None:
            raise ModelLifecycleError(f"unknown model {name}: see `worker models list`")
        if target.serving:
            return {"model": name, "changed": False, "previous": name}
        if target.state == "retired":
            raise ModelLifecycleError(f"{name} is retired: `worker models add` it again first")
        if target.state == "first_pass":
            raise ModelLifecycleError(
                f"{name} is the first-pass model, which has vectors only for imports in "
                f"progress: `worker models retire {name}`, then `worker models add {name}` "
                "without --first-pass to backfill it"
            )
        job = s.execute(
            text(
                "SELECT status, done_batches, total_batches, error FROM backfill_job "
                "WHERE model_id = :id ORDER BY id DESC LIMIT 1"
            ),
            {"id": target.id},
        ).first()
        if job is not None and job.status in OPEN_JOB:
            raise ModelLifecycleError(
                f"{name} is still backfilling ({job.status}, {job.done_batches}/"
                f"{job.total_batches} batches): wait for it, or `worker models resume {name}`"
            )
        if job is not None and job.status == "failed":
            raise ModelLifecycleError(
                f"the backfill of {name} failed ({job.error}): `worker models resume {name}`"
            )
        source = current.name if current is not None else serving_model(s)
        missing = missing_items(s, name, source)
        if missing:
            raise ModelLifecycleError(
                f"{missing} live item(s) have {source} vectors but none for {name}: the "
                f"backfill is not complete; `worker models resume {name}`"
            )
        index = index_name(name, target.index_kind)
        state = index_state(s.connection(), index)
        if state != "valid":
            raise ModelLifecycleError(
                f"the index {index} of {name} is {state}: `worker models resume {name}` "
                "builds it (or `worker maintenance run indexes`)"
            )
        # Two statements: the unique partial index allows one serving row at every moment.
        if current is not None:
            s.execute(
                text(
                    "UPDATE embedding_model SET serving = false, updated_at = now() WHERE id = :id"
                ),
                {"id": current.id},
            )
        s.execute(
            text(
                "UPDATE embedding_model SET serving = true, state = 'active', updated_at = now() "
                "WHERE id = :id"
            ),
            {"id": target.id},
        )
    log.info("model %s now serves search (was %s)", name, source)
    return {"model": name, "changed": True, "previous": source}


# --- retire --------------------------------------------------------------------------------


def retire(engine: Engine, name: str, *, batch_rows: int = RETIRE_BATCH_ROWS) -> dict[str, Any]:
    """Stop embedding with ``name`` (refused for the serving model), cancel its backfill,
    drop its index concurrently and delete its vectors ``batch_rows`` per transaction.
    Running it again finishes an interrupted retirement."""
    with session_scope(engine) as s:
        row = s.execute(
            text(
                "SELECT id, state, serving, index_kind FROM embedding_model WHERE name = :name "
                "FOR UPDATE"
            ),
            {"name": name},
        ).first()
        if row is None:
            raise ModelLifecycleError(f"unknown model {name}: see `worker models list`")
        if row.serving:
            raise ModelLifecycleError(
                f"{name} serves search: activate another model first "
                "(`worker models activate OTHER`)"
            )
        # Flipped (and committed) before anything is deleted: writers share-lock this row
        # (ingest.store.writable_models), so none can add vectors after the deletes below.
        s.execute(
            text("UPDATE embedding_model SET state = 'retired', updated_at = now() WHERE id = :id"),
            {"id": row.id},
        )
        cancelled = s.execute(
            text(
                "UPDATE backfill_job SET status = 'cancelled', error = 'model retired', "
                "finished_at = now(), updated_at = now() WHERE model_id = :id "
                "AND status IN ('queued', 'running', 'indexing')"
            ),
            {"id": row.id},
        ).rowcount  # type: ignore[attr-defined]
    started = time.monotonic()
    # The index first: nothing searches a retired model, and a VACUUM after the deletes is
    # far cheaper without an HNSW index full of dead tuples.
    index = index_name(name, row.index_kind)
    with engine.connect() as conn:
        on_segments = segment_index_names(conn, index)
    for each in (index, *on_segments):
        drop_model_index(engine, each)
    deleted, batches = _delete_vectors(engine, name, batch_rows)
    with session_scope(engine) as s:
        s.execute(
            text(
                "UPDATE embedding_model SET rows_at_build = NULL, built_at = NULL, "
                "last_recall = NULL, last_recall_at = NULL, updated_at = now() WHERE id = :id"
            ),
            {"id": row.id},
        )
    seconds = round(time.monotonic() - started, 3)
    log.info("model %s retired: %s vectors deleted in %ss", name, deleted, seconds)
    return {
        "model": name,
        "was": row.state,
        "index_dropped": index,
        "deleted_rows": deleted,
        "delete_batches": batches,
        "cancelled_jobs": cancelled,
        "seconds": seconds,
    }


def _delete_vectors(engine: Engine, name: str, batch_rows: int) -> tuple[int, int]:
    """Walk the primary key upwards, deleting ``batch_rows`` of this model's rows per
    transaction: each transaction is short (no long lock, little WAL at once) and each
    batch starts where the last one stopped, so the whole walk reads the table once."""
    after, total, batches = 0, 0, 0
    while True:
        with engine.begin() as conn:
            ids = (
                conn.execute(
                    text(
                        "WITH d AS (SELECT id FROM embedding WHERE model = :m AND id > :after "
                        "ORDER BY id LIMIT :n) DELETE FROM embedding e USING d WHERE e.id = d.id "
                        "RETURNING e.id"
                    ),
                    {"m": name, "after": after, "n": batch_rows},
                )
                .scalars()
                .all()
            )
        if not ids:
            return total, batches
        after, total, batches = max(ids), total + len(ids), batches + 1


# --- resume and requeue --------------------------------------------------------------------


def resume(
    engine: Engine,
    name: str,
    *,
    send: Send | None = None,
    settings: Settings | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> dict[str, Any]:
    """Carry a model's backfill on: failed batches are reset and every pending batch is sent
    again (a newer claim supersedes any old one, so a batch still running elsewhere costs
    only time); a finished job whose model still misses items gets a new pass; with nothing
    pending, the finish step (sweep, index, recall) is sent."""
    settings = settings or get_settings()
    with session_scope(engine) as s:
        model = s.execute(
            text("SELECT id, state, serving FROM embedding_model WHERE name = :name FOR UPDATE"),
            {"name": name},
        ).first()
        if model is None:
            raise ModelLifecycleError(f"unknown model {name}: see `worker models list`")
        if model.state == "retired":
            raise ModelLifecycleError(f"{name} is retired: `worker models add` it again")
        if model.state == "first_pass":
            raise ModelLifecycleError(f"{name} is the first-pass model: it is never backfilled")
        if model.serving:
            raise ModelLifecycleError(f"{name} is the serving model: nothing to backfill")
        job = s.execute(
            text(
                "SELECT id, status FROM backfill_job WHERE model_id = :id ORDER BY id DESC "
                "LIMIT 1 FOR UPDATE"
            ),
            {"id": model.id},
        ).first()
        source = serving_model(s)
        if job is None or job.status in ("done", "cancelled"):
            # A complete model that fell behind (e.g. it was active, not serving, and
            # could not be loaded for a while): a new job for what it lacks.
            job_id = s.execute(
                text(
                    "INSERT INTO backfill_job (model_id, source_model, passes) "
                    "VALUES (:m, :source, 1) RETURNING id"
                ),
                {"m": model.id, "source": source},
            ).scalar_one()
            s.execute(
                text("UPDATE embedding_model SET state = 'backfilling' WHERE id = :id"),
                {"id": model.id},
            )
            stage_missing(s, job_id, name, source, batch_rows=batch_rows)
            reset = 0
        else:
            job_id = job.id
            reset = s.execute(
                text(
                    "UPDATE backfill_batch SET status = 'queued', attempts = 0, error = NULL, "
                    "updated_at = now() WHERE job_id = :job AND status = 'failed'"
                ),
                {"job": job_id},
            ).rowcount  # type: ignore[attr-defined]
            s.execute(
                text(
                    "UPDATE backfill_job SET status = CASE WHEN status = 'indexing' THEN status "
                    "ELSE 'running' END, error = NULL, finished_at = NULL, "
                    "failed_batches = failed_batches - :reset, passes = 1, updated_at = now() "
                    "WHERE id = :job"
                ),
                {"job": job_id, "reset": reset},
            )
        batch_ids = pending_batches(s, job_id)
        # Touched so that the requeue hook does not send them a second time right away.
        s.execute(
            text("UPDATE backfill_batch SET updated_at = now() WHERE id = ANY(:ids)"),
            {"ids": batch_ids},
        )
    send_job(send or _default_send, settings, job_id, batch_ids)
    return {"model": name, "job_id": job_id, "sent_batches": len(batch_ids), "reset_failed": reset}


def requeue_stuck_backfills(
    engine: Engine, settings: Settings, send: Send, *, dry_run: bool = False
) -> dict[str, Any]:
    """The requeue hook: resend backfill batches ``queued``/``processing`` for longer than
    ``stuck_after_seconds`` (a lost message, a killed worker), and the finish step of open
    jobs that have nothing pending and have not moved for as long (killed while indexing).
    Batches past ``max_attempts`` are failed by their next claim, which also counts them on
    the job. Messages are sent after the touching transaction commits."""
    params = {"secs": settings.stuck_after_seconds}
    stale = "updated_at < now() - make_interval(secs => :secs)"
    batches_sql = (
        "SELECT b.id FROM backfill_batch b JOIN backfill_job j ON j.id = b.job_id "
        f"WHERE b.status IN ('queued', 'processing') AND b.{stale} "
        "AND j.status IN ('queued', 'running') ORDER BY b.id"
    )
    jobs_sql = (
        f"SELECT j.id FROM backfill_job j WHERE j.status IN ('queued', 'running', 'indexing') "
        f"AND j.{stale} AND NOT EXISTS (SELECT 1 FROM backfill_batch b WHERE b.job_id = j.id "
        "AND b.status IN ('queued', 'processing')) ORDER BY j.id"
    )
    with session_scope(engine) as s:
        if dry_run:
            batch_ids = list(s.execute(text(batches_sql), params).scalars())
            job_ids = list(s.execute(text(jobs_sql), params).scalars())
            return {"would_resend_batches": batch_ids, "would_finish_jobs": job_ids}
        batch_ids = list(
            s.execute(
                text(
                    f"UPDATE backfill_batch SET updated_at = now() WHERE id IN ({batches_sql} "
                    "FOR UPDATE OF b SKIP LOCKED) RETURNING id"
                ),
                params,
            ).scalars()
        )
        job_ids = list(
            s.execute(
                text(
                    f"UPDATE backfill_job SET updated_at = now() WHERE id IN ({jobs_sql} "
                    "FOR UPDATE OF j SKIP LOCKED) RETURNING id"
                ),
                params,
            ).scalars()
        )
    for batch_id in sorted(batch_ids):
        send(TASK_BACKFILL_BATCH, [batch_id], settings.queue_ingest)
    for job_id in sorted(job_ids):
        send(TASK_BACKFILL_FINISH, [job_id], settings.queue_maintenance)
    return {"resent_batches": len(batch_ids), "finished_jobs": len(job_ids)}
