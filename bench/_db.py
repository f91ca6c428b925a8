"""A fresh throw-away database for one benchmark, on the configured server: DATABASE_URL and
REDIS_URL when set, else the embedded services on PG_PORT and REDIS_PORT (started if need
be). Never the defaults' ports when the ports say otherwise: on a shared machine those are
another checkout's servers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine

if TYPE_CHECKING:
    from worker.config import Settings


def use_upload_root(root: Path) -> Settings:
    """Point UPLOAD_ROOT at ``root`` for this process (and the workers it starts, which
    inherit the environment) and return the Settings read afresh."""
    from worker.config import get_settings

    os.environ["UPLOAD_ROOT"] = str(root)
    get_settings.cache_clear()
    return get_settings()


def worker_log_records(log_path: Path) -> Iterator[dict[str, Any]]:
    """The JSON records of a benchmark worker's log (LOG_FORMAT=json); other lines (Celery's
    own banner, a torn last line) are passed over."""
    import json

    for line in log_path.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            yield record


def uploads_seconds(user_id: str, paths: list[Path], *, timeout: float) -> tuple[float, list[int]]:
    """Enqueue ``paths`` for ``user_id`` and wait until every item is finished; returns the
    seconds from the first enqueue to the last item's ``processed_at`` (both read on the
    database's clock) and the item ids. Measured on the rows rather than by the moment a
    poll sees them done, so the poll can be slow: polling ten times a second cost the
    two-core machine the worker runs on a few per cent of its CPU."""
    from sqlalchemy import text

    from worker import client
    from worker.db.engine import session_scope

    with session_scope(user_id=user_id) as s:
        started = s.execute(text("SELECT clock_timestamp()")).scalar_one()
    ids = [client.enqueue_upload(user_id, p) for p in paths]
    counts = client.wait_for_items(user_id, ids, timeout=timeout, poll=0.5)
    if set(counts) != {"done"}:
        raise RuntimeError(f"uploads did not all finish: {counts}")
    with session_scope(user_id=user_id) as s:
        finished = s.execute(
            text("SELECT max(processed_at) FROM item WHERE user_id = :u AND id = ANY(:ids)"),
            {"u": user_id, "ids": ids},
        ).scalar_one()
    return (finished - started).total_seconds(), ids


def keep_worker_log(log_path: Path, label: str) -> None:
    """With BENCH_KEEP_LOG=PREFIX, copy a benchmark worker's log to PREFIX-LABEL.log before
    its temporary directory goes (to read its per-batch stage durations afterwards)."""
    prefix = os.environ.get("BENCH_KEEP_LOG")
    if prefix:
        import shutil

        shutil.copy(log_path, f"{prefix}-{label}.log")


def use_configured_services() -> None:
    """Without DATABASE_URL, start the embedded PostgreSQL and Redis on this checkout's
    PG_PORT / REDIS_PORT and point DATABASE_URL and REDIS_URL (unless set) at them, so that
    this process and every worker it starts talk to those servers."""
    from worker import services
    from worker.config import get_settings, load_settings

    if "DATABASE_URL" in os.environ:
        return
    settings = load_settings()
    services.pg_start(settings)
    if "REDIS_URL" not in os.environ:
        services.redis_start(settings)
    for key, value in services.env(settings).items():
        os.environ.setdefault(key, value)
    get_settings.cache_clear()


def fresh_database(name: str) -> Engine:
    """Drop and recreate ``name``, migrate it to head and make it this process's database
    (DATABASE_URL), so that workers started from here use it too."""
    from worker import services
    from worker.config import get_settings
    from worker.db import migrate
    from worker.db.engine import get_engine

    use_configured_services()
    base = get_settings().database_url.rsplit("/", 1)[0]
    admin = base.replace("postgresql+psycopg://", "postgresql://", 1) + "/postgres"
    services.drop_database(admin, name)
    services.ensure_database(admin, name)
    os.environ["DATABASE_URL"] = f"{base}/{name}"
    get_settings.cache_clear()
    migrate.upgrade("head")
    return get_engine()


def drop_database(name: str) -> None:
    from worker import services
    from worker.config import get_settings
    from worker.db.engine import dispose_engines

    dispose_engines()
    base = get_settings().database_url.rsplit("/", 1)[0]
    admin = base.replace("postgresql+psycopg://", "postgresql://", 1) + "/postgres"
    services.drop_database(admin, name)


def _admin_dsn() -> tuple[str, str]:
    """(server DSN without the database, the maintenance database's DSN), as libpq takes
    them."""
    from worker.config import get_settings

    use_configured_services()
    base = get_settings().psycopg_dsn.rsplit("/", 1)[0]
    return base, base + "/postgres"


def fresh_plain_database(name: str) -> str:
    """Drop and recreate ``name`` with only the vector extension (no migrations: for a peer
    that creates its own tables); returns its libpq DSN."""
    from worker import services

    base, admin = _admin_dsn()
    services.drop_database(admin, name)
    services.ensure_database(admin, name)
    return f"{base}/{name}"


def drop_plain_database(name: str) -> None:
    from worker import services

    services.drop_database(_admin_dsn()[1], name)
