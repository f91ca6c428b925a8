"""A one-screen view of the system for `worker status`: workers, queues, items, imports,
failures (with what to do), upkeep."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text

from worker.app import consumed_queues
from worker.config import Settings, get_settings
from worker.db.engine import session_scope
from worker.errors import describe
from worker.render import table


def queue_depths(settings: Settings) -> dict[str, int | str]:
    """Messages waiting per queue (Redis lists named after the queues)."""
    import redis

    try:
        conn = redis.Redis.from_url(settings.celery_broker_url, socket_timeout=2)
        return {q: int(conn.llen(q)) for q in consumed_queues(settings)}
    except redis.RedisError as exc:
        return {"error": f"redis unreachable: {exc.__class__.__name__}"}


def workers_seen(timeout: float = 1.0) -> list[dict[str, Any]] | str:
    """The workers that answer a ping within ``timeout`` (empty when none does), or why
    nobody could be asked."""
    from worker.app import app

    try:
        replies = app.control.inspect(timeout=timeout).ping() or {}
    except Exception as exc:  # broker down: the rest of the screen is still worth showing
        return f"cannot ask ({describe(exc)})"
    return [
        {"worker": name, "reply": reply.get("ok", reply) if isinstance(reply, dict) else reply}
        for name, reply in sorted(replies.items())
    ]


def recent_failures(limit: int = 5) -> list[dict[str, Any]]:
    from worker.db.engine import get_engine
    from worker.failures import list_failures

    return [
        {
            "kind": f.kind,
            "id": f.id,
            "user_id": f.user_id,
            "what": f.what,
            "reason": f.reason,
            "hint": f.hint,
        }
        for f in list_failures(get_engine(), limit=limit)
    ]


def _rows(sql: str) -> list[dict[str, Any]]:
    with session_scope() as s:
        return [dict(r._mapping) for r in s.execute(text(sql))]


def snapshot(settings: Settings | None = None) -> dict[str, Any]:
    settings = settings or get_settings()
    return {
        "workers": workers_seen(),
        "queues": queue_depths(settings),
        # Rates: items finished per second over the last minute (the import's own rate is
        # in imports_running).
        "throughput": _rows(
            "SELECT kind, status, count(*) AS last_minute, round(count(*) / 60.0, 1) AS per_s "
            "FROM item WHERE processed_at > now() - interval '1 minute' "
            "AND status IN ('done', 'failed', 'skipped') GROUP BY 1, 2 ORDER BY 1, 2"
        ),
        "items_last_hour": _rows(
            "SELECT kind, status, count(*) AS n FROM item "
            "WHERE updated_at > now() - interval '1 hour' GROUP BY 1, 2 ORDER BY 1, 2"
        ),
        "embed_window": _window_line(settings),
        "imports_running": imports_running(settings),
        "recent_failures": recent_failures(),
        "maintenance": _rows(
            "SELECT kind, target, status, started_at, "
            "round(extract(epoch FROM finished_at - started_at)::numeric, 2) AS seconds "
            "FROM maintenance_run ORDER BY started_at DESC LIMIT 5"
        ),
    }


def imports_running(settings: Settings) -> list[dict[str, Any]]:
    """Unfinished imports with their lane, progress, recent rate and ETA
    (``worker.bookmarks.progress``)."""
    from worker.bookmarks import progress

    out = []
    with session_scope() as s:
        now = s.execute(text("SELECT now()")).scalar_one()
        jobs = s.execute(
            text(
                "SELECT id, user_id, status, lane, processed, total, started_at, finished_at "
                "FROM import_job WHERE status IN ('queued', 'processing', 'paused') ORDER BY id"
            )
        ).all()
        for job in jobs:
            est = progress.estimate_job(s, job, window=settings.window, now=now)
            out.append(
                {
                    "id": job.id,
                    "user_id": job.user_id,
                    "status": job.status,
                    "lane": job.lane,
                    "processed": job.processed,
                    "total": job.total,
                    "pct": f"{100.0 * job.processed / max(job.total, 1):.1f}",
                    "per_s": f"{est.rate_per_s:.1f}" if est.rate_per_s else None,
                    "eta_s": round(est.eta_s) if est.eta_s is not None else None,
                    "note": est.note or "",
                }
            )
    return out


def _window_line(settings: Settings) -> str:
    window = settings.window
    if window is None:
        return "none (bulk work at any hour)"
    now = datetime.now(UTC)
    if window.contains(now):
        return f"{window}: open"
    return f"{window}: closed, opens {window.next_open(now):%Y-%m-%d %H:%M %Z}"


def overview(settings: Settings | None = None) -> str:
    data = snapshot(settings)
    workers = data["workers"]
    seen = ", ".join(w["worker"] for w in workers) if isinstance(workers, list) else workers
    parts = [
        f"workers: {seen or 'none answered (is `worker run` up?)'}",
        "queues: " + ", ".join(f"{k}={v}" for k, v in data["queues"].items()),
        f"embed window: {data['embed_window']}",
    ]
    for key in (
        "throughput",
        "items_last_hour",
        "imports_running",
        "recent_failures",
        "maintenance",
    ):
        parts.append(f"\n{key.replace('_', ' ')}:\n{table(data[key])}")
    return "\n".join(parts)
