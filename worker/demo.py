"""`worker demo`: the main job on the embedded default, end to end, in one command.

Services up → migrations → a real Celery worker process → two sample uploads and a browser
bookmark export processed → a hybrid search over the results → the worker stopped again.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from worker.config import get_settings
from worker.subprocess_worker import WorkerProcess

SAMPLES = Path(__file__).parent / "samples"
DEMO_USER = "demo-user"
QUERIES = ("how do solar panels make electricity", "bread baking with wild yeast")


def copy_samples(upload_root: Path) -> Path:
    demo_dir = upload_root.resolve() / "demo"
    demo_dir.mkdir(parents=True, exist_ok=True)
    for sample in SAMPLES.iterdir():
        shutil.copyfile(sample, demo_dir / sample.name)
    return demo_dir


def seed(user_id: str = DEMO_USER) -> dict[str, object]:
    """A small user's data through the real pipeline, in this process (no broker needed):
    the sample uploads and bookmark export, parsed, analysed, embedded and stored."""
    from sqlalchemy import text

    from worker.bookmarks import importer
    from worker.db import queries
    from worker.db.engine import get_engine, session_scope
    from worker.ingest.process import process_upload

    settings = get_settings()
    engine = get_engine(settings)
    demo_dir = copy_samples(settings.upload_root)
    outcomes = []
    for name in ("river-mill.md", "solar-power.html"):
        path = demo_dir / name
        with session_scope(engine) as s:
            item_id = queries.insert_upload(
                s,
                user_id=user_id,
                file_path=str(path.relative_to(settings.upload_root.resolve())),
                filename=name,
                original_filename=name,
                file_size=path.stat().st_size,
                mime_type=None,
            )
        outcomes.append(process_upload(item_id, trace_id="seed").status)
    with session_scope(engine) as s:
        job_id = queries.insert_import_job(
            s, user_id=user_id, filename="demo/bookmarks.html", file_size=None
        )
    for batch_id in importer.run_import(engine, settings, job_id):
        importer.embed_batch(engine, settings, batch_id)
    with session_scope(engine) as s:
        items = s.execute(
            text("SELECT count(*) FROM item WHERE user_id = :u AND status = 'done'"),
            {"u": user_id},
        ).scalar_one()
    return {"user_id": user_id, "uploads": outcomes, "import_job": job_id, "items_done": items}


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
    proc = WorkerProcess(log_path, name="demo").start()
    try:
        health = proc.wait_ready()
        echo(f"   worker healthy: pid {health['pid']} on {health['hostname']}")
        demo_dir = copy_samples(settings.upload_root)
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
        progress = client.wait_for_import(DEMO_USER, job_id, timeout=300)
        echo(
            f"   bookmarks: {progress.status}, {progress.created} created, "
            f"{progress.duplicates} duplicates, skipped {progress.skipped_reasons or 0}"
        )
        _show_searches(echo)
    finally:
        proc.stop()
    echo("done: the worker was stopped; services keep running (`worker services down`).")


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
