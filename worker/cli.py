"""The ``worker`` command (also ``python -m worker``)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import click

from worker.bookmarks.parse import FORMATS
from worker.config import get_settings
from worker.errors import WorkerError
from worker.render import table as _table

if TYPE_CHECKING:
    from worker.search import Mode


def _settings_env() -> None:
    """Point this process (and the children it starts) at the embedded services when no
    DATABASE_URL/REDIS_URL is set, so `worker demo` works on a fresh clone."""
    from worker import services

    settings = get_settings()
    for key, value in services.env(settings).items():
        os.environ.setdefault(key, value)
    get_settings.cache_clear()


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
@click.option(
    "--queues",
    "-Q",
    default=None,
    help="Comma-separated, polled in this order; default: ingest,imports,maintenance,bulk.",
)
@click.option("--concurrency", "-c", type=int, default=None)
@click.option("--beat", is_flag=True, help="Embed the beat scheduler (one per deployment!).")
def run_cmd(queues: str | None, concurrency: int | None, beat: bool) -> None:
    """Start a Celery worker process (prefork) consuming the worker's queues."""
    from worker.app import app, consumed_queues

    queues = queues or ",".join(consumed_queues(get_settings()))
    app.worker_main(_celery_worker_argv(queues, concurrency, beat))


@cli.command("beat")
def beat_cmd() -> None:
    """Start Celery beat. Run exactly one per deployment (maintenance runs also hold an
    advisory lock, so a second beat is harmless, only wasteful)."""
    from worker.app import app

    schedule = Path(tempfile.gettempdir()) / "worker-celerybeat-schedule"
    app.start(["beat", "--loglevel", get_settings().log_level, "--schedule", str(schedule)])


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


@db.command("seed")
@click.option("--user", "user_id", default="demo-user", show_default=True)
def db_seed(user_id: str) -> None:
    """A small demo user's data, through the real pipeline (in this process)."""
    from worker.demo import seed

    _echo_json(seed(user_id))


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


# --- producers' side ---------------------------------------------------------------------


def _progress_line(done: int, total: int, started: float, label: str) -> str:
    elapsed = max(time.monotonic() - started, 1e-6)
    rate = done / elapsed
    eta = (total - done) / rate if rate and total > done else 0.0
    width = 30
    filled = int(width * done / total) if total else width
    bar = "#" * filled + "-" * (width - filled)
    return f"\r{label} [{bar}] {done}/{total}  {rate:6.1f}/s  ETA {eta:5.0f}s"


def _walk(paths: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        else:
            files.append(path)
    return files


@cli.group()
def enqueue() -> None:
    """Queue work as a producer would."""


@enqueue.command("upload")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--user", "user_id", required=True, help="The owner of the items.")
@click.option("--wait", is_flag=True, help="Show progress until done, then a summary.")
@click.option("--timeout", default=3600.0, show_default=True)
def enqueue_upload_cmd(paths: tuple[Path, ...], user_id: str, wait: bool, timeout: float) -> None:
    """Queue files (directories are walked) that already lie under UPLOAD_ROOT."""
    from worker import client

    item_ids: list[int] = []
    for path in _walk([p.absolute() for p in paths]):
        try:
            item_ids.append(client.enqueue_upload(user_id, path))
        except WorkerError as exc:
            click.echo(f"skipped {path}: {exc}", err=True)
    click.echo(f"queued {len(item_ids)} item(s): {', '.join(map(str, item_ids))}")
    if not wait or not item_ids:
        return
    started = time.monotonic()
    deadline = started + timeout
    while True:
        counts = client.wait_for_items(user_id, item_ids, timeout=0)
        pending = counts.get("queued", 0) + counts.get("processing", 0)
        done = len(item_ids) - pending
        click.echo(_progress_line(done, len(item_ids), started, "items"), nl=False)
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    click.echo()
    rows = [client.item_status(user_id, i) or {"id": i} for i in item_ids]
    click.echo(_table(rows, ["id", "status", "title", "chunks", "analysis_version", "error"]))


@cli.group("import")
def import_group() -> None:
    """Bookmark imports."""


@import_group.command("bookmarks")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--user", "user_id", required=True)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default=None,
    help="The export's format, when detection from the content should not decide.",
)
@click.option("--wait", is_flag=True, help="Show progress (rate, ETA) and a summary.")
@click.option("--timeout", default=24 * 3600.0, show_default=True)
def import_bookmarks_cmd(
    file: Path, user_id: str, fmt: str | None, wait: bool, timeout: float
) -> None:
    """Import a bookmark export: browser HTML, Pinboard, Pocket, Instapaper, Raindrop,
    Readwise, Omnivore, wallabag, Linkwarden, Karakeep, OneTab, a list of URLs, or CSV."""
    from worker import client

    job_id = client.import_bookmarks(user_id, file.absolute(), fmt=fmt)
    click.echo(f"import job {job_id} queued")
    if wait:
        _wait_import(user_id, job_id, timeout)


def _import_control(action: str, job_id: int, user_id: str | None, keep: bool = False) -> None:
    from worker.bookmarks import control
    from worker.db.engine import get_engine

    engine = get_engine()
    if action == "pause":
        result = control.pause(engine, job_id, user_id=user_id)
    elif action == "resume":
        result = control.resume(engine, get_settings(), job_id, user_id=user_id)
    else:
        result = control.cancel(engine, job_id, user_id=user_id, keep=keep)
    click.echo(f"import job {job_id}: {result.message}")
    if not result.ok:
        sys.exit(1)


@import_group.command("pause")
@click.argument("job_id", type=int)
@click.option("--user", "user_id", default=None, help="Refuse unless the job is this user's.")
def import_pause_cmd(job_id: int, user_id: str | None) -> None:
    """Hold an import's unfinished batches in the database (nothing staged is lost)."""
    _import_control("pause", job_id, user_id)


@import_group.command("resume")
@click.argument("job_id", type=int)
@click.option("--user", "user_id", default=None, help="Refuse unless the job is this user's.")
def import_resume_cmd(job_id: int, user_id: str | None) -> None:
    """Continue a paused import where it stopped."""
    _import_control("resume", job_id, user_id)


@import_group.command("cancel")
@click.argument("job_id", type=int)
@click.option("--user", "user_id", default=None, help="Refuse unless the job is this user's.")
@click.option("--keep", is_flag=True, help="Keep the bookmarks already embedded.")
def import_cancel_cmd(job_id: int, user_id: str | None, keep: bool) -> None:
    """Stop an import and remove the bookmarks it created (--keep: only the unfinished)."""
    _import_control("cancel", job_id, user_id, keep=keep)


def progress_line(p: Any) -> str:
    """One redrawn line of an import's progress: status, bar, counts, recent rate, ETA (or
    why it is not moving)."""
    rate = f"{p.rate_per_s:7.1f}/s" if p.rate_per_s else "      -/s"
    eta = f"ETA {_duration(p.eta_s):>6}" if p.eta_s is not None else "ETA      -"
    bar_total = max(p.total, 1)
    filled = int(30 * min(p.processed, bar_total) / bar_total)
    line = (
        f"{p.status:<10} [{'#' * filled}{'-' * (30 - filled)}] {p.processed}/{p.total} {rate} {eta}"
    )
    notes = [p.note] if p.note else []
    if getattr(p, "searchable_at", None) is not None and not p.finished:
        notes.append("searchable: first pass done")
    return f"{line}  ({'; '.join(notes)})" if notes else line


def _duration(seconds: float) -> str:
    whole = round(seconds)
    if whole < 120:
        return f"{whole}s"
    if whole < 7200:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def _wait_import(user_id: str, job_id: int, timeout: float) -> None:
    from worker import client

    deadline = time.monotonic() + timeout
    while True:
        p = client.import_status(user_id, job_id)
        if p is None:
            raise click.ClickException(f"no import job {job_id} for user {user_id}")
        # Padded: a shorter line (the note gone) must overwrite the longer one before it.
        click.echo(f"\r{progress_line(p):<100}", nl=False)
        if p.finished or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    click.echo()
    summary = {
        "status": p.status,
        "format": p.source_format,
        "entries": p.total,
        "created": p.created,
        "duplicates": p.duplicates,
        "skipped": p.skipped,
        "failed": p.failed,
    }
    click.echo(_table([summary]))
    if p.skipped_reasons:
        click.echo(
            "skipped by reason: " + ", ".join(f"{k}={v}" for k, v in p.skipped_reasons.items())
        )
    if p.error:
        click.echo(f"error: {p.error}")


@cli.command("status")
@click.option("--user", "user_id", default=None, help="Needed with --item / --job.")
@click.option("--item", "item_id", type=int, default=None)
@click.option("--job", "job_id", type=int, default=None)
@click.option(
    "--watch",
    "watch",
    type=float,
    is_flag=False,
    flag_value=2.0,
    default=None,
    metavar="[SECONDS]",
    help="Redraw the summary every SECONDS (default 2) until Ctrl-C.",
)
def status_cmd(
    user_id: str | None, item_id: int | None, job_id: int | None, watch: float | None
) -> None:
    """One item's or import's status (with --user), else a summary of workers, queues,
    items, imports, failures and upkeep."""
    from worker import client

    if item_id is not None or job_id is not None:
        if not user_id:
            raise click.UsageError("--user is required with --item or --job")
        if item_id is not None:
            st = client.item_status(user_id, item_id)
            if st is None:
                raise click.ClickException(f"no item {item_id} for user {user_id}")
            _echo_json(st)
        if job_id is not None:
            p = client.import_status(user_id, job_id)
            if p is None:
                raise click.ClickException(f"no import job {job_id} for user {user_id}")
            _echo_json(p.__dict__)
        return
    from worker.status import overview

    if watch is not None:
        from worker.ops_commands import redraw_every

        redraw_every(overview, max(watch, 0.5))
        return
    click.echo(overview())


@cli.command("search")
@click.argument("query")
@click.option("--user", "user_id", required=True)
@click.option("--mode", type=click.Choice(["hybrid", "semantic", "text"]), default="hybrid")
@click.option("--limit", default=10, show_default=True)
def search_cmd(query: str, user_id: str, mode: str, limit: int) -> None:
    """Search one user's items."""
    from worker import search
    from worker.db.engine import session_scope

    with session_scope() as session:
        hits = search.search(session, user_id, query, mode=cast(Mode, mode), limit=limit)
    rows = [
        {
            "rank": rank,
            "score": f"{hit.score:.3f}",
            "kind": hit.kind,
            "title": hit.title,
            "where": hit.url or "",
            "snippet": (hit.snippet or "").replace("\n", " ")[:80],
        }
        for rank, hit in enumerate(hits, 1)
    ]
    click.echo(_table(rows))


# --- demo ----------------------------------------------------------------------------------


@cli.command("demo")
def demo_cmd() -> None:
    """The main job on the embedded default: services up, migrations, a real worker
    answering; then a sample upload and bookmark import processed and searched."""
    from worker.demo import run_demo

    _settings_env()
    run_demo(click.echo)


def _attach_subcommands() -> None:
    from worker import ops_commands
    from worker.maintenance.commands import maintenance
    from worker.model_commands import models

    cli.add_command(maintenance)
    cli.add_command(models)
    ops_commands.register(cli)


_attach_subcommands()


def main(argv: Sequence[str] | None = None) -> int:
    # platformdirs (under Celery) warns on every start when XDG_RUNTIME_DIR is unset, as it
    # is for root shells and services; nothing here uses that directory.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
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
