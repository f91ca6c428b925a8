"""VACUUM (ANALYZE) the tables that need it, and ANALYZE after a bulk import.

Autovacuum does most of this; the scheduled run catches what its thresholds leave behind
(a big table's 20% scale factor is a lot of dead rows) and, more importantly, rebuilds a
churned HNSW index *before* vacuuming its table (pgvector #450): vacuum repairs the graph
around every dead tuple, which measured here took minutes where a concurrent rebuild and
then VACUUM took 22 s + 0.7 s.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Engine, text

from worker.db.engine import autocommit_session
from worker.maintenance.indexes import rebuild_churned_hnsw
from worker.maintenance.runs import maintenance_run, table_stats

log = logging.getLogger(__name__)

MIN_DEAD_TUPLES = 1000
MIN_DEAD_SHARE = 0.05
MIN_MOD_SHARE = 0.10


def vacuum_reasons(stats: dict[str, Any]) -> list[str]:
    """Why a table (one row of ``table_stats``) needs VACUUM (ANALYZE); empty: it does not."""
    live, dead = int(stats["live"]), int(stats["dead"])
    reasons = []
    if dead > MIN_DEAD_TUPLES and stats["dead_share"] > MIN_DEAD_SHARE:
        reasons.append(f"{dead} dead tuples ({stats['dead_share']:.0%})")
    if live and int(stats["mod_since_analyze"]) > MIN_MOD_SHARE * live:
        reasons.append(f"{stats['mod_since_analyze']} rows changed since ANALYZE")
    if live and stats["last_vacuum"] is None and stats["last_autovacuum"] is None:
        reasons.append("never vacuumed")
    if live and stats["last_analyze"] is None and stats["last_autoanalyze"] is None:
        reasons.append("never analyzed")
    return reasons


def vacuum_table(engine: Engine, qualified: str) -> float:
    """``VACUUM (ANALYZE)`` on an autocommit connection (it refuses transaction blocks),
    without the worker's statement timeout. Returns seconds taken."""
    started = time.monotonic()
    with autocommit_session(engine, statement_timeout=0) as conn:
        conn.execute(text(f"VACUUM (ANALYZE) {qualified}"))
    return round(time.monotonic() - started, 3)


def _choose(
    stats: dict[str, dict[str, Any]], force_tables: Sequence[str] | None
) -> dict[str, list[str]]:
    if force_tables is not None:
        unknown = sorted(set(force_tables) - set(stats))
        if unknown:
            raise ValueError(f"unknown tables: {', '.join(unknown)}")
        return {name: ["forced"] for name in force_tables}
    chosen = {name: vacuum_reasons(row) for name, row in stats.items()}
    return {name: reasons for name, reasons in chosen.items() if reasons}


def run_vacuum(
    engine: Engine, *, dry_run: bool = False, force_tables: list[str] | None = None
) -> dict[str, Any]:
    """VACUUM (ANALYZE) each table that needs it (or ``force_tables``), rebuilding churned
    HNSW indexes first; records dead tuples before and after."""
    with maintenance_run(engine, "vacuum", "database", dry_run=dry_run) as run:
        if run.skipped:
            return {"skipped": True, "run_id": run.id, **run.details}
        with engine.connect() as conn:
            stats = table_stats(conn)
        chosen = _choose(stats, force_tables)
        tables: list[dict[str, Any]] = []
        run.details["tables"] = tables
        for name, reasons in chosen.items():
            before = stats[name]
            entry: dict[str, Any] = {
                "table": name,
                "reasons": reasons,
                "live_before": before["live"],
                "dead_before": before["dead"],
            }
            tables.append(entry)
            entry["pre_rebuild"] = rebuild_churned_hnsw(engine, name, dry_run=dry_run)
            if dry_run:
                continue
            entry["seconds"] = vacuum_table(engine, before["qualified"])
            with engine.connect() as conn:
                after = table_stats(conn, [name]).get(name, {})
            entry["dead_after"] = after.get("dead")
            entry["live_after"] = after.get("live")
        return {"skipped": False, "run_id": run.id, "dry_run": dry_run, "tables": tables}


def analyze_tables(
    engine: Engine, tables: Sequence[str], *, columns: Sequence[str] = ()
) -> dict[str, Any]:
    """ANALYZE right after a bulk import, so the planner knows the new rows before autovacuum
    notices them. SKIP_LOCKED: a VACUUM (ANALYZE) already running on a table does the same
    work, and waiting for it would hold up the import's last step. Not recorded as a run:
    it is part of the import, and cheap. ``columns``: only these (of every table), when
    only they are filtered and joined on and the others (vectors) cost the most to sample."""
    column_list = f" ({', '.join(columns)})" if columns else ""
    with engine.connect() as conn:
        known = table_stats(conn, list(tables))
    done: list[str] = []
    started = time.monotonic()
    with autocommit_session(engine, statement_timeout=0) as conn:
        for name in tables:
            if name in known:
                conn.execute(text(f"ANALYZE (SKIP_LOCKED) {known[name]['qualified']}{column_list}"))
                done.append(name)
    unknown = [t for t in tables if t not in known]
    if unknown:
        log.warning("ANALYZE skipped unknown tables: %s", ", ".join(unknown))
    return {"analyzed": done, "unknown": unknown, "seconds": round(time.monotonic() - started, 3)}
