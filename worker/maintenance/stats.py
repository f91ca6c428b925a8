"""A snapshot of what upkeep watches, recorded as a ``maintenance_run`` of kind 'stats' so
that history shows how tables, indexes and queues grew over time."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Engine, text

from worker.db.indexes import IndexSpec, model_predicate
from worker.maintenance.runs import maintenance_run, table_stats


def _tables(conn: Connection) -> list[dict[str, Any]]:
    return [
        {
            "table": name,
            "live": row["live"],
            "dead": row["dead"],
            "dead_share": row["dead_share"],
            "bytes": row["total_bytes"],
        }
        for name, row in table_stats(conn).items()
    ]


def _models(conn: Connection) -> list[dict[str, Any]]:
    out = []
    models = conn.execute(
        text(
            "SELECT name, dimensions, distance, state, index_kind, index_precision, index_params, "
            "rows_at_build, built_at, last_recall, last_recall_at FROM embedding_model ORDER BY id"
        )
    ).all()
    for m in models:
        spec = IndexSpec.from_row(m)
        rows = conn.execute(
            text(f"SELECT count(*) FROM embedding WHERE {model_predicate(spec.model)}")
        ).scalar_one()
        index_bytes = conn.execute(
            text("SELECT pg_relation_size(to_regclass(:n))"), {"n": f"public.{spec.name}"}
        ).scalar()
        out.append(
            {
                "model": spec.model,
                "state": m.state,
                "rows": int(rows),
                "index": spec.name,
                "index_bytes": index_bytes,
                "rows_at_build": m.rows_at_build,
                "built_at": m.built_at,
                "last_recall": m.last_recall,
                "last_recall_at": m.last_recall_at,
                "index_params": m.index_params,
            }
        )
    return out


def _items_by_status(conn: Connection) -> dict[str, int]:
    rows = conn.execute(
        text(
            "SELECT status, count(*) FROM item WHERE deleted_at IS NULL GROUP BY status ORDER BY 1"
        )
    )
    return {str(r[0]): int(r[1]) for r in rows}


def _imports(conn: Connection) -> dict[str, int]:
    row = conn.execute(
        text(
            "SELECT count(*) FILTER (WHERE status = 'queued') AS queued, "
            "count(*) FILTER (WHERE status = 'processing') AS processing, "
            "count(*) FILTER (WHERE status = 'paused') AS paused FROM import_job"
        )
    ).one()
    return {"queued": row.queued, "processing": row.processing, "paused": row.paused}


def collect(engine: Engine) -> dict[str, Any]:
    """The figures, without recording them."""
    with engine.connect() as conn:
        return {
            "tables": _tables(conn),
            "models": _models(conn),
            "items_by_status": _items_by_status(conn),
            "imports_running": _imports(conn),
        }


def snapshot(engine: Engine) -> dict[str, Any]:
    """Collect the figures and record them as a 'stats' run; returns them."""
    with maintenance_run(engine, "stats", None) as run:
        if run.skipped:
            return {"skipped": True, "run_id": run.id, **run.details}
        run.details.update(collect(engine))
        return {"skipped": False, "run_id": run.id, **run.details}
