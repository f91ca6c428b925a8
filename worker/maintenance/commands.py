"""``worker maintenance``: run upkeep by hand and read its history.

worker maintenance run [indexes|vacuum|requeue|purge|stats|all] [--dry-run]
worker maintenance history [--limit N]
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click
from sqlalchemy import Engine

from worker.config import Settings, get_settings
from worker.render import table

TASKS = ("indexes", "vacuum", "requeue", "purge", "stats")
# Order for "all": requeue and purge first (cheap, and purge makes dead tuples), then the
# index upkeep (which rebuilds before vacuuming a churned index), VACUUM, and figures last.
ALL_ORDER = ("requeue", "purge", "indexes", "vacuum", "stats")


def _send(task: str, args: list[Any], queue: str) -> None:
    from worker.app import app

    app.send_task(task, args=args, queue=queue)


def _requeue_all(engine: Engine, settings: Settings, *, dry_run: bool) -> dict[str, Any]:
    """Stuck uploads, import batches and jobs, then stuck model backfills."""
    from worker.maintenance import requeue
    from worker.models import requeue_stuck_backfills

    result = requeue.find_and_requeue(engine, settings, _send, dry_run=dry_run)
    result["backfills"] = requeue_stuck_backfills(engine, settings, _send, dry_run=dry_run)
    return result


def run_one(name: str, engine: Engine, settings: Settings, *, dry_run: bool) -> dict[str, Any]:
    """Run one upkeep task by name; returns its result dict."""
    from worker.maintenance import indexes, purge, stats, vacuum

    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "indexes": lambda: indexes.run_index_upkeep(engine, settings, dry_run=dry_run),
        "vacuum": lambda: vacuum.run_vacuum(engine, dry_run=dry_run),
        "requeue": lambda: _requeue_all(engine, settings, dry_run=dry_run),
        "purge": lambda: purge.purge_deleted(engine, settings, dry_run=dry_run),
        "stats": lambda: (
            stats.snapshot(engine)
            if not dry_run
            else {**stats.collect(engine), "dry_run": True, "run_id": None}
        ),
    }
    return runners[name]()


# --- printing -----------------------------------------------------------------------------


def summarize(name: str, result: dict[str, Any]) -> str:
    """Readable lines for one task's result."""
    if result.get("skipped"):
        return f"{name}: skipped ({result.get('reason', 'another run holds the lock')})"
    head = f"{name}{' (dry run)' if result.get('dry_run') else ''}: run {result.get('run_id')}"
    body = _BODIES.get(name, _body_generic)(result)
    return f"{head}\n{body}" if body else head


def _body_indexes(result: dict[str, Any]) -> str:
    rows = []
    for model, r in result.get("models", {}).items():
        drift = r.get("drift", {})
        rows.append(
            {
                "model": model,
                "rows": drift.get("rows"),
                "growth": drift.get("growth"),
                "dead_share": drift.get("dead_share"),
                "recall_before": (r.get("recall_before") or {}).get("recall"),
                "recall_after": (r.get("recall_after") or {}).get("recall"),
                "decision": r.get("decision") or r.get("error"),
                "seconds": r.get("seconds"),
            }
        )
    cols = ["model", "rows", "growth", "dead_share", "recall_before", "recall_after"]
    out = table(rows, [*cols, "decision", "seconds"])
    invalid = result.get("invalid_indexes") or []
    if invalid:
        out += "\ninvalid indexes:\n" + table(invalid, ["index", "table", "dropped"])
    return out


def _body_vacuum(result: dict[str, Any]) -> str:
    cols = ["table", "dead_before", "dead_after", "seconds", "reasons"]
    return table(result.get("tables", []), cols)


def _body_requeue(result: dict[str, Any]) -> str:
    rows = [
        {"kind": kind, **result[kind]}
        for kind in ("uploads", "batches", "jobs")
        if isinstance(result.get(kind), dict)
    ]
    cols = ["would_resend", "would_fail"] if result.get("dry_run") else ["resent", "failed"]
    return table(rows, ["kind", *cols])


def _body_purge(result: dict[str, Any]) -> str:
    if result.get("dry_run"):
        return f"would delete {result.get('would_delete')} items"
    return f"deleted {result.get('deleted')} items in {result.get('batches')} batches"


def _body_stats(result: dict[str, Any]) -> str:
    tables = table(result.get("tables", []), ["table", "live", "dead", "dead_share", "bytes"])
    models = table(
        result.get("models", []), ["model", "state", "rows", "index_bytes", "last_recall"]
    )
    items = ", ".join(f"{k}={v}" for k, v in result.get("items_by_status", {}).items())
    imports = ", ".join(f"{k}={v}" for k, v in result.get("imports_running", {}).items())
    return f"{tables}\n\n{models}\n\nitems: {items or '(none)'}\nimports: {imports}"


def _body_generic(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=2, default=str)


_BODIES: dict[str, Callable[[dict[str, Any]], str]] = {
    "indexes": _body_indexes,
    "vacuum": _body_vacuum,
    "requeue": _body_requeue,
    "purge": _body_purge,
    "stats": _body_stats,
}


# --- click ---------------------------------------------------------------------------------


@click.group("maintenance")
def maintenance() -> None:
    """Scheduled upkeep by hand: indexes, VACUUM, requeue, purge, stats."""


@maintenance.command("run")
@click.argument("what", type=click.Choice([*TASKS, "all"]), default="all")
@click.option("--dry-run", is_flag=True, help="Measure and report; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw results as JSON.")
def run_cmd(what: str, dry_run: bool, as_json: bool) -> None:
    """Run one upkeep task (or all of them) now, under the same lock as the scheduled run."""
    from worker.db.engine import get_engine

    settings = get_settings()
    engine = get_engine(settings)
    names = ALL_ORDER if what == "all" else (what,)
    results = {}
    for name in names:
        results[name] = run_one(name, engine, settings, dry_run=dry_run)
        if not as_json:
            click.echo(summarize(name, results[name]) + "\n")
    if as_json:
        click.echo(json.dumps(results, indent=2, default=str))


@maintenance.command("history")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1000))
def history_cmd(limit: int) -> None:
    """The latest upkeep runs, newest first."""
    from worker.db.engine import get_engine
    from worker.maintenance.runs import history

    rows = history(get_engine(get_settings()), limit=limit)
    for row in rows:
        row["started_at"] = f"{row['started_at']:%Y-%m-%d %H:%M:%S}" if row["started_at"] else ""
        row["summary"] = _history_summary(row.get("details") or {})
    cols = ["id", "kind", "target", "status", "started_at", "seconds", "summary"]
    click.echo(table(rows, cols))


def _history_summary(details: dict[str, Any]) -> str:
    """One short line per run: decisions per model, tables vacuumed, counts."""
    if "reason" in details:
        return str(details["reason"])
    if "error" in details:
        return f"error: {details['error']}"
    models, tables = details.get("models"), details.get("tables")
    if isinstance(models, dict):  # index upkeep
        return "; ".join(f"{m}: {r.get('decision', r.get('error'))}" for m, r in models.items())
    if isinstance(tables, list) and tables and "dead_before" in tables[0]:  # vacuum
        return ", ".join(f"{t['table']} {t['dead_before']}->{t.get('dead_after')}" for t in tables)
    if isinstance(tables, list) and isinstance(models, list):  # stats
        items = details.get("items_by_status", {})
        return f"{len(tables)} tables, {len(models)} models, items {items}"
    parts = []
    for key, value in details.items():
        if isinstance(value, dict):
            inner = " ".join(f"{k}={v}" for k, v in value.items() if isinstance(v, int | str))
            parts.append(f"{key} {inner}")
        elif isinstance(value, int | str) and key != "duration_s":
            parts.append(f"{key}={value}")
    return ", ".join(parts)
