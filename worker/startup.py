"""Wait for PostgreSQL and Redis when a worker starts.

A worker started before its database or broker (a host reboot, ``compose up`` with a slow
volume, a failover) must neither crash-loop nor take tasks it cannot finish: it checks both
before its pool starts, logs one line per attempt naming what is unreachable and why, and
retries with a capped backoff until they answer (or ``SERVICE_WAIT_TIMEOUT`` runs out).
Once running, a lost connection is Celery's broker retry and the tasks' transient retries.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from worker.config import Settings, mask_url
from worker.errors import ConfigError
from worker.logs import redact

log = logging.getLogger(__name__)

FIRST_DELAY = 1.0
MAX_DELAY = 10.0
CHECK_TIMEOUT = 5  # seconds per connection attempt


class ServicesUnavailable(ConfigError):
    """PostgreSQL or Redis did not answer within SERVICE_WAIT_TIMEOUT."""


def _short(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return redact(f"{exc.__class__.__name__}: {first}"[:300])


def database_problem(settings: Settings) -> str | None:
    """None when PostgreSQL accepts a connection and answers a query; else why not."""
    import psycopg

    try:
        with psycopg.connect(settings.psycopg_dsn, connect_timeout=CHECK_TIMEOUT) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:  # any failure to connect is "not yet"
        return _short(exc)
    return None


def redis_problem(url: str) -> str | None:
    """None when the Redis at ``url`` answers PING; else why not (auth errors included)."""
    import redis

    try:
        redis.Redis.from_url(
            url, socket_connect_timeout=CHECK_TIMEOUT, socket_timeout=CHECK_TIMEOUT
        ).ping()
    except Exception as exc:
        return _short(exc)
    return None


def unreachable(settings: Settings) -> list[str]:
    """What cannot be reached now: "<service> at <masked URL> (<reason>)" each."""
    problems: list[str] = []
    if db := database_problem(settings):
        problems.append(f"PostgreSQL at {mask_url(settings.database_url)} ({db})")
    for url in dict.fromkeys((settings.celery_broker_url, settings.celery_result_backend)):
        if url.startswith("redis") and (problem := redis_problem(url)):
            problems.append(f"Redis at {mask_url(url)} ({problem})")
    return problems


def wait_for_services(
    settings: Settings,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Block until PostgreSQL and Redis answer; return how many attempts failed first.
    Raises ServicesUnavailable once ``settings.service_wait_timeout`` (0 = never) is spent."""
    timeout = settings.service_wait_timeout
    deadline = clock() + timeout if timeout > 0 else None
    failed = 0
    delay = FIRST_DELAY
    while True:
        problems = unreachable(settings)
        if not problems:
            if failed:
                log.info("PostgreSQL and Redis answer after %d failed attempts: starting", failed)
            return failed
        failed += 1
        what = "; ".join(problems)
        if deadline is not None and clock() + delay > deadline:
            raise ServicesUnavailable(
                f"gave up after {timeout:g}s (SERVICE_WAIT_TIMEOUT) waiting for {what}"
            )
        log.warning(
            "waiting for services (attempt %d, next try in %.0fs): %s",
            failed,
            delay,
            what,
            extra={"stage": "startup"},
        )
        sleep(delay)
        delay = min(delay * 2, MAX_DELAY)
