"""Operations: JSON logs with context, Prometheus metrics across processes, the status view,
`worker failures` and `worker retry`, through a real worker of this module's own.

The worker here logs JSON and writes metrics to a temporary directory, so it cannot be the
session's worker: it consumes queues with names of its own, and this module points the
client at them (restored afterwards), so the session worker, if another module started it,
never takes these tasks.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from worker import client
from worker.app import TASK_EMBED_BOOKMARKS, TASK_IMPORT_BOOKMARKS, app, configure
from worker.cli import cli
from worker.config import get_settings, load_settings
from worker.failures import hint_for, list_failures, parse_since, retry_item, retry_job
from worker.logs import Stopwatch, configure_logging, log_context
from worker.metrics import maintenance_status, recalls
from worker.ops_commands import CLEAR, redraw_every
from worker.subprocess_worker import WorkerProcess

ROOT = Path(__file__).resolve().parents[1]
PROSE = (
    "The lighthouse keeper wrote down the weather every morning. Storms came from the west "
    "in autumn, and the fishing boats stayed in the harbour for days.\n\n"
    "In spring the keeper painted the tower white again and counted the seabirds nesting "
    "on the cliffs below."
)
STAGES = {"load", "parse", "chunk", "embed", "analyse", "write"}


# --- pure functions --------------------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_secrets_never_reach_a_log_line(fmt: str, restore_logging: None) -> None:
    settings = load_settings(
        log_format=fmt,
        database_url="postgresql://app:db-pass-1234@db.internal:5432/worker",
        openai_api_key="sk-live-abcdefghijklmnop",
    )
    out = io.StringIO()
    configure_logging(settings, stream=out)
    log = logging.getLogger("test.redact")
    log.warning("connecting to postgresql://app:db-pass-1234@db.internal:5432/worker")
    log.warning("calling the API with api_key=sk-live-abcdefghijklmnop, Bearer tok.en-123")
    log.warning("password alone: %s", "db-pass-1234")
    try:
        raise ConnectionError("redis://:redis-pass-99@cache:6379/0 refused; apikey: xyz12345")
    except ConnectionError:
        log.exception("broker gone")
    written = out.getvalue()
    for secret in ("db-pass-1234", "sk-live-abcdefghijklmnop", "redis-pass-99", "xyz12345"):
        assert secret not in written, (secret, written)
    assert "tok.en-123" not in written
    assert "postgresql://app:***@db.internal:5432/worker" in written
    assert "broker gone" in written


def test_text_lines_show_durations_counts_and_context(restore_logging: None) -> None:
    out = io.StringIO()
    configure_logging(load_settings(log_format="text"), stream=out)
    log = logging.getLogger("test.text")
    watch = Stopwatch()
    with log_context(user_id="u1", item_id=7, task_id="t-1"):
        with watch.stage("parse"):
            log.info("parsing")
        log.info(
            "item 7 done",
            extra={"outcome": "done", "durations_ms": watch.ms, "counts": {"chunks": 3}},
        )
    first, second = out.getvalue().splitlines()
    assert "stage=parse" in first and "user_id=u1 item_id=7 task_id=t-1" in first
    assert "item 7 done | parse " in second and "(total " in second and "chunks=3" in second


def test_stopwatch_names_the_stage_that_failed() -> None:
    watch = Stopwatch()
    with watch.stage("load"):
        pass
    with pytest.raises(ValueError), watch.stage("parse"):
        raise ValueError("bad")
    assert watch.failed_stage == "parse" and set(watch.ms) == {"load", "parse"}


@pytest.mark.parametrize(
    ("error", "cause"),
    [
        ("/up/a.bin: the content is binary, not text; upload one of: text/plain", "bad file"),
        ("timed out after 600s (TASK_SOFT_TIME_LIMIT); split the file", "timeout"),
        ("gave up after 8 retries: OperationalError: connection refused", "transient"),
        ("gave up after 5 attempts (the worker died or timed out each time)", "crashed"),
        ("/up/timed out/a.txt: file not found; it was deleted or moved", "missing"),
        ("this is not a bookmark export we recognise; we take …", "format"),
        ("something nobody foresaw", "other"),
    ],
)
def test_hint_follows_the_kind_of_error(error: str, cause: str) -> None:
    assert hint_for(error)[0] == cause


def test_parse_since() -> None:
    assert parse_since("90s").total_seconds() == 90
    assert parse_since("1h").total_seconds() == 3600
    assert parse_since("2d").total_seconds() == 2 * 86400
    with pytest.raises(ValueError):
        parse_since("yesterday")


def test_maintenance_status_and_recall_from_results() -> None:
    assert maintenance_status({"skipped": True}) == "skipped"
    assert maintenance_status({"dry_run": True}) == "dry_run"
    assert maintenance_status({"models": {"m": {"error": "boom"}}}) == "failed"
    upkeep = {
        "models": {
            "a": {"recall_before": {"recall": 0.9}, "recall_after": {"recall": 0.97}},
            "b": {"recall_before": {"recall": 0.99}},
            "c": {"decision": "ivfflat waits for rows"},
        }
    }
    assert maintenance_status(upkeep) == "done"
    assert recalls(upkeep) == {"a": 0.97, "b": 0.99}


def test_watch_redraws_until_stopped() -> None:
    frames: list[str] = []
    runner = CliRunner()

    def render() -> str:
        frames.append("x")
        return f"frame {len(frames)}"

    with runner.isolation(color=True) as (out, _err, _):
        redraw_every(render, 0.5, frames=2, sleep=lambda _s: None)
        shown = out.getvalue().decode()
    assert shown.count(CLEAR) == 2 and "frame 2" in shown


# --- retry of an import, on database rows --------------------------------------------------


def _insert_job(engine: Any, user_id: str, *, status: str, failed: int, processed: int) -> int:
    with engine.begin() as conn:
        job_id: int = conn.execute(
            text(
                "INSERT INTO import_job (user_id, filename, status, total, processed, "
                "created_count, failed_count, error) VALUES (:u, 'b.html', :st, 3, :p, 3, :f, "
                "CASE WHEN :st = 'failed' THEN 'not a bookmark export we recognise' END) "
                "RETURNING id"
            ),
            {"u": user_id, "st": status, "p": processed, "f": failed},
        ).scalar_one()
    return job_id


def _insert_batch(engine: Any, job_id: int, user_id: str, seq: int, status: str, n: int) -> int:
    with engine.begin() as conn:
        ids = [
            conn.execute(
                text(
                    "INSERT INTO item (user_id, kind, status, attempts, error) "
                    "VALUES (:u, 'bookmark', :st, 2, CASE WHEN :st = 'failed' THEN 'boom' END) "
                    "RETURNING id"
                ),
                {"u": user_id, "st": status},
            ).scalar_one()
            for _ in range(n)
        ]
        batch_id: int = conn.execute(
            text(
                "INSERT INTO import_batch (import_job_id, user_id, seq, item_ids, status, "
                "attempts, error) VALUES (:j, :u, :seq, :ids, :st, 3, "
                "CASE WHEN :st = 'failed' THEN 'timed out (TASK_SOFT_TIME_LIMIT)' END) "
                "RETURNING id"
            ),
            {"j": job_id, "u": user_id, "seq": seq, "ids": ids, "st": status},
        ).scalar_one()
    return batch_id


def test_retry_job_requeues_only_failed_batches(engine: Any, user_id: str) -> None:
    job_id = _insert_job(engine, user_id, status="done", failed=2, processed=3)
    _insert_batch(engine, job_id, user_id, 0, "done", 1)
    failed_batch = _insert_batch(engine, job_id, user_id, 1, "failed", 2)
    listed = [f for f in list_failures(engine, user_id=user_id) if f.kind == "job"]
    assert [(f.id, f.cause) for f in listed] == [(job_id, "timeout")]

    sent: list[tuple[str, list[Any], str]] = []
    settings = get_settings()
    other = retry_job(
        engine, settings, job_id, user_id="someone-else", send=lambda *a: sent.append(a)
    )
    assert not other.ok and not sent  # scoped by user

    result = retry_job(engine, settings, job_id, user_id=user_id, send=lambda *a: sent.append(a))
    assert result.ok, result
    assert sent == [(TASK_EMBED_BOOKMARKS, [failed_batch], settings.queue_ingest)]
    with engine.connect() as conn:
        job = conn.execute(
            text("SELECT status, processed, failed_count FROM import_job WHERE id = :j"),
            {"j": job_id},
        ).one()
        batch = conn.execute(
            text("SELECT status, attempts, item_ids FROM import_batch WHERE id = :b"),
            {"b": failed_batch},
        ).one()
        items = conn.execute(
            text("SELECT DISTINCT status, attempts FROM item WHERE id = ANY(:ids)"),
            {"ids": batch.item_ids},
        ).all()
    assert tuple(job) == ("processing", 1, 0)
    assert (batch.status, batch.attempts) == ("queued", 0)
    assert [tuple(r) for r in items] == [("queued", 0)]


def test_retry_job_that_failed_before_staging_parses_again(engine: Any, user_id: str) -> None:
    job_id = _insert_job(engine, user_id, status="failed", failed=0, processed=0)
    sent: list[tuple[str, list[Any], str]] = []
    settings = get_settings()
    result = retry_job(engine, settings, job_id, user_id=user_id, send=lambda *a: sent.append(a))
    assert result.ok
    assert sent == [(TASK_IMPORT_BOOKMARKS, [job_id], settings.queue_imports)]
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT status, error, attempts FROM import_job WHERE id = :j"), {"j": job_id}
        ).one()
    assert tuple(row) == ("queued", None, 0)
    again = retry_job(engine, settings, job_id, user_id=user_id, send=lambda *a: sent.append(a))
    assert not again.ok and len(sent) == 1  # still queued: nothing to retry


# --- a real worker -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def _reconfigure() -> None:
    """Point this process's Celery app at the current Settings, routes included (Celery
    caches its router and queues at the first send)."""
    get_settings.cache_clear()
    configure(app, get_settings())
    for cached in ("router", "queues"):
        app.amqp.__dict__.pop(cached, None)
    app.amqp.flush_routes()


@dataclass
class OpsWorker:
    process: WorkerProcess
    env: dict[str, str]
    metrics_dir: Path
    port: int


@pytest.fixture(scope="module")
def ops_worker(
    worker_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OpsWorker]:
    suffix = uuid.uuid4().hex[:6]
    queues = {
        "QUEUE_INGEST": f"ops_ingest_{suffix}",
        "QUEUE_IMPORTS": f"ops_imports_{suffix}",
        "QUEUE_MAINTENANCE": f"ops_maintenance_{suffix}",
    }
    metrics_dir = tmp_path_factory.mktemp("metrics")
    port = _free_port()
    env = {
        **worker_env,
        **queues,
        "LOG_FORMAT": "json",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "METRICS_PORT": str(port),
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in queues.items():
            mp.setenv(key, value)
        _reconfigure()  # this process sends to (and pings on) those queues
        worker = WorkerProcess(
            tmp_path_factory.mktemp("ops") / "worker.log",
            env=env,
            queues=",".join(queues.values()),
            name="ops",
        ).start()
        try:
            worker.wait_ready()
            yield OpsWorker(worker, env, metrics_dir, port)
        finally:
            worker.stop()
    _reconfigure()


@dataclass
class Scenario:
    user_id: str
    good: list[int]
    bad: int
    bad_path: Path


@pytest.fixture(scope="module")
def scenario(ops_worker: OpsWorker, service_urls: dict[str, str]) -> Scenario:
    root = Path(service_urls["UPLOAD_ROOT"]) / f"ops-{uuid.uuid4().hex[:6]}"
    root.mkdir()
    user_id = f"ops-{uuid.uuid4().hex[:8]}"
    (root / "keeper.txt").write_text(PROSE, encoding="utf-8")
    (root / "notes.md").write_text("# Notes\n\n" + PROSE.upper(), encoding="utf-8")
    bad_path = root / "blob.txt"
    bad_path.write_bytes(bytes(range(256)) * 16)  # binary: no parser takes it
    good = [client.enqueue_upload(user_id, root / n) for n in ("keeper.txt", "notes.md")]
    bad = client.enqueue_upload(user_id, bad_path)
    counts = client.wait_for_items(user_id, [*good, bad], timeout=300, poll=0.3)
    assert counts == {"done": 2, "failed": 1}, (counts, ops_worker.process.log()[-4000:])
    return Scenario(user_id, good, bad, bad_path)


def _json_lines(log: str) -> list[dict[str, Any]]:
    lines = []
    for line in log.splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))  # every JSON-looking line must parse
    return lines


def test_json_log_lines_carry_context_and_one_summary_per_item(
    ops_worker: OpsWorker, scenario: Scenario
) -> None:
    lines = _json_lines(ops_worker.process.log())
    for item_id in [*scenario.good, scenario.bad]:
        mine = [r for r in lines if r.get("item_id") == item_id]
        assert mine, item_id
        for record in mine:
            assert record["user_id"] == scenario.user_id, record
            assert record.get("task_id") and record.get("stage"), record
        summaries = [r for r in mine if "outcome" in r]
        assert len(summaries) == 1, summaries
        summary = summaries[0]
        if item_id == scenario.bad:
            assert summary["outcome"] == "failed" and summary["stage"] == "parse"
            assert summary["level"] == "WARNING" and "binary" in summary["msg"]
            assert {"load", "parse"} <= set(summary["durations_ms"])
        else:
            assert summary["outcome"] == "done" and summary["stage"] == "finish"
            assert set(summary["durations_ms"]) == STAGES
            assert all(ms >= 0 for ms in summary["durations_ms"].values())


def _scrape_cli(env: dict[str, str]) -> str:
    # A separate process: prometheus-client fixes its storage mode on first import, and this
    # test process must not be switched to files in a temporary directory.
    done = subprocess.run(
        [sys.executable, "-m", "worker", "metrics"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout


def _samples(exposition: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
    }


def _value(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def test_metrics_count_items_by_outcome_across_processes(
    ops_worker: OpsWorker, scenario: Scenario
) -> None:
    samples = _samples(_scrape_cli(ops_worker.env))
    items = "worker_items_processed_total"
    assert _value(samples, items, kind="upload", outcome="done") == 2
    assert _value(samples, items, kind="upload", outcome="failed") == 1
    seconds = "worker_stage_duration_seconds_count"
    assert _value(samples, seconds, kind="upload", stage="parse") == 3
    assert _value(samples, seconds, kind="upload", stage="write") == 2
    assert (_value(samples, "worker_texts_embedded_total", source="upload") or 0) >= 4
    assert _value(samples, "worker_broker_up") == 1
    queue = ops_worker.env["QUEUE_INGEST"]
    assert _value(samples, "worker_queue_depth", queue=queue) == 0
    running = [v for (name, _), v in samples.items() if name == "worker_tasks_in_progress"]
    assert running and sum(running) == 0

    # The worker's main process serves the same figures.
    url = f"http://127.0.0.1:{ops_worker.port}/metrics"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                served = _samples(response.read().decode())
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    assert _value(served, items, kind="upload", outcome="done") == 2
    assert _value(served, items, kind="upload", outcome="failed") == 1


def test_status_and_failures_show_the_reason(ops_worker: OpsWorker, scenario: Scenario) -> None:
    runner = CliRunner()
    status = runner.invoke(cli, ["status"])
    assert status.exit_code == 0, status.output
    assert "workers: " in status.output and "ops-" in status.output
    assert str(scenario.bad) in status.output and "binary" in status.output

    failures = runner.invoke(cli, ["failures", "--user", scenario.user_id, "--since", "1h"])
    assert failures.exit_code == 0, failures.output
    assert f"item {scenario.bad}  user {scenario.user_id}" in failures.output
    assert "the content is binary" in failures.output
    assert "fix or replace the file" in failures.output
    assert f"worker retry item {scenario.bad} --user {scenario.user_id}" in failures.output
    for good in scenario.good:
        assert f"item {good} " not in failures.output

    nobody = runner.invoke(cli, ["failures", "--user", "nobody-at-all"])
    assert "no failures" in nobody.output
    none = runner.invoke(cli, ["retry", "--all-failed", "--user", "nobody-at-all"])
    assert none.exit_code == 0 and "nothing to retry" in none.output
    assert runner.invoke(cli, ["retry"]).exit_code == 2  # neither an id nor --all-failed


def test_retry_brings_the_fixed_item_back(
    ops_worker: OpsWorker, scenario: Scenario, engine: Any
) -> None:
    runner = CliRunner()
    done = runner.invoke(cli, ["retry", "item", str(scenario.good[0]), "--user", scenario.user_id])
    assert done.exit_code == 1 and "not failed (status done)" in done.output
    # Another user's id is refused as if it did not exist.
    foreign = retry_item(engine, get_settings(), scenario.bad, user_id="intruder")
    assert not foreign.ok and "no item" in foreign.message

    scenario.bad_path.write_text(PROSE, encoding="utf-8")  # the user fixed the file
    result = runner.invoke(cli, ["retry", "item", str(scenario.bad), "--user", scenario.user_id])
    assert result.exit_code == 0 and "queued again" in result.output, result.output
    client.wait_for_items(scenario.user_id, [scenario.bad], timeout=240, poll=0.3)
    status = client.item_status(scenario.user_id, scenario.bad)
    assert status is not None
    assert (status["status"], status["error"]) == ("done", None), status
    assert status["chunks"] >= 1
    assert not list_failures(engine, user_id=scenario.user_id)
