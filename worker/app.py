"""The Celery app: queues, routes, reliability options (DESIGN §4), beat schedule, signals.

Producers import this module through ``worker.client`` to send tasks by name, so it must
stay light: no torch, no task modules at import time (``include`` loads them in workers).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from celery import Celery, signals
from kombu.entity import Queue

from worker.config import Settings, get_settings

TASK_HEALTH = "worker.health"
TASK_PROCESS_UPLOAD = "worker.process_upload"
TASK_IMPORT_BOOKMARKS = "worker.import_bookmarks"
TASK_EMBED_BOOKMARKS = "worker.embed_bookmark_batch"
TASK_DISPATCH_BULK = "worker.dispatch_bulk"
TASK_MAINT_INDEXES = "worker.maintenance.indexes"
TASK_INDEX_SEGMENT = "worker.maintenance.index_segment"
TASK_MAINT_VACUUM = "worker.maintenance.vacuum"
TASK_MAINT_REQUEUE = "worker.maintenance.requeue"
TASK_MAINT_PURGE = "worker.maintenance.purge"
TASK_MAINT_STATS = "worker.maintenance.stats"
# Backoff from 10 ms doubling up to 10 s (full jitter): 20 tries ride out a minute or more
# without Redis.
RESULT_BACKEND_RETRIES = 20


def routes(settings: Settings) -> dict[str, dict[str, str]]:
    return {
        TASK_HEALTH: {"queue": settings.queue_ingest},
        TASK_PROCESS_UPLOAD: {"queue": settings.queue_ingest},
        TASK_EMBED_BOOKMARKS: {"queue": settings.queue_ingest},  # bulk ones: queue_bulk
        # The tick is a few milliseconds: on ingest, it never waits behind a long reindex.
        TASK_DISPATCH_BULK: {"queue": settings.queue_ingest},
        "worker.backfill_*": {"queue": settings.queue_ingest},  # worker.backfill: batches
        TASK_IMPORT_BOOKMARKS: {"queue": settings.queue_imports},
        "worker.maintenance.*": {"queue": settings.queue_maintenance},
    }


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Each upkeep task at its configured interval; an interval of 0 switches it off."""
    entries = {
        "requeue-stuck": (TASK_MAINT_REQUEUE, settings.beat_requeue_interval),
        "index-upkeep": (TASK_MAINT_INDEXES, settings.beat_index_interval),
        "vacuum-analyze": (TASK_MAINT_VACUUM, settings.beat_vacuum_interval),
        "stats-snapshot": (TASK_MAINT_STATS, settings.beat_stats_interval),
        "purge-deleted": (TASK_MAINT_PURGE, settings.beat_purge_interval),
        "bulk-dispatch": (TASK_DISPATCH_BULK, settings.beat_dispatch_interval),
    }
    queues = routes(settings)
    return {
        name: {
            "task": task,
            "schedule": timedelta(seconds=seconds),
            # A beat that was down must not fire a backlog of copies when it comes back.
            "options": {
                "queue": queues.get(task, {}).get("queue", settings.queue_maintenance),
                "expires": max(seconds, 30),
            },
        }
        for name, (task, seconds) in entries.items()
        if seconds > 0
    }


def consumed_queues(settings: Settings) -> list[str]:
    """The queues a worker consumes, in the order it polls them (queue_order_strategy
    'priority'): interactive work first, bulk import batches last."""
    return [
        settings.queue_ingest,
        settings.queue_imports,
        settings.queue_maintenance,
        settings.queue_bulk,
    ]


def configure(app: Celery, settings: Settings) -> None:
    """Apply Settings to ``app`` (again, when a test or the CLI changed the environment
    before anything was sent)."""
    transport = {"visibility_timeout": settings.visibility_timeout}
    # Poll the queues in the order the worker lists them (consumed_queues), not in turn: a
    # free process takes interactive work before a bulk batch (worker.bookmarks.dispatch).
    broker_transport = {**transport, "queue_order_strategy": "priority"}
    app.conf.update(
        broker_url=settings.celery_broker_url,
        result_backend=settings.celery_result_backend,
        # JSON only: a pickle payload from the broker would be code execution.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # A task is acknowledged when it ends, so a killed worker's task is delivered again.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=broker_transport,
        result_backend_transport_options=transport,
        task_soft_time_limit=settings.task_soft_time_limit,
        task_time_limit=settings.task_time_limit,
        task_queues=[
            Queue(settings.queue_ingest),
            Queue(settings.queue_imports),
            Queue(settings.queue_maintenance),
            Queue(settings.queue_bulk),
        ],
        task_default_queue=settings.queue_ingest,
        task_routes=routes(settings),
        task_track_started=True,
        task_send_sent_event=True,
        worker_send_task_events=True,  # Flower and `celery events` see the tasks
        result_expires=timedelta(days=1),
        worker_max_memory_per_child=settings.worker_max_memory_per_child or None,
        worker_concurrency=settings.worker_concurrency,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # wait for Redis forever, logging each try
        # Redis gone for a moment must not fail a task: storing its state (STARTED, the
        # result) retries with backoff instead of raising, which would fail the task before
        # it ran and acknowledge its message.
        result_backend_always_retry=True,
        result_backend_max_retries=RESULT_BACKEND_RETRIES,
        # On a lost broker connection, tasks already running finish their work (their one
        # transaction is what counts); their acknowledgement is lost with the connection, so
        # the message comes back after the visibility timeout and finds the row done.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        beat_schedule=beat_schedule(settings),
        timezone="UTC",
    )


def create_app(settings: Settings | None = None) -> Celery:
    app = Celery("worker", include=["worker.tasks"])
    configure(app, settings or get_settings())
    return app


app = create_app()


@signals.setup_logging.connect
def _setup_logging(**_: Any) -> None:
    from worker.logs import configure_logging

    configure_logging(get_settings())


@signals.worker_init.connect
def _worker_init(sender: Any = None, **_: Any) -> None:
    """In the main process, before the pool forks and before the consumer connects: wait
    until PostgreSQL and Redis answer (logging each try), and remember the pool's real size."""
    from worker.logs import configure_logging
    from worker.runtime import record_pool_size
    from worker.startup import ServicesUnavailable, wait_for_services

    settings = get_settings()
    # Celery sets up logging only after this signal; the waiting lines need it now.
    configure_logging(settings)
    try:
        wait_for_services(settings)
    except ServicesUnavailable as exc:
        # Celery logs and swallows a signal handler's exception; a worker that cannot reach
        # its services must stop instead (its supervisor decides what next).
        logging.getLogger(__name__).critical("%s", exc)
        raise SystemExit(1) from exc
    concurrency = getattr(sender, "concurrency", None)
    if concurrency:
        record_pool_size(concurrency)


@signals.worker_process_init.connect
def _process_init(**_: Any) -> None:
    """In each forked child: new database pool (never share sockets across fork) and the
    torch thread count from this process's share of the cores."""
    from worker.db.engine import dispose_engines
    from worker.runtime import configure_process

    dispose_engines()
    configure_process(get_settings())


# --- metrics (worker/metrics.py) -----------------------------------------------------------
# The main process prepares the multiprocess directory before any child is forked, and
# serves /metrics once the pool is up: started earlier, the children forked at pool start
# would inherit the listening socket.


@signals.celeryd_init.connect
def _metrics_dir(**_: Any) -> None:
    from worker import metrics

    metrics.prepare_multiproc_dir(get_settings())


@signals.worker_ready.connect
def _metrics_server(**_: Any) -> None:
    from worker import metrics

    metrics.serve(get_settings())


@signals.worker_process_shutdown.connect
def _metrics_child_exit(pid: int | None = None, **_: Any) -> None:
    from worker import metrics

    if pid is not None:
        metrics.process_exited(pid)


@signals.task_prerun.connect
def _metrics_task_start(task: Any = None, **_: Any) -> None:
    from worker import metrics

    metrics.task_started(getattr(task, "name", "unknown"))


@signals.task_postrun.connect
def _metrics_task_end(task: Any = None, **_: Any) -> None:
    from worker import metrics
    from worker.runtime import trim_memory

    metrics.task_finished(getattr(task, "name", "unknown"))
    trim_memory(get_settings())
