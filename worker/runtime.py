"""Per-process resources of a worker: the embedding model and the analyzer, built once.

Celery's prefork children each call ``configure_process`` (worker_process_init); the model
is then loaded lazily on the first task, so a child that only runs maintenance never pays
for it.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache

from worker.config import Settings, get_settings
from worker.ingest.types import Embedder

log = logging.getLogger(__name__)


def torch_threads(settings: Settings) -> int:
    """This process's share of the cores: more threads than cores per process only thrash."""
    if settings.torch_threads:
        return settings.torch_threads
    return max(1, (os.cpu_count() or 1) // max(1, settings.worker_concurrency))


def configure_process(settings: Settings) -> None:
    threads = torch_threads(settings)
    # Read by torch/OpenMP when they are first imported in this process.
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    log.debug("process %s: %s torch threads", os.getpid(), threads)


@lru_cache(maxsize=8)
def embedder_for(name: str, path: str | None) -> Embedder:
    from worker.ingest.embed import default_model_path, get_embedder

    settings = get_settings()
    configure_process(settings)
    return get_embedder(
        name,
        path or default_model_path(),
        batch_size=settings.embed_batch_size,
        max_batch_tokens=settings.embed_max_batch_tokens,
        threads=torch_threads(settings),
    )


def default_embedder() -> Embedder:
    settings = get_settings()
    return embedder_for(settings.model_name, settings.model_path)
