"""Alembic environment: the database URL comes from the worker's own Settings."""

from __future__ import annotations

from sqlalchemy import create_engine, pool

from alembic import context
from worker.config import get_settings
from worker.db.models import Base

config = context.config
target_metadata = Base.metadata


# Objects that live outside the models on purpose: per-model vector indexes are created
# from embedding_model rows (worker.db.indexes), not declared in metadata.
def include_object(obj, name, type_, reflected, compare_to):  # type: ignore[no-untyped-def]
    if type_ == "index" and reflected and name and name.startswith("embedding_vec_"):
        return False
    return not (type_ == "table" and name == "alembic_version")


def _url() -> str:
    return config.attributes.get("database_url") or get_settings().database_url


def run_migrations_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        include_object=include_object,
        compare_server_default=False,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        _run(connection)


def _run(connection):  # type: ignore[no-untyped-def]
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        include_object=include_object,
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
