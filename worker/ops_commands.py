"""Operator commands: ``worker failures``, ``worker retry``, ``worker metrics``, and the
redraw loop behind ``worker status --watch``. ``register`` attaches them to the main CLI.

worker failures [--since 1h] [--user U] [--limit N] [--json]
worker retry item ID [--user U] | worker retry job ID [--user U]
worker retry --all-failed [--user U] [--since 1h]
worker metrics
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING

import click

from worker.config import get_settings

if TYPE_CHECKING:
    from worker.failures import Failure

CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen: no curses needed


def _since(value: str | None) -> timedelta | None:
    from worker.failures import parse_since

    if value is None:
        return None
    try:
        return parse_since(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None


def describe(f: Failure) -> str:
    """Three lines per failure: what and whose, the full reason, the hint and the command
    (a table would cut the reason, which is the part that says what to do)."""
    when = f"{f.updated_at:%Y-%m-%d %H:%M:%S}"
    retry = f"worker retry {f.kind} {f.id} --user {f.user_id}"
    return (
        f"{f.kind} {f.id}  user {f.user_id}  {f.what}  ({f.status}, {when})\n"
        f"  reason: {f.error}\n"
        f"  hint:   [{f.cause}] {f.hint}: {retry}"
    )


@click.command("failures")
@click.option("--since", default="24h", show_default=True, help="How far back: 30m, 1h, 2d.")
@click.option("--user", "user_id", default=None, help="Only this user's.")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 10000))
@click.option("--json", "as_json", is_flag=True)
def failures_cmd(since: str, user_id: str | None, limit: int, as_json: bool) -> None:
    """Failed uploads and failed or partly failed imports: the reason, and what to do."""
    from worker.db.engine import get_engine
    from worker.failures import list_failures

    found = list_failures(get_engine(), since=_since(since), user_id=user_id, limit=limit)
    if as_json:
        click.echo(json.dumps([f.as_dict() for f in found], indent=2, default=str))
        return
    if not found:
        click.echo(f"no failures in the last {since}")
        return
    for failure in found:
        click.echo(describe(failure))
    click.echo(
        f"\n{len(found)} failure(s); retry them all: worker retry --all-failed --since {since}"
    )


@click.command("retry")
@click.argument("kind", required=False, type=click.Choice(["item", "job"]))
@click.argument("ident", required=False, type=int)
@click.option("--user", "user_id", default=None, help="The owner (checked).")
@click.option("--all-failed", is_flag=True, help="Every failure `worker failures` shows.")
@click.option("--since", default=None, help="With --all-failed: how far back (30m, 1h).")
def retry_cmd(
    kind: str | None, ident: int | None, user_id: str | None, all_failed: bool, since: str | None
) -> None:
    """Queue a failed item or import again (its failed batches only, when it was staged)."""
    from worker.db.engine import get_engine
    from worker.failures import retry_failed, retry_item, retry_job

    settings = get_settings()
    engine = get_engine(settings)
    if all_failed == (kind is not None):
        raise click.UsageError("give either ITEM|JOB ID or --all-failed")
    if all_failed:
        results = retry_failed(engine, settings, user_id=user_id, since=_since(since))
    elif ident is None:
        raise click.UsageError(f"which {kind}? e.g. worker retry {kind} 12 --user U")
    else:
        retry = retry_item if kind == "item" else retry_job
        results = [retry(engine, settings, ident, user_id=user_id)]
    for r in results:
        click.echo(f"{r.kind} {r.id}: {r.message}")
    if not results:
        click.echo("nothing to retry")
    if any(not r.ok for r in results) and not all_failed:
        raise SystemExit(1)


@click.command("metrics")
def metrics_cmd() -> None:
    """Print one Prometheus scrape: every worker process's metrics (merged from
    PROMETHEUS_MULTIPROC_DIR, else DATA_DIR/metrics) and the queue depths."""
    from worker import metrics

    click.echo(metrics.scrape(get_settings()), nl=False)


def redraw_every(
    render: Callable[[], str],
    seconds: float,
    *,
    frames: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Clear the screen and print ``render()`` every ``seconds`` until Ctrl-C (or ``frames``
    redraws, for tests)."""
    drawn = 0
    try:
        while frames is None or drawn < frames:
            screen = render()  # before clearing: a slow query must not leave a blank screen
            stamp = time.strftime("%H:%M:%S")
            click.echo(f"{CLEAR}every {seconds:g}s, {stamp} (Ctrl-C to stop)\n\n{screen}")
            drawn += 1
            if frames is None or drawn < frames:
                sleep(seconds)
    except KeyboardInterrupt:
        click.echo()


def register(cli: click.Group) -> None:
    """Attach ``failures``, ``retry`` and ``metrics`` to the ``worker`` command."""
    for command in (failures_cmd, retry_cmd, metrics_cmd):
        cli.add_command(command)
