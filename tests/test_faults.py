"""Faults with real processes: poison messages, a time limit, PostgreSQL restarted mid-run."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from celery.exceptions import SoftTimeLimitExceeded

from worker import client, services
from worker.app import TASK_PROCESS_UPLOAD, app
from worker.config import get_settings
from worker.fixtures import prose

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class _Request:
    retries = 0


class _FakeTask:
    """Just enough of a bound Celery task for ``run_guarded``."""

    name = "test.task"
    request = _Request()


def test_a_task_past_its_soft_time_limit_fails_with_timed_out() -> None:
    from worker.tasks import run_guarded

    recorded: list[str] = []

    def slow() -> dict[str, Any]:
        raise SoftTimeLimitExceeded()

    result = run_guarded(_FakeTask(), "item 1", slow, recorded.append)  # type: ignore[arg-type]
    assert result["status"] == "failed"
    assert recorded and "timed out" in recorded[0] and "TASK_SOFT_TIME_LIMIT" in recorded[0]


def test_a_permanent_error_is_recorded_once_not_retried() -> None:
    from worker.tasks import run_guarded

    recorded: list[str] = []

    def broken() -> dict[str, Any]:
        raise ValueError("bad argument")

    result = run_guarded(_FakeTask(), "item 2", broken, recorded.append)  # type: ignore[arg-type]
    assert result["status"] == "failed" and recorded == ["ValueError: bad argument"]


def _raw_message(body: str, content_type: str, task: str) -> str:
    """A Celery protocol-2 message as kombu's Redis transport stores it in the queue list."""
    return json.dumps(
        {
            "body": body,
            "content-encoding": "utf-8",
            "content-type": content_type,
            "headers": {"lang": "py", "task": task, "id": str(uuid.uuid4()), "retries": 0},
            "properties": {
                "correlation_id": str(uuid.uuid4()),
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": "ingest"},
                "priority": 0,
                "body_encoding": "utf-8",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
    )


def test_poison_messages_are_dropped_and_the_worker_lives_on(
    celery_worker, upload_root: Path, user_id: str
) -> None:  # type: ignore[no-untyped-def]
    import redis

    queue = get_settings().queue_ingest
    conn = redis.Redis.from_url(get_settings().celery_broker_url)
    # A pickle payload (refused: JSON only), garbage that is not JSON, wrong arguments.
    conn.lpush(queue, _raw_message("gASVAAAAAAAAAAAu", "application/x-python-serialize", "x"))
    conn.lpush(queue, _raw_message("{not json", "application/json", TASK_PROCESS_UPLOAD))
    app.send_task(TASK_PROCESS_UPLOAD, args=["not-an-id", "extra"])
    app.send_task("worker.no_such_task", args=[1])
    # Then ordinary work still flows.
    path = upload_root / f"{user_id}-after-poison.txt"
    path.write_text(prose(3, 2))
    item_id = client.enqueue_upload(user_id, path)
    counts = client.wait_for_items(user_id, [item_id], timeout=120)
    assert counts == {"done": 1}, celery_worker.log()[-3000:]
    assert celery_worker.alive
    deadline = time.monotonic() + 10
    while conn.llen(queue) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert conn.llen(queue) == 0  # nothing is redelivered forever


def test_postgresql_restart_mid_run_then_everything_completes(
    celery_worker, upload_root: Path, user_id: str, service_urls: dict[str, str]
) -> None:  # type: ignore[no-untyped-def]
    settings = get_settings()
    if f":{settings.pg_port}/" not in service_urls["DATABASE_URL"]:
        pytest.skip("PostgreSQL is external: this test restarts the embedded one")
    paths = []
    for i in range(8):
        path = upload_root / f"{user_id}-restart-{i}.txt"
        path.write_text(prose(100 + i, 6))
        paths.append(path)
    ids = [client.enqueue_upload(user_id, p) for p in paths]
    time.sleep(2.0)  # let the worker get going
    services.pg_restart(settings)
    counts = client.wait_for_items(user_id, ids, timeout=300)
    assert counts == {"done": len(ids)}, (counts, celery_worker.log()[-4000:])
    assert celery_worker.alive
