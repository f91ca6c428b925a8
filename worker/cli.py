"""The ``worker`` command (also ``python -m worker``)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from worker.config import get_settings
from worker.errors import WorkerError


def _settings_env() -> None:
    """Point this process (and the children it starts) at the embedded services when no
    DATABASE_URL/REDIS_URL is set, so `worker demo` works on a fresh clone."""
    from worker import services

    settings = get_settings()
    for key, value in services.env(settings).items():
        os.environ.setdefault(key, value)
    get_settings.cache_clear()


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(none)"
    cols = list(columns or rows[0].keys())
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in cols] for r in rows]
    widths = [min(60, max(len(c), *(len(row[i]) for row in cells))) for i, c in enumerate(cols)]
    fmt = "  ".join(f"{{:<{w}.{w}}}" for w in widths)
    lines = [fmt.format(*cols), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in cells]
    return "\n".join(lines)


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@click.group()
@click.option("--log-level", default=None, help="Override LOG_LEVEL for this command.")
def cli(log_level: str | None) -> None:
    """Ingestion and embedding worker: uploads and bookmark exports into PostgreSQL+pgvector."""
    from worker.logs import configure_logging

    if log_level:
        os.environ["LOG_LEVEL"] = log_level
        get_settings.cache_clear()
    configure_logging(get_settings())


# --- services ----------------------------------------------------------------------------


@cli.group()
def services() -> None:
    """Embedded PostgreSQL (+pgvector) and Redis for demo, development and tests."""


@services.command("up")
def services_up() -> None:
    """Start both (idempotent), create the database and the vector extension."""
    from worker import services as svc

    urls = svc.up(get_settings())
    for key, value in urls.items():
        click.echo(f"{key}={value}")


@services.command("down")
def services_down() -> None:
    from worker import services as svc

    svc.down(get_settings())
    click.echo("stopped")


@services.command("status")
def services_status() -> None:
    from worker import services as svc

    rows = [s.__dict__ for s in svc.status(get_settings())]
    click.echo(_table(rows))
    if not all(r["running"] for r in rows):
        sys.exit(1)


@services.command("env")
def services_env() -> None:
    """Print the exports that point the worker at the embedded services."""
    from worker import services as svc

    for key, value in svc.env(get_settings()).items():
        click.echo(f"export {key}={value}")


# --- configuration and health ------------------------------------------------------------


@cli.command("config")
def config_cmd() -> None:
    """Print every setting (secrets masked)."""
    _echo_json(get_settings().safe_dict())


@cli.command("health")
@click.option("--worker/--no-worker", "ping_worker", default=False, help="Also ask a worker.")
@click.option("--timeout", default=30.0, show_default=True)
def health_cmd(ping_worker: bool, timeout: float) -> None:
    """Database, pgvector, migration head, Redis and (with --worker) a live worker."""
    from worker.db.engine import health_check

    report = health_check().as_dict()
    if ping_worker:
        from worker.app import TASK_HEALTH, app

        try:
            result = app.send_task(TASK_HEALTH).get(timeout=timeout)
            report["worker"] = result
        except Exception as exc:
            report["worker"] = {"ok": False, "error": f"no answer in {timeout}s ({exc})"}
            report["ok"] = False
    _echo_json(report)
    if not report["ok"]:
        sys.exit(1)


# --- running -------------------------------------------------------------------------------


def _celery_worker_argv(queues: str, concurrency: int | None, beat: bool) -> list[str]:
    settings = get_settings()
    argv = [
        "worker",
        "--loglevel",
        settings.log_level,
        "-Q",
        queues,
        "--concurrency",
        str(concurrency or settings.worker_concurrency),
    ]
    if beat:
        argv.append("--beat")
    return argv


@cli.command("run")
@click.option("--queues", "-Q", default=None, help="Comma-separated; default: all three.")
@click.option("--concurrency", "-c", type=int, default=None)
@click.option("--beat", is_flag=True, help="Embed the beat scheduler (one per deployment!).")
def run_cmd(queues: str | None, concurrency: int | None, beat: bool) -> None:
    """Start a Celery worker process (prefork) consuming the worker's queues."""
    from worker.app import app

    s = get_settings()
    queues = queues or f"{s.queue_ingest},{s.queue_imports},{s.queue_maintenance}"
    app.worker_main(_celery_worker_argv(queues, concurrency, beat))


@cli.command("beat")
def beat_cmd() -> None:
    """Start Celery beat. Run exactly one per deployment (maintenance runs also hold an
    advisory lock, so a second beat is harmless, only wasteful)."""
    from worker.app import app

    app.start(["beat", "--loglevel", get_settings().log_level])


# --- database ------------------------------------------------------------------------------


@cli.group()
def db() -> None:
    """Migrations and database operations."""


@db.command("upgrade")
@click.argument("revision", default="head")
def db_upgrade(revision: str) -> None:
    from worker.db import migrate

    migrate.upgrade(revision)
    click.echo(f"upgraded to {revision}")


@db.command("downgrade")
@click.argument("revision")
def db_downgrade(revision: str) -> None:
    from worker.db import migrate

    migrate.downgrade(revision)
    click.echo(f"downgraded to {revision}")


@db.command("current")
def db_current() -> None:
    from worker.db import migrate

    migrate.current()


@db.command("history")
def db_history() -> None:
    from worker.db import migrate

    migrate.history()


@db.command("revision")
@click.option("-m", "--message", required=True)
def db_revision(message: str) -> None:
    """Autogenerate a migration from the difference between models and database."""
    from worker.db import migrate

    migrate.revision(message)


@db.command("reset")
@click.option("--yes", is_flag=True, help="Confirm: every row is deleted.")
def db_reset(yes: bool) -> None:
    """Drop everything and migrate again (refuses without --yes)."""
    if not yes:
        raise click.UsageError("reset deletes every row: pass --yes to confirm")
    from worker.db import ops
    from worker.db.engine import get_engine

    ops.reset(get_settings(), get_engine())
    click.echo("database reset and migrated to head")


@db.command("verify")
def db_verify() -> None:
    """Extension present, schema at head, no INVALID index."""
    from worker.db import ops
    from worker.db.engine import get_engine

    report = ops.verify(get_engine())
    _echo_json({"ok": report.ok, "checks": report.checks, "problems": report.problems})
    if not report.ok:
        sys.exit(1)


@db.command("stats")
@click.option("--json", "as_json", is_flag=True)
def db_stats(as_json: bool) -> None:
    """Sizes, tuples, connections, long queries, slowest statements."""
    from worker.db import ops
    from worker.db.engine import get_engine

    data = ops.stats(get_engine())
    if as_json:
        _echo_json(data)
        return
    click.echo(f"database size: {data['database_size']}\n")
    for key in ("tables", "indexes", "connections", "long_running"):
        click.echo(f"{key}:\n{_table(data[key])}\n")
    slow = data["slowest_statements"]
    click.echo("slowest statements:\n" + (_table(slow) if isinstance(slow, list) else slow))


@db.command("backup")
@click.argument("file", type=click.Path(path_type=Path))
def db_backup(file: Path) -> None:
    """pg_dump -Fc to FILE."""
    from worker.db import ops

    ops.backup(get_settings(), file)
    click.echo(f"backup written to {file} ({file.stat().st_size} bytes)")


@db.command("restore")
@click.argument("file", type=click.Path(path_type=Path))
def db_restore(file: Path) -> None:
    """pg_restore FILE into the configured database."""
    from worker.db import ops

    ops.restore(get_settings(), file)
    click.echo(f"restored {file}")


# --- demo ----------------------------------------------------------------------------------


@cli.command("demo")
def demo_cmd() -> None:
    """The main job on the embedded default: services up, migrations, a real worker
    answering; then a sample upload and bookmark import processed and searched."""
    from worker.demo import run_demo

    _settings_env()
    run_demo(click.echo)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cli.main(args=list(argv) if argv is not None else None, standalone_mode=False)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 1
    except WorkerError as exc:
        click.echo(f"error: {exc}", err=True)
        return 2
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    return 0
