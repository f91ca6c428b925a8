"""Prometheus metrics for the worker, in prometheus-client's multiprocess mode.

Prefork children each write their samples to files under ``PROMETHEUS_MULTIPROC_DIR``; the
main process (``METRICS_PORT``) and ``worker metrics`` merge those files at scrape time, so
every child is counted and a replaced child's counts are kept. The directory is set and
emptied by the worker's main process at start, before any child is forked (see
``prepare_multiproc_dir``); queue depths are read from Redis at scrape time.

The pipeline calls the small helpers at the bottom (``item_done``, ``embedded`` …), one line
each. They never raise: a metrics problem must not fail an item. prometheus_client is
imported lazily, because it fixes its storage (memory or files) when it is first imported
and that must happen after the directory is known.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec

from worker.config import Settings

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.core import Metric

log = logging.getLogger(__name__)

ENV = "PROMETHEUS_MULTIPROC_DIR"
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


# --- the multiprocess directory ----------------------------------------------------------------


def multiproc_dir(settings: Settings) -> Path:
    """Where the per-process sample files live: ``PROMETHEUS_MULTIPROC_DIR``, else
    ``DATA_DIR/metrics``."""
    return Path(os.environ.get(ENV) or settings.data_dir / "metrics").absolute()


def prepare_multiproc_dir(settings: Settings) -> Path:
    """In the worker's main process at start: create the directory, delete the files of a
    previous run (their pids are gone; prometheus-client's documented requirement) and
    export it, so the children forked later inherit it. Two workers on one host need
    separate directories, or each start empties the other's."""
    path = multiproc_dir(settings)
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink(missing_ok=True)
    os.environ[ENV] = str(path)
    from prometheus_client import values

    # The storage class is chosen when prometheus_client is first imported; choose again in
    # case something imported it before the directory was set.
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    return path


def process_exited(pid: int) -> None:
    """Drop a finished child's live gauges (its counters stay: they are history)."""
    path = os.environ.get(ENV)
    if not path:
        return
    from prometheus_client import multiprocess

    try:
        multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
    except OSError as exc:
        log.debug("metrics: could not clean up after pid %s: %s", pid, exc)


def _sweep_dead_processes(path: Path) -> None:
    """Children killed outright (hard time limit, OOM) never run their exit hook: drop
    their live gauges at scrape time instead, or the worker looks busy forever."""
    for file in path.glob("gauge_live*_*.db"):
        pid = file.stem.rsplit("_", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            process_exited(int(pid))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


# --- the metrics -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Metrics:
    items: Counter
    stage_seconds: Histogram
    embed_batch: Histogram
    texts: Counter
    bookmarks: Counter
    retries: Counter
    requeued: Counter
    maintenance: Counter
    recall: Gauge
    in_progress: Gauge


@functools.cache
def _metrics() -> _Metrics:
    """Created on first use (in the process that records), never at import."""
    from prometheus_client import Counter, Gauge, Histogram

    # registry=None: in multiprocess mode the files are the registry; nothing is served from
    # a process's own memory.
    return _Metrics(
        items=Counter(
            "worker_items_processed",
            "Items that finished a processing attempt, by kind and outcome.",
            ["kind", "outcome"],
            registry=None,
        ),
        stage_seconds=Histogram(
            "worker_stage_duration_seconds",
            "Time spent in each pipeline stage.",
            ["kind", "stage"],
            buckets=STAGE_BUCKETS,
            registry=None,
        ),
        embed_batch=Histogram(
            "worker_embedding_batch_size",
            "Texts per embedding call (per item and model for uploads, per bookmark batch).",
            ["source"],
            buckets=BATCH_BUCKETS,
            registry=None,
        ),
        texts=Counter(
            "worker_texts_embedded",
            "Texts embedded (rate() gives texts/s).",
            ["source"],
            registry=None,
        ),
        bookmarks=Counter(
            "worker_bookmarks_processed",
            "Bookmarks of imports processed, by outcome (created ones count when embedded).",
            ["outcome"],
            registry=None,
        ),
        retries=Counter(
            "worker_task_retries", "Transient failures retried, by task.", ["task"], registry=None
        ),
        requeued=Counter(
            "worker_requeued",
            "Stuck rows resent by the requeue task, by kind.",
            ["kind"],
            registry=None,
        ),
        maintenance=Counter(
            "worker_maintenance_runs",
            "Maintenance runs, by kind and status.",
            ["kind", "status"],
            registry=None,
        ),
        recall=Gauge(
            "worker_index_recall",
            "Recall@10 of the model's vector index at its last measurement.",
            ["model"],
            multiprocess_mode="mostrecent",
            registry=None,
        ),
        in_progress=Gauge(
            "worker_tasks_in_progress",
            "Tasks running now, by task.",
            ["task"],
            multiprocess_mode="livesum",
            registry=None,
        ),
    )


P = ParamSpec("P")


def _never_raises(fn: Callable[P, None]) -> Callable[P, None]:
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except Exception:
            log.warning("metrics: %s failed", fn.__name__, exc_info=True)

    return wrapper


# --- what the pipeline calls -------------------------------------------------------------------


@_never_raises
def item_done(kind: str, outcome: str, durations_ms: Mapping[str, float]) -> None:
    """One item (or bookmark batch, or import job) finished an attempt."""
    m = _metrics()
    m.items.labels(kind, outcome).inc()
    for stage, ms in durations_ms.items():
        m.stage_seconds.labels(kind, stage).observe(ms / 1000)


@_never_raises
def embedded(texts: int, *, source: str) -> None:
    """One embedding call of ``texts`` texts."""
    if texts <= 0:
        return
    m = _metrics()
    m.embed_batch.labels(source).observe(texts)
    m.texts.labels(source).inc(texts)


@_never_raises
def bookmarks(counts: Mapping[str, int]) -> None:
    """Import progress: bookmarks processed, by outcome (duplicate, skipped, embedded,
    failed); their sum moves with ``import_job.processed``."""
    m = _metrics()
    for outcome, n in counts.items():
        if n:
            m.bookmarks.labels(outcome).inc(n)


@_never_raises
def task_retried(task: str) -> None:
    _metrics().retries.labels(task).inc()


@_never_raises
def requeued(result: Mapping[str, Any]) -> None:
    """From the requeue task's result: rows resent per kind (uploads, batches, jobs)."""
    m = _metrics()
    for kind, counts in result.items():
        if isinstance(counts, Mapping) and counts.get("resent"):
            m.requeued.labels(kind).inc(int(counts["resent"]))


def maintenance_status(result: Mapping[str, Any]) -> str:
    """skipped (another run held the lock), dry_run, failed (an error recorded, for the run
    or one of its models), else done."""
    if result.get("skipped"):
        return "skipped"
    models = result.get("models")
    model_errors = isinstance(models, Mapping) and any(
        isinstance(r, Mapping) and r.get("error") for r in models.values()
    )
    if result.get("error") or model_errors:
        return "failed"
    return "dry_run" if result.get("dry_run") else "done"


def recalls(result: Mapping[str, Any]) -> dict[str, float]:
    """Measured recall per model from an index upkeep result (after a change, else before)."""
    out: dict[str, float] = {}
    models = result.get("models")
    if not isinstance(models, Mapping):
        return out
    for model, r in models.items():
        if not isinstance(r, Mapping):
            continue
        for key in ("recall_after", "recall_before"):
            measured = r.get(key)
            if isinstance(measured, Mapping) and measured.get("recall") is not None:
                out[str(model)] = float(measured["recall"])
                break
    return out


@_never_raises
def maintenance_done(kind: str, result: Mapping[str, Any] | None) -> None:
    """One maintenance run; ``result`` None when it raised."""
    m = _metrics()
    m.maintenance.labels(kind, "failed" if result is None else maintenance_status(result)).inc()
    for model, recall in recalls(result or {}).items():
        m.recall.labels(model).set(recall)


@_never_raises
def task_started(task: str) -> None:
    _metrics().in_progress.labels(task).inc()


@_never_raises
def task_finished(task: str) -> None:
    _metrics().in_progress.labels(task).dec()


# --- scraping ------------------------------------------------------------------------------------


class QueueDepthCollector:
    """Messages waiting per queue, read from Redis (LLEN) when scraped: the one figure no
    worker process records, since the messages are not in any of them yet."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        from worker.status import queue_depths

        depths = queue_depths(self.settings)
        up = GaugeMetricFamily("worker_broker_up", "1 when Redis answered the queue scrape.")
        up.add_metric([], 0 if "error" in depths else 1)
        yield up
        gauge = GaugeMetricFamily(
            "worker_queue_depth", "Messages waiting in each Celery queue.", labels=["queue"]
        )
        for queue, n in depths.items():
            if isinstance(n, int):
                gauge.add_metric([queue], n)
        yield gauge

    def describe(self) -> Iterable[Metric]:
        return []  # no names to reserve: collected fresh at every scrape


class _SweepingCollector:
    """prometheus-client's merge of the per-process files, after dropping the live gauges
    of children that died without saying so."""

    def __init__(self, path: Path) -> None:
        from prometheus_client.multiprocess import MultiProcessCollector

        self.path = path
        self.inner = MultiProcessCollector(None, path=str(path))  # type: ignore[no-untyped-call]

    def collect(self) -> Iterable[Metric]:
        _sweep_dead_processes(self.path)
        merged: Iterable[Metric] = self.inner.collect()  # type: ignore[no-untyped-call]
        return merged


def registry(settings: Settings) -> CollectorRegistry:
    """Everything a scrape shows: the merged files of every worker process (when the
    directory exists) and the queue depths."""
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry()
    path = multiproc_dir(settings)
    if path.is_dir():
        reg.register(_SweepingCollector(path))
    reg.register(QueueDepthCollector(settings))
    return reg


def scrape(settings: Settings) -> str:
    """The Prometheus text exposition, as ``/metrics`` would serve it."""
    from prometheus_client import generate_latest

    return generate_latest(registry(settings)).decode()


def serve(settings: Settings) -> bool:
    """Serve /metrics on ``METRICS_PORT`` from this (the main) process; False when off or
    the port is taken (logged: the worker goes on without it)."""
    if settings.metrics_port <= 0:
        return False
    from prometheus_client import start_http_server

    try:
        start_http_server(settings.metrics_port, registry=registry(settings))
    except OSError as exc:
        log.error("metrics: cannot listen on port %s: %s", settings.metrics_port, exc)
        return False
    log.info("metrics: serving /metrics on port %s", settings.metrics_port)
    return True
