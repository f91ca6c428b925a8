"""A fresh, migrated throw-away database for one benchmark, on the configured server (the
embedded one unless DATABASE_URL is set)."""

from __future__ import annotations

import os

from sqlalchemy import Engine


def fresh_database(name: str) -> Engine:
    """Drop and recreate ``name``, migrate it to head and make it this process's database
    (DATABASE_URL), so that workers started from here use it too."""
    from worker import services
    from worker.config import get_settings, load_settings
    from worker.db import migrate
    from worker.db.engine import get_engine

    settings = load_settings()
    if "DATABASE_URL" not in os.environ:
        services.pg_start(settings)
        services.redis_start(settings)
    base = settings.database_url.rsplit("/", 1)[0]
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
    them; starts the embedded services when no DATABASE_URL is set."""
    from worker import services
    from worker.config import get_settings

    settings = get_settings()
    if "DATABASE_URL" not in os.environ:
        services.pg_start(settings)
        services.redis_start(settings)
    base = settings.psycopg_dsn.rsplit("/", 1)[0]
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
