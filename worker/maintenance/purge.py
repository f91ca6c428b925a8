"""Hard-delete items that users deleted more than ``purge_after_days`` ago.

Soft delete keeps a deleted item recoverable for a while; after that its rows (upload,
bookmark, analyses, embeddings: all ``ON DELETE CASCADE``) go for good. In batches of 1000,
each its own transaction, so a big purge never holds locks on many rows or bloats one
transaction, and two purges (or a purge and a user's undelete) skip each other's rows.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, text

from worker.config import Settings
from worker.maintenance.runs import maintenance_run

BATCH = 1000

_DUE = (
    "FROM item WHERE deleted_at IS NOT NULL AND deleted_at < now() - make_interval(days => :days)"
)


def purge_deleted(engine: Engine, settings: Settings, *, dry_run: bool = False) -> dict[str, Any]:
    """Delete items soft-deleted over ``settings.purge_after_days`` ago; returns counts."""
    days = settings.purge_after_days
    with maintenance_run(engine, "purge", "item", dry_run=dry_run) as run:
        if run.skipped:
            return {"skipped": True, "run_id": run.id, **run.details}
        run.details["purge_after_days"] = days
        if dry_run:
            with engine.connect() as conn:
                due = conn.execute(text(f"SELECT count(*) {_DUE}"), {"days": days}).scalar_one()
            run.details["would_delete"] = int(due)
        else:
            run.details["deleted"], run.details["batches"] = _delete_in_batches(engine, days)
        return {"skipped": False, "run_id": run.id, "dry_run": dry_run, **run.details}


def _delete_in_batches(engine: Engine, days: int) -> tuple[int, int]:
    deleted = batches = 0
    sql = text(
        f"WITH doomed AS (SELECT id {_DUE} ORDER BY id LIMIT :batch FOR UPDATE SKIP LOCKED) "
        "DELETE FROM item i USING doomed d WHERE i.id = d.id"
    )
    while True:
        with engine.begin() as conn:
            count = conn.execute(sql, {"days": days, "batch": BATCH}).rowcount
        deleted += count
        batches += 1
        if count < BATCH:
            return deleted, batches
