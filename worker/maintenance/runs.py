"""Every upkeep run is locked and recorded.

A run takes a PostgreSQL session-level advisory lock keyed on ``kind:target``, so two beats,
two workers or a person at the CLI never rebuild the same index or vacuum the same table at
once. The lock lives on a connection of its own: the run's work commits many transactions
(and uses autocommit connections for ``CONCURRENTLY``), which a transaction-level lock
would not survive. Each run writes one ``maintenance_run`` row saying what it saw and did.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, text

from worker.errors import describe

log = logging.getLogger(__name__)

LOCK_HELD_REASON = "another run holds the lock"


@dataclass
class RunRecord:
    """What the caller sees inside ``maintenance_run``: fill ``details``; return early when
    ``skipped``. ``id`` is None for dry runs (they write nothing) and for skips in dry runs."""

    kind: str
    target: str | None
    dry_run: bool = False
    skipped: bool = False
    id: int | None = None
    details: dict[str, Any] = field(default_factory=dict)
    failed_reason: str | None = None

    def fail(self, reason: str) -> None:
        """Mark the run failed without raising (e.g. one model of several could not be
        rebuilt): the row says 'failed' and the other work still happens."""
        self.failed_reason = reason


def _json(details: dict[str, Any]) -> str:
    # default=str: datetimes and Decimals from catalog queries end up readable, not fatal.
    return json.dumps(details, default=str)


@contextmanager
def advisory_lock(engine: Engine, key: str) -> Iterator[bool]:
    """Try to take the session-level advisory lock ``hashtext(key)``; yields whether it was
    taken. Released at the end; if releasing fails the connection is invalidated, because a
    pooled connection that kept the lock would block every later run."""
    conn = engine.connect()
    taken = False
    try:
        taken = bool(
            conn.execute(text("SELECT pg_try_advisory_lock(hashtext(:k))"), {"k": key}).scalar()
        )
        # Commit so the pooled connection is not left idle in a transaction for the run.
        conn.commit()
        yield taken
    finally:
        _release(conn, key, taken)


def _release(conn: Connection, key: str, taken: bool) -> None:
    try:
        if taken:
            conn.rollback()  # an aborted transaction would refuse the unlock
            conn.execute(text("SELECT pg_advisory_unlock(hashtext(:k))"), {"k": key})
            conn.commit()
        conn.close()
    except Exception:
        log.warning("could not release advisory lock %r; dropping the connection", key)
        conn.invalidate()  # the backend ends, and with it the lock
        conn.close()


def _insert_run(engine: Engine, kind: str, target: str | None, status: str, details: str) -> int:
    with engine.begin() as conn:
        finished = "now()" if status != "running" else "NULL"
        run_id: int = conn.execute(
            text(
                "INSERT INTO maintenance_run (kind, target, status, finished_at, details) "
                f"VALUES (:kind, :target, :status, {finished}, CAST(:details AS jsonb)) "
                "RETURNING id"
            ),
            {"kind": kind, "target": target, "status": status, "details": details},
        ).scalar_one()
    return run_id


def _finish_run(engine: Engine, run_id: int, status: str, details: str) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE maintenance_run SET status = :status, finished_at = now(), "
                "updated_at = now(), details = CAST(:details AS jsonb) WHERE id = :id"
            ),
            {"status": status, "details": details, "id": run_id},
        )


def _close_interrupted(engine: Engine, kind: str, target: str | None) -> None:
    """Rows still 'running' for this kind and target belong to a process that died (we hold
    the lock, so no live run has it): mark them failed rather than leave them running."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE maintenance_run SET status = 'failed', finished_at = now(), "
                "updated_at = now(), details = details || "
                "jsonb_build_object('error', 'interrupted: the process running it ended') "
                "WHERE kind = :kind AND target IS NOT DISTINCT FROM :target "
                "AND status = 'running'"
            ),
            {"kind": kind, "target": target},
        )


@contextmanager
def maintenance_run(
    engine: Engine, kind: str, target: str | None, *, dry_run: bool = False
) -> Iterator[RunRecord]:
    """Lock and record one upkeep run.

    Lock taken: a 'running' row is written (so ``history`` shows runs in progress), the
    caller fills ``record.details``, and the row ends 'done' (or 'failed' with the error when
    the block raises or calls ``record.fail``). Lock held elsewhere: a 'skipped' row is
    written and the record comes back with ``skipped=True``. A dry run writes no row: it
    only reports what it would do.
    """
    record = RunRecord(kind=kind, target=target, dry_run=dry_run)
    key = f"{kind}:{target or ''}"
    with advisory_lock(engine, key) as taken:
        if not taken:
            record.skipped = True
            record.details = {"reason": LOCK_HELD_REASON}
            if not dry_run:
                record.id = _insert_run(engine, kind, target, "skipped", _json(record.details))
            log.info("maintenance %s %s skipped: %s", kind, target, LOCK_HELD_REASON)
            yield record
            return
        if not dry_run:
            _close_interrupted(engine, kind, target)
            record.id = _insert_run(engine, kind, target, "running", _json({}))
        started = time.monotonic()
        try:
            yield record
        except BaseException as exc:
            record.details["error"] = describe(exc)
            record.details["duration_s"] = round(time.monotonic() - started, 3)
            if record.id is not None:
                _finish_run(engine, record.id, "failed", _json(record.details))
            raise
        record.details["duration_s"] = round(time.monotonic() - started, 3)
        status = "done"
        if record.failed_reason is not None:
            status = "failed"
            record.details.setdefault("error", record.failed_reason)
        if record.id is not None:
            _finish_run(engine, record.id, status, _json(record.details))


def history(engine: Engine, limit: int = 20) -> list[dict[str, Any]]:
    """The latest runs, newest first, as plain dicts (``details`` decoded)."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT id, kind, target, status, started_at, finished_at, "
                "EXTRACT(EPOCH FROM (finished_at - started_at))::float8 AS seconds, details "
                "FROM maintenance_run ORDER BY started_at DESC, id DESC LIMIT :limit"
            ),
            {"limit": int(limit)},
        )
        return [dict(r._mapping) for r in rows]


# --- shared session helpers (indexes, vacuum and stats all need them) ---------------------


def table_stats(conn: Connection, tables: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """pg_stat_user_tables per table (fresh: the cumulative statistics are cached per
    transaction otherwise), with the dead share computed. Keys are table names."""
    conn.execute(text("SELECT pg_stat_clear_snapshot()"))
    rows = conn.execute(
        text(
            "SELECT relname AS table, schemaname AS schema, relid, "
            "format('%I.%I', schemaname, relname) AS qualified, "
            "n_live_tup AS live, n_dead_tup AS dead, n_mod_since_analyze AS mod_since_analyze, "
            # Row versions left behind in every index by deletes and non-HOT updates: unlike
            # n_dead_tup, not lowered when a page is pruned (the index entries stay).
            "n_tup_del + n_tup_upd - n_tup_hot_upd AS index_writes, "
            "last_vacuum, last_autovacuum, last_analyze, last_autoanalyze, "
            "pg_total_relation_size(relid) AS total_bytes "
            "FROM pg_stat_user_tables "
            "WHERE (CAST(:names AS text[]) IS NULL OR relname = ANY(CAST(:names AS text[]))) "
            "ORDER BY relname"
        ),
        {"names": tables},
    )
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        item = dict(row._mapping)
        total = int(item["live"]) + int(item["dead"])
        item["dead_share"] = round(int(item["dead"]) / total, 4) if total else 0.0
        out[str(item["table"])] = item
    return out
