"""One engine per process, sessions whose caller owns the transaction, and a health check."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pgvector.psycopg import register_vector
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from worker.config import Settings, get_settings, mask_url

_lock = threading.Lock()
_engines: dict[tuple[str, int], Engine] = {}


def make_engine(settings: Settings) -> Engine:
    engine = create_engine(
        settings.database_url,
        echo=settings.db_echo,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_recycle=settings.db_pool_recycle,
        pool_pre_ping=settings.db_pool_pre_ping,
        connect_args={"connect_timeout": 10, "application_name": "ingestion-worker"},
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Binary vector adapters for COPY and parameters. Before migration 0001 the type
        # does not exist yet; those connections simply go without.
        try:
            register_vector(dbapi_conn)
        except Exception:  # psycopg.ProgrammingError: vector type not found
            dbapi_conn.rollback()
        if settings.db_statement_timeout_ms:
            with dbapi_conn.cursor() as cur:
                cur.execute(f"SET statement_timeout = {int(settings.db_statement_timeout_ms)}")
            dbapi_conn.commit()

    return engine


def get_engine(settings: Settings | None = None) -> Engine:
    """The engine of this process for ``settings`` (a forked child builds its own: a pool
    must never be shared across fork)."""
    settings = settings or get_settings()
    key = (settings.database_url, os.getpid())
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _engines[key] = make_engine(settings)
        return engine


def dispose_engines() -> None:
    with _lock:
        for engine in _engines.values():
            engine.dispose(close=False)
        _engines.clear()


@contextmanager
def session_scope(engine: Engine | None = None, *, user_id: str | None = None) -> Iterator[Session]:
    """A session in one transaction: commit when the block ends, roll back on any error.
    With ``user_id``, the transaction declares that user for row-level security."""
    factory = sessionmaker(bind=engine or get_engine(), expire_on_commit=False)
    with factory() as session, session.begin():
        if user_id is not None:
            declare_user(session, user_id)
        yield session


def declare_user(session: Session | Connection, user_id: str) -> None:
    """With ROW_LEVEL_SECURITY on, set ``app.user_id`` for the rest of this transaction (the
    key of the row-level security policies, migration 0005). Transaction-local, so a pooled
    connection never carries one request's user into the next."""
    if get_settings().row_level_security:
        session.execute(text("SELECT set_config('app.user_id', :u, true)"), {"u": user_id})


@dataclass
class Health:
    database: bool = False
    pgvector: str | None = None
    migration: str | None = None
    migration_head: str | None = None
    redis: bool = False
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return (
            self.database
            and self.redis
            and self.pgvector is not None
            and self.migration is not None
            and self.migration == self.migration_head
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "database": self.database,
            "pgvector": self.pgvector,
            "migration": self.migration,
            "migration_head": self.migration_head,
            "redis": self.redis,
            "errors": self.errors,
        }


def alembic_head() -> str | None:
    from worker.db.migrate import script_directory

    return script_directory().get_current_head()


def health_check(settings: Settings | None = None) -> Health:
    """Is the database reachable, pgvector installed, the schema at head, Redis answering?"""
    import redis

    settings = settings or get_settings()
    health = Health()
    try:
        health.migration_head = alembic_head()
    except Exception as exc:  # a broken alembic tree is worth reporting, not crashing on
        health.errors["alembic"] = str(exc)
    try:
        with get_engine(settings).connect() as conn:
            health.database = True
            health.pgvector = conn.execute(
                text("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
            ).scalar()
            if conn.execute(text("SELECT to_regclass('alembic_version')")).scalar():
                health.migration = conn.execute(
                    text("SELECT version_num FROM alembic_version")
                ).scalar()
    except (OperationalError, SQLAlchemyError) as exc:
        health.errors["database"] = f"{mask_url(settings.database_url)}: {exc.__class__.__name__}"
    try:
        health.redis = bool(
            redis.Redis.from_url(settings.celery_broker_url, socket_timeout=2).ping()
        )
    except redis.RedisError as exc:
        health.errors["redis"] = f"{mask_url(settings.celery_broker_url)}: {exc}"
    return health


@contextmanager
def autocommit_session(engine: Engine, **settings: str | int) -> Iterator[Connection]:
    """An autocommit connection (``VACUUM`` and ``… CONCURRENTLY`` refuse transaction
    blocks) with session settings such as ``maintenance_work_mem`` applied for this work
    only: the previous values are restored before the connection goes back to the pool,
    where a raised memory limit or a cleared ``statement_timeout`` would otherwise leak into
    unrelated queries."""
    conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    saved: dict[str, str] = {}
    try:
        for name, value in settings.items():
            saved[name] = conn.execute(text("SELECT current_setting(:n)"), {"n": name}).scalar_one()
            conn.execute(text("SELECT set_config(:n, :v, false)"), {"n": name, "v": str(value)})
        yield conn
    finally:
        try:
            for name, value in saved.items():
                conn.execute(text("SELECT set_config(:n, :v, false)"), {"n": name, "v": value})
        except Exception:
            conn.invalidate()  # never hand a connection with odd settings back to the pool
        conn.close()
