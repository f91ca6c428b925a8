"""Fairness between imports: which embedding batches go to Redis, when, and for whom.

The problem (Karakeep #693, Linkwarden #826): an import sends one task per batch, all at
once, so one user's 10,000 bookmarks stand in front of everyone else's uploads for hours.

The shape chosen, and why:

* **Two lanes.** An import of fewer than ``BULK_IMPORT_THRESHOLD`` distinct bookmarks is
  *interactive*: its batches go to the ``ingest`` queue at once, like an upload. A larger
  one is *bulk*: its batches (``BULK_BATCH_SIZE`` bookmarks each) are staged in PostgreSQL
  as ``held`` and sent to the ``bulk`` queue by this dispatcher. 256 rather than 64: a
  64-bookmark task pads its short texts more (fewer to sort by length) and pays its claim,
  write and release more often; measured on two processes, the import ran 249/s with 64
  and 332/s with 256, and the uploads' p95 beside it was 1.93x idle with 64 and 1.06x with
  256 (the free process below serves them; the first upload of a burst waits one batch).
* **Only a few bulk messages exist at a time.** With the Redis transport Celery's message
  priorities are coarse (a few lists polled in turn), and a worker that has taken a message
  runs it to the end. So what keeps interactive work first is that Redis never holds a bulk
  backlog: at most ``BULK_MAX_IN_FLIGHT_PER_USER`` batches per user and
  ``BULK_MAX_IN_FLIGHT`` (default: the worker concurrency) in all are released (queued or
  running); the rest wait in the database. Workers poll their queues in a fixed order
  (``queue_order_strategy=priority``, ``bulk`` last), and with ``worker_prefetch_multiplier=1``
  and late acks a busy process reserves nothing more. So interactive work never queues
  behind the import's thousands of batches: at most behind one small batch in hand.
* **A free process while people are active.** Every upload and small import leaves a
  marker in Redis that lives ``BULK_RESERVE_SECONDS``; while it lives, one bulk batch fewer
  is released, so the next interactive task finds a process free instead of waiting for a
  batch to finish. Measured here on two processes: keeping a process free for good halves
  the import's rate, and never keeping one made each upload wait for a batch (about 4x its
  idle time); the marker gives the import every process when nobody else is working, and
  costs the first upload of a burst one batch's wait.
* **Round-robin between users.** Each release serves, one batch per user per round, the
  users with the fewest batches in flight first and, among equals, the user served least
  recently (the latest ``released_at``): two users importing at once get alternate slots
  and progress at similar rates, whoever started first.
* **When releases happen.** Right after each batch task ends (its slot is free), after a bulk
  job is staged or resumed, and on a beat tick (``BEAT_DISPATCH_INTERVAL``), so that a release
  lost with a crashed worker, or the opening of ``EMBED_WINDOW``, never stalls an import.
  Outside the window nothing bulk is released; interactive work is not affected. Batches
  already running when the window closes finish (at most the in-flight cap).
* **Never twice.** A release runs in one transaction under an advisory lock (dispatchers
  take turns, so the in-flight counts they read are exact) and locks the chosen rows with
  ``FOR UPDATE SKIP LOCKED`` (a batch being paused or cancelled right now is skipped, not
  waited on); the messages are sent after that transaction commits. A stale message for a
  batch that is held again (after a pause) is refused by the importer's claim.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from worker.app import TASK_EMBED_BOOKMARKS
from worker.config import Settings
from worker.errors import WorkerError
from worker.window import TimeWindow

log = logging.getLogger(__name__)

INTERACTIVE = "interactive"
BULK = "bulk"

Message = tuple[str, list[Any], str]  # task name, arguments, queue
Send = Callable[[str, list[Any], str], None]

_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('worker:bulk-dispatch', 0))"


class ImportCancelled(WorkerError):
    """The job was cancelled before its bookmarks were staged: stage nothing."""


# --- interactive work seen recently (a marker in the broker's Redis) -----------------------

INTERACTIVE_KEY = "worker:interactive-seen"


@lru_cache(maxsize=4)
def _redis(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)


def note_interactive(settings: Settings) -> None:
    """Interactive work was enqueued or started: keep a process free of bulk work for
    BULK_RESERVE_SECONDS. Best effort: without Redis, bulk simply keeps every slot."""
    if settings.bulk_reserve_seconds <= 0:
        return
    try:
        ttl_ms = max(1, int(settings.bulk_reserve_seconds * 1000))
        _redis(settings.celery_broker_url).set(INTERACTIVE_KEY, "1", px=ttl_ms)
    except Exception as exc:  # the work itself must not fail for a hint
        log.debug("could not note interactive work: %s", exc)


def interactive_recently(settings: Settings) -> bool:
    if settings.bulk_reserve_seconds <= 0:
        return False
    try:
        return bool(_redis(settings.celery_broker_url).exists(INTERACTIVE_KEY))
    except Exception:
        return False


def in_flight_cap(settings: Settings, *, interactive: bool) -> int:
    """The global cap now: one batch fewer while interactive work is about (at least one)."""
    cap = settings.bulk_in_flight_cap
    return max(1, cap - 1) if interactive else cap


def default_send(task: str, args: list[Any], queue: str) -> None:
    from worker.app import app

    app.send_task(task, args=args, queue=queue)


# --- lanes (called inside the importer's staging transaction) --------------------------------


def lane_for(settings: Settings, bookmarks: int) -> str:
    return BULK if bookmarks >= settings.bulk_import_threshold else INTERACTIVE


def batch_size(settings: Settings, lane: str) -> int:
    return settings.bulk_batch_size if lane == BULK else settings.bookmark_batch_size


def begin_staging(session: Session, settings: Settings, job_id: int, bookmarks: int) -> str:
    """Lock the job for the staging transaction and choose its lane from the number of
    distinct bookmarks in the file. Raises ImportCancelled when the job was cancelled while
    its file was parsed (the transaction then stages nothing). Holding the job's row lock
    until commit makes a pause or cancel arriving now wait for the staged rows, and act on
    them."""
    status = session.execute(
        text("SELECT status FROM import_job WHERE id = :id FOR UPDATE"), {"id": job_id}
    ).scalar_one_or_none()
    if status == "cancelled":
        raise ImportCancelled(f"import job {job_id} was cancelled before it was staged")
    lane = lane_for(settings, bookmarks)
    session.execute(
        text("UPDATE import_job SET lane = :lane WHERE id = :id"), {"lane": lane, "id": job_id}
    )
    return lane


def finish_staging(session: Session, job_id: int, lane: str) -> None:
    """A bulk job's batches wait in the database for the dispatcher."""
    if lane == BULK:
        session.execute(
            text("UPDATE import_batch SET held = true WHERE import_job_id = :id"), {"id": job_id}
        )


def after_staging(
    engine: Engine, settings: Settings, job_id: int, batch_ids: Sequence[int]
) -> list[Message]:
    """What to send once a job is staged (or its job task delivered again): an interactive
    job's pending batches, all of them; for a bulk job, whatever the dispatcher releases."""
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT lane, status FROM import_job WHERE id = :id"), {"id": job_id}
        ).first()
    if row is None or row.status != "processing":
        return []  # paused or cancelled meanwhile: resume sends them
    if row.lane == INTERACTIVE:
        note_interactive(settings)
        return [(TASK_EMBED_BOOKMARKS, [b], settings.queue_ingest) for b in batch_ids]
    return release(engine, settings)


# --- the decision (plain, testable with a fixed clock) -------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A held batch that may be released, in its user's release order."""

    batch_id: int
    user_id: str
    job_id: int
    seq: int


@dataclass(frozen=True)
class UserLoad:
    in_flight: int  # released, not finished
    last_released: datetime | None


def window_open(window: TimeWindow | None, now: datetime) -> bool:
    return window is None or window.contains(now)


def plan_release(
    candidates: Iterable[Candidate],
    loads: Mapping[str, UserLoad],
    *,
    per_user: int,
    total: int,
    window: TimeWindow | None,
    now: datetime,
) -> list[Candidate]:
    """The batches to release now, in order: nothing outside the window; otherwise rounds
    of one batch per user (fewest in flight first, then the one served least recently),
    within the per-user and the global cap."""
    if not window_open(window, now):
        return []
    queues: dict[str, deque[Candidate]] = {}
    for c in candidates:
        queues.setdefault(c.user_id, deque()).append(c)
    idle = UserLoad(0, None)
    in_flight = {u: loads.get(u, idle).in_flight for u in queues}
    free = total - sum(load.in_flight for load in loads.values())
    never = datetime.min.replace(tzinfo=UTC)
    order = sorted(
        queues,
        key=lambda u: (in_flight[u], loads.get(u, idle).last_released or never, u),
    )
    picked: list[Candidate] = []
    while free > 0:
        progressed = False
        for user in order:
            if free <= 0:
                break
            if queues[user] and in_flight[user] < per_user:
                picked.append(queues[user].popleft())
                in_flight[user] += 1
                free -= 1
                progressed = True
        if not progressed:
            break
    return picked


# --- the release (one transaction) -------------------------------------------------------------

_CANDIDATES = (
    # Each user's first ``per_user`` held batches of running bulk jobs (oldest job first):
    # no user can be given more than that in one release.
    "SELECT c.id, c.user_id, c.import_job_id, c.seq FROM "
    "(SELECT DISTINCT user_id FROM import_batch WHERE held AND status = 'queued') u "
    "CROSS JOIN LATERAL (SELECT b.id, b.user_id, b.import_job_id, b.seq FROM import_batch b "
    "JOIN import_job j ON j.id = b.import_job_id WHERE b.user_id = u.user_id AND b.held "
    "AND b.status = 'queued' AND j.status = 'processing' AND j.lane = 'bulk' "
    "ORDER BY b.import_job_id, b.seq LIMIT :per_user) c ORDER BY c.user_id, c.import_job_id, c.seq"
)
_LOADS = (
    "SELECT b.user_id, count(*) FILTER (WHERE NOT b.held AND b.status IN "
    "('queued', 'processing')) AS in_flight, max(b.released_at) AS last_released "
    "FROM import_batch b JOIN import_job j ON j.id = b.import_job_id "
    "WHERE j.lane = 'bulk' AND j.status = 'processing' GROUP BY b.user_id"
)


def release(
    engine: Engine,
    settings: Settings,
    *,
    now: datetime | None = None,
    interactive: bool | None = None,
) -> list[Message]:
    """Release what ``plan_release`` allows now; return the messages to send (after this
    function's transaction has committed, which it has when it returns). ``now`` and
    ``interactive`` (recent interactive work) default to the clock and the Redis marker."""
    now = now or datetime.now(UTC)
    if interactive is None:
        interactive = interactive_recently(settings)
    per_user = settings.bulk_max_in_flight_per_user
    with engine.begin() as conn:
        conn.execute(text(_LOCK))
        candidates = [
            Candidate(r.id, r.user_id, r.import_job_id, r.seq)
            for r in conn.execute(text(_CANDIDATES), {"per_user": per_user})
        ]
        if not candidates:
            return []
        loads = {
            r.user_id: UserLoad(int(r.in_flight), r.last_released)
            for r in conn.execute(text(_LOADS))
        }
        picked = plan_release(
            candidates,
            loads,
            per_user=per_user,
            total=in_flight_cap(settings, interactive=interactive),
            window=settings.window,
            now=now,
        )
        if not picked:
            return []
        locked = set(
            conn.execute(
                text(
                    "SELECT b.id FROM import_batch b JOIN import_job j ON j.id = b.import_job_id "
                    "WHERE b.id = ANY(:ids) AND b.held AND b.status = 'queued' "
                    "AND j.status = 'processing' FOR UPDATE OF b SKIP LOCKED"
                ),
                {"ids": [c.batch_id for c in picked]},
            ).scalars()
        )
        picked = [c for c in picked if c.batch_id in locked]
        if picked:
            # updated_at too: a batch held for hours must not look stuck to requeue now.
            conn.execute(
                text(
                    "UPDATE import_batch SET held = false, released_at = now(), "
                    "updated_at = now() WHERE id = ANY(:ids)"
                ),
                {"ids": [c.batch_id for c in picked]},
            )
    if picked:
        log.info(
            "released %d bulk batch(es): %s",
            len(picked),
            ", ".join(f"{c.batch_id} (user {c.user_id})" for c in picked),
            extra={"stage": "dispatch", "counts": {"released": len(picked)}},
        )
    return [(TASK_EMBED_BOOKMARKS, [c.batch_id], settings.queue_bulk) for c in picked]


def dispatch(
    engine: Engine, settings: Settings, send: Send = default_send, *, now: datetime | None = None
) -> dict[str, Any]:
    """Release and send. A send that fails leaves a released batch without a message: the
    requeue task finds it (queued past STUCK_AFTER_SECONDS) and sends it again."""
    messages = release(engine, settings, now=now)
    for task, args, queue in messages:
        send(task, args, queue)
    window = settings.window
    return {
        "released": len(messages),
        "batch_ids": [args[0] for _, args, _ in messages],
        "window_open": window_open(window, now or datetime.now(UTC)),
    }
