"""An import's rate and ETA, from its recent batches (``import_status``, the CLI's progress
bar, ``worker status``).

Why the recent batches and not the average since the start: the rate of a bulk import
changes while it runs. A second user's import halves it (round-robin), a pause or a closed
``EMBED_WINDOW`` stops it, and the duplicates counted at staging make the first seconds look
fast. So the rate is the bookmarks of the last ``RECENT_BATCHES`` finished batches over the
time between their finishes, and a gap in which nothing finished for over ``STALL_SECONDS``
(or five typical gaps) is left out: that was a stop, not slow progress. A finished batch row
is not updated again, so its ``updated_at`` is when it finished.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import pairwise
from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.orm import Session

from worker.bookmarks import dispatch
from worker.window import TimeWindow

RECENT_BATCHES = 20
STALL_SECONDS = 60.0
STALL_FACTOR = 5.0

RUNNING = ("queued", "processing")
FINISHED = ("done", "failed", "cancelled")


@dataclass(frozen=True)
class Estimate:
    rate_per_s: float | None  # bookmarks per second
    eta_s: float | None  # None: unknown, or not moving (see ``note``)
    note: str | None = None  # why it is not moving: paused, outside the window


def recent_rate(
    finishes: Sequence[tuple[datetime, int]], started_at: datetime | None
) -> float | None:
    """Bookmarks per second from ``(finished_at, bookmarks)`` of the latest finished batches,
    oldest first. With one batch, its bookmarks over the time since the job started."""
    if not finishes:
        return None
    if len(finishes) == 1:
        finished_at, size = finishes[0]
        if started_at is None:
            return None
        seconds = (finished_at - started_at).total_seconds()
        return size / seconds if seconds > 0 else None
    steps = [
        ((later[0] - earlier[0]).total_seconds(), later[1]) for earlier, later in pairwise(finishes)
    ]
    stall = max(STALL_SECONDS, STALL_FACTOR * statistics.median(s for s, _ in steps))
    kept = [(seconds, size) for seconds, size in steps if seconds <= stall]
    seconds = sum(s for s, _ in kept)
    return sum(n for _, n in kept) / seconds if seconds > 0 else None


def recent_finishes(conn: Connection | Session, job_id: int) -> list[tuple[datetime, int]]:
    rows = conn.execute(
        text(
            "SELECT updated_at, cardinality(item_ids) AS n FROM import_batch "
            "WHERE import_job_id = :id AND status IN ('done', 'failed') "
            "ORDER BY updated_at DESC LIMIT :n"
        ),
        {"id": job_id, "n": RECENT_BATCHES + 1},
    ).all()
    return [(r.updated_at, int(r.n)) for r in reversed(rows)]


def estimate(
    *,
    status: str,
    lane: str,
    total: int,
    processed: int,
    started_at: datetime | None,
    finished_at: datetime | None,
    finishes: Sequence[tuple[datetime, int]],
    window: TimeWindow | None,
    now: datetime | None = None,
) -> Estimate:
    """Rate and ETA of one job. A finished job shows its average rate; a running one its
    recent rate; a paused one, or a bulk one outside the window, no ETA and the reason."""
    now = now or datetime.now(UTC)
    if status in FINISHED:
        rate = None
        if started_at and finished_at and processed:
            rate = processed / max((finished_at - started_at).total_seconds(), 1e-3)
        return Estimate(rate, 0.0 if status == "done" else None)
    rate = recent_rate(finishes, started_at)
    if status == "paused":
        return Estimate(None, None, "paused")
    if lane == dispatch.BULK and window is not None and not window.contains(now):
        opens = window.next_open(now)
        return Estimate(
            rate, None, f"waiting for EMBED_WINDOW {window} (opens {opens:%Y-%m-%d %H:%M %Z})"
        )
    if status not in RUNNING or rate is None or rate <= 0:
        return Estimate(rate, None)
    return Estimate(rate, max(total - processed, 0) / rate)


def estimate_job(
    session: Session, job: Any, *, window: TimeWindow | None, now: datetime
) -> Estimate:
    """``estimate`` for an ``import_job`` row (any object with its columns), reading the
    job's recent batch finishes in ``session``."""
    return estimate(
        status=job.status,
        lane=job.lane,
        total=job.total,
        processed=job.processed,
        started_at=job.started_at,
        finished_at=job.finished_at,
        finishes=recent_finishes(session, job.id),
        window=window,
        now=now,
    )
