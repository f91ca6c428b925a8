"""Exposure: JSON-only messages, the embedded services on loopback only, a Redis that wants a
password, and no secret (database password, Redis password, API key) in a log line, a stored
error or the output of a command. (A pickle payload refused by a real worker is in
test_faults; the log formatter's masking in test_operations.)"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import Engine, text

from worker import client, services
from worker.app import TASK_HEALTH, app, create_app
from worker.config import get_settings, load_settings
from worker.fixtures import prose
from worker.subprocess_worker import WorkerProcess

ROOT = Path(__file__).resolve().parents[1]
DB_SECRET = "db-secret-4711"
REDIS_SECRET = "redis-secret-0815"
API_KEY = "sk-live-secret-abcdef0123456789"


def test_celery_accepts_json_only() -> None:
    conf = app.conf
    assert conf.accept_content == ["json"] and conf.result_accept_content == ["json"]
    assert conf.task_serializer == "json" and conf.result_serializer == "json"


def test_embedded_services_listen_on_loopback_only(
    service_urls: dict[str, str], engine: Engine
) -> None:
    settings = get_settings()
    if f":{settings.redis_port}/" not in service_urls["REDIS_URL"]:
        pytest.skip("external services: their binding is their operator's")
    bind = redis.Redis.from_url(service_urls["REDIS_URL"]).config_get("bind")["bind"]
    with engine.connect() as conn:
        listen = conn.execute(text("SHOW listen_addresses")).scalar_one()
    assert bind.split() == ["127.0.0.1"] and listen == "127.0.0.1"


def test_a_recorded_failure_masks_the_configured_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a task records as an item's error (and shows in `worker failures`) goes
    through the same masking as a log line."""
    from worker.tasks import run_guarded

    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.setenv("DATABASE_URL", f"postgresql://app:{DB_SECRET}@db.internal/worker")
    get_settings.cache_clear()
    recorded: list[str] = []

    class Task:
        name = "test.task"

        class request:  # the shape of a Celery task's request
            retries = 0

    def leaky() -> dict[str, Any]:
        raise ValueError(f"provider said: bad key {API_KEY}; password {DB_SECRET} refused")

    try:
        run_guarded(Task(), "item 9", leaky, recorded.append)  # type: ignore[arg-type]
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert recorded and API_KEY not in recorded[0] and DB_SECRET not in recorded[0]
    assert "ValueError: provider said: bad key ***" in recorded[0]


# --- a deployment with secrets everywhere ------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def redis_with_password(tmp_path: Path) -> Iterator[str]:
    """A second real redis-server, on loopback, that wants a password; its URL."""
    port = _free_port()
    proc = subprocess.Popen(
        [
            str(services.redis_server_binary()),
            *("--bind", "127.0.0.1", "--port", str(port), "--requirepass", REDIS_SECRET),
            *("--save", "", "--appendonly", "no", "--dir", str(tmp_path)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://:{REDIS_SECRET}@127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def _wait_ready(celery: Any, worker: WorkerProcess, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert worker.alive, worker.log()[-3000:]
        try:
            celery.send_task(TASK_HEALTH, queue="maintenance").get(timeout=5)
            return
        except Exception:  # not consuming yet
            continue
    raise AssertionError(worker.log()[-3000:])


def _cli(env: dict[str, str], *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "worker", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    return proc.stdout + proc.stderr


def test_no_secret_in_logs_errors_or_command_output(
    worker_env: dict[str, str],
    service_urls: dict[str, str],
    redis_with_password: str,
    upload_root: Path,
    engine: Engine,
    tmp_path: Path,
) -> None:
    """A worker whose database URL, Redis URL and API key all carry secrets processes a good
    upload (the OpenAI-compatible provider it is given is down: the call with the key fails
    and the local analyzer takes over) and a bad one. Its whole log, the stored errors and
    analysis, and `worker status`, `failures`, `health` and `config` hold none of them."""
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(redis_with_password.replace(f":{REDIS_SECRET}@", "")).ping()
    db_url = service_urls["DATABASE_URL"].replace("://postgres@", f"://postgres:{DB_SECRET}@", 1)
    assert DB_SECRET in db_url  # the embedded server trusts local connections: any password
    env = {
        **worker_env,
        "DATABASE_URL": db_url,
        "REDIS_URL": redis_with_password,
        "OPENAI_API_KEY": API_KEY,
        "ANALYSIS_PROVIDER": "openai",
        "OPENAI_BASE_URL": f"http://127.0.0.1:{_free_port()}/v1",  # nothing listens
        "OPENAI_MODEL": "some-model",
        "OPENAI_TIMEOUT": "2",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
    }
    producer = create_app(load_settings(database_url=db_url, redis_url=redis_with_password))
    user = f"secret-{uuid.uuid4().hex[:8]}"
    good = upload_root / f"{user}-good.txt"
    good.write_text(prose(21, 2))
    bad = upload_root / f"{user}-bad.txt"
    bad.write_bytes(bytes(range(256)) * 8)
    worker = WorkerProcess(tmp_path / "secret.log", env=env, name="secret").start()
    try:
        _wait_ready(producer, worker)
        ids = [client.enqueue_upload(user, p, celery=producer) for p in (good, bad)]
        assert client.wait_for_items(user, ids, timeout=300) == {"done": 1, "failed": 1}
        outputs = [
            _cli(env, "status"),
            _cli(env, "failures", "--json", "--user", user),
            _cli(env, "health", "--worker"),
            _cli(env, "config"),
        ]
    finally:
        worker.stop()
    with engine.connect() as conn:
        stored = conn.execute(
            text(
                "SELECT i.error, a.raw_response FROM item i "
                "LEFT JOIN analysis a ON a.item_id = i.id WHERE i.id = ANY(:ids)"
            ),
            {"ids": ids},
        ).all()
    raw = [r.raw_response for r in stored if r.raw_response]
    assert raw and raw[0].get("fallback") is True  # the provider was called, with the key
    assert any(r.error for r in stored)  # the bad file's reason
    everything = "\n".join([worker.log(), *outputs, *(json.dumps(tuple(r)) for r in stored)])
    assert "ok" in outputs[2] and "***" in outputs[3]
    for secret in (DB_SECRET, REDIS_SECRET, API_KEY):
        assert secret not in everything, secret
