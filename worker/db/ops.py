"""Database operations for the people who run the worker: verify, stats, backup, restore,
reset. Each returns data; ``worker.cli`` prints it."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

from worker.config import Settings
from worker.db import migrate
from worker.db.engine import alembic_head
from worker.errors import ConfigError


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    checks: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(engine: Engine) -> VerifyReport:
    """Extension present, schema at head, every index valid (a failed CREATE INDEX
    CONCURRENTLY leaves an INVALID index that is maintained but never used)."""
    report = VerifyReport()
    with engine.connect() as conn:
        ext = conn.execute(
            text("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
        ).scalar()
        report.checks["pgvector"] = ext
        if ext is None:
            report.problems.append("the vector extension is not installed (run: worker db upgrade)")
        has_version = conn.execute(text("SELECT to_regclass('alembic_version')")).scalar()
        current = (
            conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
            if has_version
            else None
        )
        head = alembic_head()
        report.checks["migration"] = current
        report.checks["head"] = head
        if current != head:
            report.problems.append(f"schema at {current}, code expects {head} (worker db upgrade)")
        invalid = conn.execute(
            text(
                "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                "WHERE NOT i.indisvalid AND c.relnamespace = 'public'::regnamespace "
                "ORDER BY 1"
            )
        ).scalars()
        for name in invalid:
            report.problems.append(
                f"index {name} is INVALID (a failed concurrent build): "
                f"DROP INDEX CONCURRENTLY {name}; then rebuild (worker maintenance run indexes)"
            )
        report.checks["indexes"] = conn.execute(
            text("SELECT count(*) FROM pg_indexes WHERE schemaname = 'public'")
        ).scalar()
    return report


def stats(engine: Engine) -> dict[str, Any]:
    """Sizes, tuples, connections, long queries and (when available) the slowest statements."""
    out: dict[str, Any] = {}
    with engine.connect() as conn:
        out["database_size"] = conn.execute(
            text("SELECT pg_size_pretty(pg_database_size(current_database()))")
        ).scalar()
        out["tables"] = [
            dict(r._mapping)
            for r in conn.execute(
                text(
                    "SELECT relname AS table, n_live_tup AS live, n_dead_tup AS dead, "
                    "pg_size_pretty(pg_total_relation_size(relid)) AS total_size, "
                    "last_autovacuum, last_analyze FROM pg_stat_user_tables "
                    "ORDER BY pg_total_relation_size(relid) DESC LIMIT 10"
                )
            )
        ]
        out["indexes"] = [
            dict(r._mapping)
            for r in conn.execute(
                text(
                    "SELECT indexrelname AS index, relname AS table, idx_scan AS scans, "
                    "pg_size_pretty(pg_relation_size(indexrelid)) AS size "
                    "FROM pg_stat_user_indexes ORDER BY pg_relation_size(indexrelid) DESC "
                    "LIMIT 10"
                )
            )
        ]
        out["connections"] = [
            dict(r._mapping)
            for r in conn.execute(
                text(
                    "SELECT state, count(*) AS n FROM pg_stat_activity "
                    "WHERE datname = current_database() GROUP BY state ORDER BY 2 DESC"
                )
            )
        ]
        out["long_running"] = [
            dict(r._mapping)
            for r in conn.execute(
                text(
                    "SELECT pid, now() - query_start AS running_for, state, left(query, 120) "
                    "AS query FROM pg_stat_activity WHERE datname = current_database() "
                    "AND state <> 'idle' AND now() - query_start > interval '30 seconds' "
                    "ORDER BY query_start"
                )
            )
        ]
        has_pss = conn.execute(
            text("SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements'")
        ).scalar()
        if has_pss:
            try:
                out["slowest_statements"] = [
                    dict(r._mapping)
                    for r in conn.execute(
                        text(
                            "SELECT calls, round(mean_exec_time::numeric, 2) AS mean_ms, "
                            "round(total_exec_time::numeric, 1) AS total_ms, "
                            "left(query, 120) AS query FROM pg_stat_statements "
                            "ORDER BY total_exec_time DESC LIMIT 10"
                        )
                    )
                ]
            except Exception as exc:  # loaded as extension but not preloaded
                conn.rollback()
                out["slowest_statements"] = (
                    f"pg_stat_statements is installed but not loaded ({exc.__class__.__name__}):"
                    " add shared_preload_libraries = 'pg_stat_statements' and restart"
                )
        else:
            out["slowest_statements"] = (
                "pg_stat_statements is not available: CREATE EXTENSION pg_stat_statements "
                "(with shared_preload_libraries = 'pg_stat_statements')"
            )
    return out


def _pg_binary(name: str) -> str:
    """The embedded server's own pg_dump/pg_restore/psql when installed (versions must match the
    server's), else the one on PATH."""
    try:
        from worker.services import pginstall_dir

        candidate = pginstall_dir() / "bin" / name
        if candidate.exists():
            return str(candidate)
    except ConfigError:
        pass
    found = shutil.which(name)
    if not found:
        raise ConfigError(f"{name} not found: install the PostgreSQL client or the embedded extra")
    return found


def backup(settings: Settings, file: Path) -> Path:
    """pg_dump in custom format (compressed, restorable table by table)."""
    file.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [_pg_binary("pg_dump"), "-Fc", "--no-owner", "-f", str(file), settings.psycopg_dsn],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise ConfigError(f"pg_dump failed: {proc.stderr.strip()}")
    return file


def restore(settings: Settings, file: Path) -> None:
    """Replace the configured database's schema with the backup's, in one transaction: a
    failed restore leaves the database as it was.

    Not ``pg_restore --clean``: its drops run partition by partition and PostgreSQL refuses
    to drop a partition's inherited constraints (``embedding`` is partitioned). Dropping the
    schema first and replaying the dump's SQL through psql in a single transaction does the
    same job atomically."""
    if not file.is_file():
        raise ConfigError(f"{file}: no such backup file")
    script = subprocess.run(
        [_pg_binary("pg_restore"), "--no-owner", "-f", "-", str(file)],
        capture_output=True,
        text=True,
        check=False,
    )
    if script.returncode != 0:
        raise ConfigError(f"pg_restore failed to read {file}: {script.stderr.strip()}")
    sql = "DROP SCHEMA IF EXISTS public CASCADE;\nCREATE SCHEMA public;\n" + script.stdout
    proc = subprocess.run(
        [
            _pg_binary("psql"),
            "--no-psqlrc",
            "--quiet",
            "--single-transaction",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            settings.psycopg_dsn,
        ],
        input=sql,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise ConfigError(f"restore of {file} failed (nothing changed): {proc.stderr.strip()}")


def reset(settings: Settings, engine: Engine) -> None:
    """Drop everything the worker owns and migrate again from scratch."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()
    migrate.upgrade("head", settings)
