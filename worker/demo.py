"""`worker demo`: the main job on the embedded default, end to end, in one command.

Services up → migrations → a real Celery worker process → two sample uploads and a browser
bookmark export processed → a hybrid search over the results → the worker stopped again.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from worker.config import get_settings

if TYPE_CHECKING:
    from worker.client import ImportProgress

SAMPLES = Path(__file__).parent / "samples"
DEMO_USER = "demo-user"
QUERIES = ("how do solar panels make electricity", "bread baking with wild yeast")


def _start_worker(log_path: Path) -> subprocess.Popen[bytes]:
    settings = get_settings()
    queues = ",".join((settings.queue_ingest, settings.queue_imports, settings.queue_maintenance))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker.app",
            "worker",
            "-Q",
            queues,
            "--concurrency",
            "1",
            "--loglevel",
            "INFO",
            "--without-mingle",
            "--without-gossip",
            "--hostname",
            "demo@%h",
        ],
        stdout=log_path.open("ab"),
        stderr=subprocess.STDOUT,
        env=dict(os.environ),
        start_new_session=True,
    )


def _stop_worker(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _wait_health(proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 120) -> dict:  # type: ignore[type-arg]
    from worker.app import TASK_HEALTH, app

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the worker exited; see {log_path}")
        try:
            answer: dict = app.send_task(TASK_HEALTH).get(timeout=10)  # type: ignore[type-arg]
            return answer
        except Exception:
            continue
    raise RuntimeError(f"no worker answered within {timeout}s; see {log_path}")


def run_demo(echo: Callable[[str], None]) -> None:
    from worker import client, services
    from worker.app import app, configure
    from worker.db import migrate

    settings = get_settings()
    if "127.0.0.1:" + str(settings.pg_port) in settings.database_url:
        echo("1. starting embedded PostgreSQL + pgvector and Redis")
        services.up(settings)
    else:
        echo("1. using DATABASE_URL/REDIS_URL from the environment")
    configure(app, settings)
    echo("2. migrating the database to head")
    migrate.upgrade("head")

    log_path = settings.data_dir / "demo-worker.log"
    echo(f"3. starting a Celery worker (log: {log_path})")
    proc = _start_worker(log_path)
    try:
        health = _wait_health(proc, log_path)
        echo(f"   worker healthy: pid {health['pid']} on {health['hostname']}")
        demo_dir = settings.upload_root.resolve() / "demo"
        demo_dir.mkdir(parents=True, exist_ok=True)
        for sample in SAMPLES.iterdir():
            shutil.copyfile(sample, demo_dir / sample.name)
        echo("4. enqueueing two uploads and a bookmark export")
        item_ids = [
            client.enqueue_upload(DEMO_USER, demo_dir / "river-mill.md"),
            client.enqueue_upload(DEMO_USER, demo_dir / "solar-power.html"),
        ]
        job_id = client.import_bookmarks(DEMO_USER, demo_dir / "bookmarks.html")
        counts = client.wait_for_items(DEMO_USER, item_ids, timeout=300)
        echo(f"   uploads: {counts}")
        for item_id in item_ids:
            st = client.item_status(DEMO_USER, item_id) or {}
            echo(
                f"   item {item_id}: {st.get('status')} '{st.get('title')}' "
                f"{st.get('chunks')} chunks, analysis v{st.get('analysis_version')}"
            )
        progress = _wait_import(job_id)
        echo(
            f"   bookmarks: {progress.status}, {progress.created} created, "
            f"{progress.duplicates} duplicates, skipped {progress.skipped_reasons or 0}"
        )
        _show_searches(echo)
    finally:
        _stop_worker(proc)
    echo("done: the worker was stopped; services keep running (`worker services down`).")


def _wait_import(job_id: int, timeout: float = 300) -> ImportProgress:
    from worker import client

    deadline = time.monotonic() + timeout
    while True:
        progress = client.import_status(DEMO_USER, job_id)
        assert progress is not None
        if progress.finished or time.monotonic() > deadline:
            return progress
        time.sleep(0.5)


def _show_searches(echo: Callable[[str], None]) -> None:
    from worker import search
    from worker.db.engine import session_scope

    for query in QUERIES:
        echo(f"5. hybrid search for {query!r}:")
        with session_scope() as session:
            hits = search.search(session, DEMO_USER, query, mode="hybrid", limit=3)
        for rank, hit in enumerate(hits, 1):
            where = hit.url or hit.kind
            echo(f"   {rank}. [{hit.score:.3f}] {hit.title} ({where})")
            echo(f"      {hit.snippet[:110]}")
