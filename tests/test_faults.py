"""Faults with real processes: poison messages, a time limit, PostgreSQL or Redis restarted
mid-run, services unreachable when a worker starts."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import Engine, text

from worker import client, services
from worker.app import TASK_EMBED_BOOKMARKS, TASK_PROCESS_UPLOAD, app
from worker.config import Settings, get_settings
from worker.fixtures import prose
from worker.subprocess_worker import WorkerProcess

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


def _wait_until_one_done(worker: WorkerProcess, user_id: str, ids: list[int]) -> None:
    deadline = time.monotonic() + 120
    while client.wait_for_items(user_id, ids, timeout=0).get("done", 0) < 1:
        assert time.monotonic() < deadline, worker.log()[-3000:]
        time.sleep(0.05)


def _prose_files(root: Path, stem: str, seeds: range, *, paragraphs: int) -> list[Path]:
    """One text file of ``paragraphs`` paragraphs of prose per seed, ``<stem>-<k>.txt``."""
    paths = []
    for k, seed in enumerate(seeds):
        path = root / f"{stem}-{k}.txt"
        path.write_text(prose(seed, paragraphs))
        paths.append(path)
    return paths


def test_postgresql_restart_mid_run_then_everything_completes(
    celery_worker, upload_root: Path, user_id: str, service_urls: dict[str, str]
) -> None:  # type: ignore[no-untyped-def]
    settings = get_settings()
    if f":{settings.pg_port}/" not in service_urls["DATABASE_URL"]:
        pytest.skip("PostgreSQL is external: this test restarts the embedded one")
    paths = _prose_files(upload_root, f"{user_id}-restart", range(100, 108), paragraphs=6)
    ids = [client.enqueue_upload(user_id, p) for p in paths]
    _wait_until_one_done(celery_worker, user_id, ids)  # mid-run: the rest still to do
    services.pg_restart(settings)
    counts = client.wait_for_items(user_id, ids, timeout=300)
    assert counts == {"done": len(ids)}, (counts, celery_worker.log()[-4000:])
    assert celery_worker.alive


# --- services down at start, Redis restarted mid-run ------------------------------------------


class Gate:
    """A local TCP port that refuses connections (like a service that is down) until
    ``open``, then forwards each connection to ``target_port``: a database or broker that
    comes up later, without stopping the shared test services."""

    def __init__(self, target_port: int) -> None:
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()  # nothing listens here until open()
        self.target_port = target_port
        self._server: socket.socket | None = None
        self._sockets: list[socket.socket] = []

    def open(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        self._server = server
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        assert self._server is not None
        while True:
            try:
                client, _ = self._server.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                return
            self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        for sock in [*self._sockets, *([self._server] if self._server else [])]:
            with contextlib.suppress(OSError):
                sock.close()


def _port_of(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None, url
    return port


def _with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{host}:{port}"))


def _wait_for_log(worker: WorkerProcess, pattern: str, timeout: float = 60) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, worker.log())
        if found:
            return found
        assert worker.alive, worker.log()[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"no log line matching {pattern!r}:\n{worker.log()[-3000:]}")


def test_a_worker_started_before_its_services_waits_then_works(
    worker_env: dict[str, str], service_urls: dict[str, str], tmp_path: Path
) -> None:
    """PostgreSQL and Redis unreachable at start (connection refused): the worker logs
    which one and why on each try, takes no task, and works once both answer."""
    from worker.app import TASK_MAINT_REQUEUE

    db_gate = Gate(_port_of(service_urls["DATABASE_URL"]))
    redis_gate = Gate(_port_of(service_urls["REDIS_URL"]))
    env = dict(
        worker_env,
        DATABASE_URL=_with_port(service_urls["DATABASE_URL"], db_gate.port),
        REDIS_URL=_with_port(service_urls["REDIS_URL"], redis_gate.port),
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"),
    )
    # Queues of its own: the session's worker (same Redis) must not answer for this one.
    queues = "late_ingest,late_maintenance"
    worker = WorkerProcess(tmp_path / "late.log", env=env, queues=queues, name="late").start()
    try:
        first = _wait_for_log(worker, r"waiting for services \(attempt 1\b.*")
        assert "PostgreSQL" in first[0] and "Redis" in first[0], first[0]
        assert "refused" in first[0].lower()
        db_gate.open()
        # The next try names Redis alone: the database is now found.
        only_redis = _wait_for_log(worker, r"attempt \d+, next try in \d+s\): Redis at [^\n]*")
        assert "PostgreSQL" not in only_redis[0], only_redis[0]
        assert "ready" not in worker.log().split("(attempt 1", 1)[1]  # no consumer yet
        redis_gate.open()
        worker.wait_ready(timeout=60)
        assert "PostgreSQL and Redis answer after" in worker.log()
        # A task that reads and writes the database (its maintenance_run row) through the
        # late worker.
        result = app.send_task(TASK_MAINT_REQUEUE, queue="late_maintenance").get(timeout=60)
        assert result["run_id"] is not None and not result["skipped"], result
    finally:
        worker.stop()
        db_gate.close()
        redis_gate.close()


def test_the_wait_gives_up_after_service_wait_timeout() -> None:
    """With SERVICE_WAIT_TIMEOUT set, a service that never comes ends the wait with an error
    naming it (the worker then exits 1), after one log line per try."""
    from worker.startup import ServicesUnavailable, wait_for_services

    closed = Gate(1)  # a port nothing listens on
    settings = get_settings().model_copy(
        update={
            "database_url": _with_port(get_settings().database_url, closed.port),
            "service_wait_timeout": 5.0,
        }
    )
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    with pytest.raises(ServicesUnavailable, match=r"SERVICE_WAIT_TIMEOUT.*PostgreSQL"):
        wait_for_services(settings, sleep=sleep, clock=lambda: now[0])
    assert slept == [1.0, 2.0]  # backoff; the next delay (4 s) would pass the deadline


def test_a_worker_whose_database_never_comes_exits_with_the_reason(
    worker_env: dict[str, str], service_urls: dict[str, str], tmp_path: Path
) -> None:
    closed = Gate(1)
    env = dict(
        worker_env,
        DATABASE_URL=_with_port(service_urls["DATABASE_URL"], closed.port),
        SERVICE_WAIT_TIMEOUT="2",
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"),
    )
    worker = WorkerProcess(tmp_path / "never.log", env=env, name="never").start()
    assert worker.proc is not None
    assert worker.proc.wait(timeout=60) == 1
    gave_up = r"CRITICAL.*gave up after 2s \(SERVICE_WAIT_TIMEOUT\).*PostgreSQL"
    assert re.search(gave_up, worker.log())


def _kill_redis(settings: Settings) -> None:
    """SIGKILL the embedded redis-server (no shutdown save: the AOF keeps what was fsynced,
    about all but the last second) and wait until its port is free."""
    pid = int((settings.data_dir / "redis" / "redis.pid").resolve().read_text().strip())
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while services.port_in_use(settings.redis_port) and time.monotonic() < deadline:
        time.sleep(0.05)


def _analyses_and_vectors(engine: Engine, ids: list[int]) -> list[tuple[int, int, int, int]]:
    """Per item: analyses, vectors, distinct chunk indexes of the vectors, chunks expected."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT i.id, (SELECT count(*) FROM analysis a WHERE a.item_id = i.id), "
                "(SELECT count(*) FROM embedding e WHERE e.item_id = i.id), "
                "(SELECT count(DISTINCT (e.model, e.chunk_index)) FROM embedding e "
                " WHERE e.item_id = i.id), i.attempts FROM item i WHERE i.id = ANY(:ids)"
            ),
            {"ids": ids},
        ).all()
    return [(r[1], r[2], r[3], r[4]) for r in rows]


def _wait_with_requeue(
    engine: Engine, user_id: str, ids: list[int], *, timeout: float = 300
) -> dict[str, int]:
    """Wait for the items; whenever none has finished for a few seconds, run the requeue
    task as beat would (with a STUCK_AFTER_SECONDS of a few seconds, not 15 minutes)."""
    from worker.maintenance.requeue import find_and_requeue

    quiet = 5
    settings = get_settings().model_copy(update={"stuck_after_seconds": quiet})

    def send(task: str, args: list[object], queue: str) -> None:
        app.send_task(task, args=args, queue=queue)

    deadline = time.monotonic() + timeout
    finished = -1
    while True:
        counts = client.wait_for_items(user_id, ids, timeout=quiet, poll=0.3)
        if not (counts.get("queued") or counts.get("processing")):
            return counts
        if time.monotonic() > deadline:
            return counts
        now_finished = sum(
            n for status, n in counts.items() if status not in ("queued", "processing")
        )
        if now_finished == finished:
            find_and_requeue(engine, settings, send)
        finished = now_finished


def test_redis_killed_mid_run_the_worker_reconnects_and_everything_completes(
    celery_worker: WorkerProcess,
    upload_root: Path,
    user_id: str,
    service_urls: dict[str, str],
    engine: Engine,
) -> None:
    settings = get_settings()
    if f":{settings.redis_port}/" not in service_urls["REDIS_URL"]:
        pytest.skip("Redis is external: this test kills the embedded one")
    paths = _prose_files(upload_root, f"{user_id}-redis", range(300, 306), paragraphs=5)
    ids = [client.enqueue_upload(user_id, p) for p in paths]
    _wait_until_one_done(celery_worker, user_id, ids)  # mid-run: the rest still queued
    log_before = len(celery_worker.log())
    _kill_redis(settings)
    time.sleep(1.0)  # the worker notices the loss while Redis is down
    services.redis_start(settings)
    counts = _wait_with_requeue(engine, user_id, ids)
    assert counts == {"done": len(ids)}, (counts, celery_worker.log()[-4000:])
    for analyses, vectors, distinct, _ in _analyses_and_vectors(engine, ids):
        assert analyses == 1 and vectors == distinct > 1
    assert celery_worker.alive
    assert "Connection to broker lost" in celery_worker.log()[log_before:]
    # And it keeps working on messages sent after the restart.
    late = upload_root / f"{user_id}-redis-late.txt"
    late.write_text(prose(399, 2))
    late_id = client.enqueue_upload(user_id, late)
    assert client.wait_for_items(user_id, [late_id], timeout=120) == {"done": 1}


def test_a_broker_refusing_the_fan_out_fails_nothing_and_requeue_finds_it(
    engine: Engine, upload_root: Path, user_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An import staged while Redis is down: its batches cannot be sent. The job must not
    be failed for it (its rows are committed); the requeue task finds the batches."""
    from kombu.exceptions import OperationalError

    from worker import tasks
    from worker.db import queries
    from worker.db.engine import session_scope
    from worker.maintenance.requeue import find_and_requeue

    path = upload_root / f"{user_id}-fanout.html"
    path.write_text(
        "<!DOCTYPE NETSCAPE-Bookmark-file-1>\n<DL><p>\n"
        + "".join(f'<DT><A HREF="https://fanout.example/{i}">Page {i}</A>\n' for i in range(3))
        + "</DL><p>\n"
    )
    with session_scope() as s:
        job = queries.insert_import_job(s, user_id=user_id, filename=path.name, file_size=1)

    def refuse(*_: object, **__: object) -> None:
        raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr(tasks.app, "send_task", refuse)
    assert tasks.import_bookmarks.apply(args=[job]).get() == {
        "job_id": job,
        "batches": 1,
        "sent": 0,  # the broker refused it; requeue sends it below
    }
    progress = client.import_status(user_id, job)
    assert progress is not None and progress.status == "processing" and not progress.error
    sent: list[tuple[str, list[object]]] = []
    settings = get_settings().model_copy(update={"stuck_after_seconds": 0})
    time.sleep(0.01)  # the batch's updated_at is now in the past
    find_and_requeue(engine, settings, lambda task, args, queue: sent.append((task, args)))
    with engine.connect() as conn:
        batch = conn.execute(
            text("SELECT id FROM import_batch WHERE import_job_id = :j"), {"j": job}
        ).scalar_one()
    # (Other tests' leftovers in this database may be resent too: only this job's counts.)
    assert [task for task, args in sent if args == [batch]] == [TASK_EMBED_BOOKMARKS]
