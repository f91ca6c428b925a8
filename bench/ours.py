"""Our end-to-end path for ``bench.peers``: enqueue through ``worker.client`` → a real Celery
worker (``WorkerProcess``) on the real Redis → every row committed, timed from the first
enqueue to the last item done. Then the same input again, unchanged (the re-upload /
re-import cost), and the resident memory of the worker's processes after warm-up, at the
peak of the run and after it.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.corpus import Corpus
from bench.import_bookmarks import generate_export


@dataclass
class ProcessMemory:
    pid: int
    role: str  # "main" (the celery parent) or "child" (a pool process: it holds the model)
    rss_mib: float


def worker_memory(pid: int) -> list[ProcessMemory]:
    """RSS of a worker's process tree: its main process and every pool child."""
    import psutil

    try:
        main = psutil.Process(pid)
        procs = [(main, "main")] + [(c, "child") for c in main.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    out = []
    for proc, role in procs:
        try:
            out.append(ProcessMemory(proc.pid, role, proc.memory_info().rss / 2**20))
        except psutil.NoSuchProcess:
            continue
    return out


class PeakMemory:
    """Samples a process tree's RSS in a background thread; ``peak`` is the largest value
    seen per process."""

    def __init__(self, pid: int, every: float = 0.25) -> None:
        self.pid = pid
        self.every = every
        self.peak: dict[int, ProcessMemory] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for m in worker_memory(self.pid):
                if m.pid not in self.peak or m.rss_mib > self.peak[m.pid].rss_mib:
                    self.peak[m.pid] = m
            self._stop.wait(self.every)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class WorkerRun:
    kind: str  # uploads | bookmarks
    label: str
    concurrency: int
    batch_size: int
    analysis: str
    texts: int  # what the ceiling encodes for this corpus
    max_batch_tokens: int | None = None  # EMBED_MAX_BATCH_TOKENS; None: the setting's default
    seconds: float = 0.0
    rerun_seconds: float = 0.0
    outcome: dict[str, Any] = field(default_factory=dict)
    rerun_outcome: dict[str, Any] = field(default_factory=dict)
    memory_warm: list[ProcessMemory] = field(default_factory=list)
    memory_peak: list[ProcessMemory] = field(default_factory=list)
    memory_after: list[ProcessMemory] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _worker_env(run: WorkerRun, corpus: Corpus) -> dict[str, str]:
    env = dict(os.environ)
    # Each pool child sets its own threads (cores / concurrency) before importing torch.
    env.pop("OMP_NUM_THREADS", None)
    env.update(
        ANALYSIS_PROVIDER=run.analysis,
        WORKER_CONCURRENCY=str(run.concurrency),
        EMBED_BATCH_SIZE=str(run.batch_size),
        **({"EMBED_MAX_BATCH_TOKENS": str(run.max_batch_tokens)} if run.max_batch_tokens else {}),
        UPLOAD_ROOT=str(corpus.upload_root),
        LOG_LEVEL="WARNING",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    return env


def measure(run: WorkerRun, corpus: Corpus, workdir: Path, db_name: str) -> WorkerRun:
    """One configuration in its own fresh database and its own worker."""
    from bench._db import drop_database, fresh_database, use_upload_root
    from worker.subprocess_worker import WorkerProcess

    fresh_database(db_name)
    use_upload_root(corpus.upload_root)
    worker = WorkerProcess(
        workdir / f"worker-{run.label}.log",
        env=_worker_env(run, corpus),
        concurrency=run.concurrency,
        name="bench",
    ).start()
    try:
        worker.wait_ready()
        assert worker.proc is not None
        pid = worker.proc.pid
        _warm_up(run.kind, corpus)
        run.memory_warm = worker_memory(pid)
        with PeakMemory(pid) as peak:
            if run.kind == "uploads":
                run.seconds, run.outcome = _uploads(corpus, "bench-run")
                run.rerun_seconds, run.rerun_outcome = _uploads(corpus, "bench-run")
            else:
                run.seconds, run.outcome = _bookmarks(corpus, "bench-run")
                run.rerun_seconds, run.rerun_outcome = _bookmarks(corpus, "bench-run")
        run.memory_peak = list(peak.peak.values())
        run.memory_after = worker_memory(pid)
    finally:
        worker.stop()
        drop_database(db_name)
    return run


def _warm_up(kind: str, corpus: Corpus) -> None:
    """Load the model in every pool child outside the timing: one small job per process."""
    from worker import client

    if kind == "uploads":
        ids = [client.enqueue_upload("bench-warm", p) for p in corpus.upload_paths[:4]]
        counts = client.wait_for_items("bench-warm", ids, timeout=600, poll=0.1)
        if set(counts) != {"done"}:
            raise RuntimeError(f"warm-up uploads did not finish: {counts}")
    else:
        # A bulk import of several batches, so that with two pool processes both have
        # loaded the model before the timing starts. Bulk, not a small (interactive) one:
        # that would leave the "people are active" marker, and for BULK_RESERVE_SECONDS the
        # measured import would run with a process held back for nobody.
        from worker.config import get_settings

        settings = get_settings()
        size = max(settings.bulk_import_threshold, 4 * settings.bulk_batch_size) + 100
        warm = corpus.upload_root / "warm.html"
        warm.write_bytes(generate_export(size, seed=1))
        job = client.import_bookmarks("bench-warm", warm)
        progress = client.wait_for_import("bench-warm", job, timeout=600, poll=0.1)
        if progress.status != "done":
            raise RuntimeError(f"warm-up import ended {progress.status}")


def _uploads(corpus: Corpus, user: str) -> tuple[float, dict[str, Any]]:
    from bench._db import uploads_seconds

    seconds, ids = uploads_seconds(user, list(corpus.upload_paths), timeout=7200)
    return seconds, {"done": len(ids)}


def _bookmarks(corpus: Corpus, user: str) -> tuple[float, dict[str, Any]]:
    from worker import client

    start = time.perf_counter()
    job = client.import_bookmarks(user, corpus.export_path)
    progress = client.wait_for_import(user, job, timeout=7200, poll=0.05)
    seconds = time.perf_counter() - start
    if progress.status != "done":
        raise RuntimeError(f"bookmark import ended {progress.status}: {progress}")
    return seconds, {
        "status": progress.status,
        "total": progress.total,
        "created": progress.created,
        "duplicates": progress.duplicates,
        "failed": progress.failed,
    }
