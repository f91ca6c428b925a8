"""Fairness and control of imports: the embedding window, the dispatcher's decision (fixed
clock), releases in real PostgreSQL, progress estimates, and through a real worker on real
Redis: round-robin between two users' imports, an upload overtaking a big import, pause and
resume with nothing lost or duplicated, cancel with and without --keep."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from worker import client
from worker.app import TASK_EMBED_BOOKMARKS
from worker.bookmarks import control, dispatch, progress
from worker.bookmarks.dispatch import Candidate, UserLoad, plan_release
from worker.bookmarks.importer import claim_batch
from worker.config import Settings, get_settings, load_settings
from worker.db.engine import session_scope
from worker.errors import ConfigError
from worker.status import imports_running
from worker.subprocess_worker import WorkerProcess
from worker.window import TimeWindow

NOON = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def at(hour: int, minute: int = 0) -> datetime:
    return NOON.replace(hour=hour, minute=minute)


# --- the window ------------------------------------------------------------------------------


def test_window_wraps_midnight_start_inside_end_outside() -> None:
    night = TimeWindow.parse("22:00-06:00")
    assert [night.contains(at(h, m)) for h, m in ((22, 0), (23, 59), (0, 0), (5, 59))] == [True] * 4
    assert not any(night.contains(at(h)) for h in (6, 12, 21))
    day = TimeWindow.parse(" 9:30 - 17:00 ")
    assert day.contains(at(9, 30)) and day.contains(at(16, 59))
    assert not day.contains(at(9, 29)) and not day.contains(at(17))
    assert night.next_open(at(12)) == at(22)
    assert night.next_open(at(23)) == at(23)  # open now
    assert day.next_open(at(18)) == at(9, 30) + timedelta(days=1)


def test_window_in_its_time_zone() -> None:
    berlin = TimeWindow.parse("22:00-06:00", "Europe/Berlin")  # UTC+1 in November
    assert berlin.contains(at(21, 30)) and not berlin.contains(at(5, 30))


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("22-06", "expected HH:MM-HH:MM"),
        ("25:00-06:00", "not a time of day"),
        ("22:00-06:60", "not a time of day"),
        ("08:00-08:00", "the same"),
        ("nightly", "expected HH:MM-HH:MM"),
    ],
)
def test_bad_windows_are_refused_by_settings_with_the_reason(spec: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=rf"EMBED_WINDOW: .*{reason}"):
        load_settings(embed_window=spec)


def test_window_settings() -> None:
    assert load_settings(embed_window="").window is None
    settings = load_settings(embed_window="22:00-06:00", embed_window_timezone="Asia/Tokyo")
    assert settings.window is not None and str(settings.window) == "22:00-06:00 Asia/Tokyo"
    with pytest.raises(ConfigError, match=r"EMBED_WINDOW_TIMEZONE: .*not an IANA time zone"):
        load_settings(embed_window_timezone="Mars/Olympus")


# --- the dispatcher's decision (fixed clock) ---------------------------------------------


def pending(user: str, n: int, job: int = 1) -> list[Candidate]:
    return [Candidate(job * 1000 + i, user, job, i) for i in range(n)]


def test_plan_is_round_robin_within_both_caps() -> None:
    candidates = pending("ann", 5) + pending("bob", 5, job=2) + pending("cy", 1, job=3)
    picked = plan_release(candidates, {}, per_user=2, total=4, window=None, now=NOON)
    assert [c.user_id for c in picked] == ["ann", "bob", "cy", "ann"]
    picked = plan_release(candidates, {}, per_user=2, total=10, window=None, now=NOON)
    assert [c.user_id for c in picked] == ["ann", "bob", "cy", "ann", "bob"]
    assert [c.seq for c in picked if c.user_id == "ann"] == [0, 1]  # in release order


def test_plan_serves_the_least_served_user_first() -> None:
    candidates = pending("ann", 3) + pending("bob", 3, job=2)
    loads = {
        "ann": UserLoad(in_flight=1, last_released=at(11, 59)),
        "bob": UserLoad(in_flight=1, last_released=at(11, 58)),
    }
    # One free slot: equal loads, so bob, served longer ago.
    picked = plan_release(candidates, loads, per_user=2, total=3, window=None, now=NOON)
    assert [c.user_id for c in picked] == ["bob"]
    # Fewer in flight wins over an older release.
    loads["ann"] = UserLoad(in_flight=0, last_released=at(11, 59))
    picked = plan_release(candidates, loads, per_user=2, total=2, window=None, now=NOON)
    assert [c.user_id for c in picked] == ["ann"]
    # At the per-user cap, a user gets nothing even with free slots.
    loads = {"ann": UserLoad(2, at(11)), "bob": UserLoad(2, at(11))}
    assert plan_release(candidates, loads, per_user=2, total=10, window=None, now=NOON) == []


def test_plan_releases_nothing_outside_the_window() -> None:
    night = TimeWindow.parse("22:00-06:00")
    candidates = pending("ann", 3)
    assert plan_release(candidates, {}, per_user=2, total=2, window=night, now=at(12)) == []
    picked = plan_release(candidates, {}, per_user=2, total=2, window=night, now=at(23))
    assert len(picked) == 2


# --- progress ------------------------------------------------------------------------------


def test_recent_rate_leaves_out_stops() -> None:
    t0 = at(12)
    finishes = [(t0 + timedelta(seconds=s), 20) for s in (0, 2, 4, 6)]
    assert progress.recent_rate(finishes, t0 - timedelta(seconds=5)) == pytest.approx(10.0)
    # A two-hour pause between two batches is not slow progress.
    paused = [*finishes, (t0 + timedelta(hours=2), 20), (t0 + timedelta(hours=2, seconds=2), 20)]
    assert progress.recent_rate(paused, t0) == pytest.approx(10.0)
    assert progress.recent_rate(finishes[:1], t0 - timedelta(seconds=4)) == pytest.approx(5.0)
    assert progress.recent_rate([], t0) is None


def test_estimate_says_why_there_is_no_eta() -> None:
    t0 = at(12)
    finishes = [(t0 + timedelta(seconds=s), 20) for s in (0, 2, 4)]
    common: dict[str, Any] = {
        "total": 1000,
        "processed": 100,
        "started_at": t0,
        "finished_at": None,
        "finishes": finishes,
        "now": at(12, 1),
    }
    running = progress.estimate(status="processing", lane="bulk", window=None, **common)
    assert running.rate_per_s == pytest.approx(10.0) and running.eta_s == pytest.approx(90.0)
    paused = progress.estimate(status="paused", lane="bulk", window=None, **common)
    assert (paused.eta_s, paused.note) == (None, "paused")
    night = TimeWindow.parse("22:00-06:00")
    waiting = progress.estimate(status="processing", lane="bulk", window=night, **common)
    assert waiting.eta_s is None and waiting.note and "opens 2026-11-30 22:00" in waiting.note
    # Interactive work ignores the window.
    small = progress.estimate(status="processing", lane="interactive", window=night, **common)
    assert small.eta_s == pytest.approx(90.0)


# --- releases in PostgreSQL --------------------------------------------------------------------


def _bulk_job(engine: Engine, user: str, batches: int, *, lane: str = "bulk") -> int:
    """A staged job whose batches are held (items are not needed to release batches)."""
    with engine.begin() as conn:
        job_id = int(
            conn.execute(
                text(
                    "INSERT INTO import_job (user_id, filename, status, lane, total, "
                    "created_count, started_at) VALUES (:u, 'x.html', 'processing', :lane, "
                    ":n, :n, now()) RETURNING id"
                ),
                {"u": user, "lane": lane, "n": batches},
            ).scalar_one()
        )
        for seq in range(batches):
            conn.execute(
                text(
                    "INSERT INTO import_batch (import_job_id, user_id, seq, item_ids, held) "
                    "VALUES (:j, :u, :s, ARRAY[:s]::bigint[], :held)"
                ),
                {"j": job_id, "u": user, "s": seq, "held": lane == "bulk"},
            )
    return job_id


def _finish(engine: Engine, batch_ids: list[int]) -> None:
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE import_batch SET status = 'done' WHERE id = ANY(:ids)"),
            {"ids": batch_ids},
        )


def _close(engine: Engine, *job_ids: int) -> None:
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE import_job SET status = 'cancelled' WHERE id = ANY(:ids)"),
            {"ids": list(job_ids)},
        )


def test_releases_alternate_between_users_and_respect_the_caps(engine: Engine) -> None:
    tag = uuid.uuid4().hex[:6]
    ann, bob = f"ann-{tag}", f"bob-{tag}"
    settings = get_settings().model_copy(
        update={"bulk_max_in_flight_per_user": 1, "bulk_max_in_flight": 1, "embed_window": None}
    )
    jobs = [_bulk_job(engine, ann, 4), _bulk_job(engine, bob, 3)]
    try:
        order = []
        for _ in range(8):
            messages = dispatch.release(engine, settings, now=NOON)
            assert len(messages) <= 1  # the global cap
            if not messages:
                break
            [(task, [batch_id], queue)] = messages
            assert (task, queue) == (TASK_EMBED_BOOKMARKS, settings.queue_bulk)
            # A second release while it is in flight gives nothing: the caps hold.
            assert dispatch.release(engine, settings, now=NOON) == []
            with engine.connect() as conn:
                order.append(
                    conn.execute(
                        text("SELECT user_id FROM import_batch WHERE id = :b AND NOT held"),
                        {"b": batch_id},
                    ).scalar_one()
                )
            _finish(engine, [batch_id])
        assert order == [ann, bob, ann, bob, ann, bob, ann]
    finally:
        _close(engine, *jobs)


def test_window_blocks_bulk_releases_but_not_interactive_work(engine: Engine) -> None:
    tag = uuid.uuid4().hex[:6]
    settings = get_settings().model_copy(
        update={"embed_window": "22:00-06:00", "embed_window_timezone": "UTC"}
    )
    bulk = _bulk_job(engine, f"night-{tag}", 2)
    small = _bulk_job(engine, f"day-{tag}", 2, lane="interactive")
    try:
        assert dispatch.release(engine, settings, now=at(12), interactive=False) == []
        with engine.connect() as conn:
            ids = list(
                conn.execute(
                    text("SELECT id FROM import_batch WHERE import_job_id = :j ORDER BY seq"),
                    {"j": small},
                ).scalars()
            )
        sent = dispatch.after_staging(engine, settings, small, ids)
        assert sent == [(TASK_EMBED_BOOKMARKS, [i], settings.queue_ingest) for i in ids]
        opened = dispatch.release(engine, settings, now=at(23), interactive=False)
        assert len(opened) == min(2, settings.bulk_in_flight_cap)
    finally:
        _close(engine, bulk, small)


def test_interactive_work_leaves_a_process_free_for_a_while(service_urls: Any) -> None:
    settings = get_settings().model_copy(
        update={"bulk_max_in_flight": 3, "bulk_reserve_seconds": 0.5}
    )
    dispatch._redis(settings.celery_broker_url).delete(dispatch.INTERACTIVE_KEY)
    assert not dispatch.interactive_recently(settings)
    assert dispatch.in_flight_cap(settings, interactive=False) == 3
    dispatch.note_interactive(settings)  # an upload was enqueued
    assert dispatch.interactive_recently(settings)
    assert dispatch.in_flight_cap(settings, interactive=True) == 2
    wait_until("the marker to expire", lambda: not dispatch.interactive_recently(settings), 5)
    one = settings.model_copy(update={"bulk_max_in_flight": 1})
    assert dispatch.in_flight_cap(one, interactive=True) == 1  # never below one
    off = settings.model_copy(update={"bulk_reserve_seconds": 0})
    dispatch.note_interactive(off)
    assert not dispatch.interactive_recently(off)


def test_cli_control_names_what_it_refused(engine: Engine, user_id: str) -> None:
    from click.testing import CliRunner

    from worker.cli import cli

    job = _bulk_job(engine, user_id, 2)
    try:
        runner = CliRunner()
        out = runner.invoke(cli, ["import", "resume", str(job)])
        assert out.exit_code == 1 and "not paused (status processing)" in out.output
        out = runner.invoke(cli, ["import", "pause", str(job), "--user", "someone-else"])
        assert out.exit_code == 1 and f"no import job {job} for user someone-else" in out.output
        out = runner.invoke(cli, ["import", "pause", str(job), "--user", user_id])
        assert out.exit_code == 0 and "paused: 2 batch(es) held" in out.output, out.output
        out = runner.invoke(cli, ["import", "cancel", str(job), "--keep"])
        assert out.exit_code == 0 and "cancelled: removed 0 unfinished" in out.output
    finally:
        _close(engine, job)


def test_a_held_batch_is_not_claimed(engine: Engine) -> None:
    job = _bulk_job(engine, f"held-{uuid.uuid4().hex[:6]}", 1)
    try:
        with engine.connect() as conn:
            batch_id = conn.execute(
                text("SELECT id FROM import_batch WHERE import_job_id = :j"), {"j": job}
            ).scalar_one()
        assert claim_batch(engine, batch_id, max_attempts=5) is None  # a stale message
    finally:
        _close(engine, job)


# --- through a real worker --------------------------------------------------------------------

# Small batches keep these fast; a global cap of one batch makes the order of releases the
# order of service, so round-robin and overtaking are visible in the rows.
FAIR_ENV = {
    "QUEUE_INGEST": "fair-ingest",
    "QUEUE_IMPORTS": "fair-imports",
    "QUEUE_MAINTENANCE": "fair-maintenance",
    "QUEUE_BULK": "fair-bulk",
    "BULK_IMPORT_THRESHOLD": "100",
    "BULK_BATCH_SIZE": "20",
    "BULK_MAX_IN_FLIGHT_PER_USER": "1",
    "BULK_MAX_IN_FLIGHT": "1",
    "BULK_RESERVE_SECONDS": "0",
    "WORKER_CONCURRENCY": "1",
}


@pytest.fixture(scope="module")
def fair(
    worker_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Settings]:
    """A worker of its own on queues of its own (the session's worker, if running, sees
    none of these messages), and the matching settings for this process."""
    settings = get_settings().model_copy(
        update={
            key.lower(): int(value) if value.isdigit() else value for key, value in FAIR_ENV.items()
        }
    )
    worker = WorkerProcess(
        tmp_path_factory.mktemp("fair") / "worker.log",
        env={**worker_env, **FAIR_ENV},
        queues="fair-ingest,fair-imports,fair-maintenance,fair-bulk",
        name="fair",
    ).start()
    try:
        worker.wait_ready()
        yield settings
    finally:
        worker.stop()


def export(n: int, prefix: str) -> bytes:
    entries = "\n".join(
        f'    <DT><A HREF="https://{prefix}.example.org/p/{i}" ADD_DATE="{1600000000 + i}">'
        f"Page {i} about {prefix} topic {i % 11}</A>"
        for i in range(n)
    )
    return (
        "<!DOCTYPE NETSCAPE-Bookmark-file-1>\n<TITLE>Bookmarks</TITLE>\n<DL><p>\n"
        f"{entries}\n</DL><p>\n"
    ).encode()


def start_import(settings: Settings, root: Path, user: str, n: int, prefix: str = "") -> int:
    path = root / f"{user}-{n}.html"
    path.write_bytes(export(n, prefix or user))
    return client.import_bookmarks(user, path, settings=settings)


def wait_until(what: str, check: Any, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def processed(user: str, job: int) -> int:
    p = client.import_status(user, job)
    assert p is not None
    return p.processed if p.status != "queued" else 0


def library(user: str) -> Any:
    """Bookmarks, distinct URLs, vectors, items done and items still waiting for a user."""
    with session_scope() as s:
        return s.execute(
            text(
                "SELECT count(*) AS bookmarks, count(DISTINCT b.canonical_url) AS urls, "
                "coalesce(sum((SELECT count(*) FROM embedding e WHERE e.item_id = b.item_id)), 0)"
                " AS vectors, count(*) FILTER (WHERE i.status = 'done') AS done, "
                "count(*) FILTER (WHERE i.status IN ('queued', 'processing')) AS waiting "
                "FROM bookmark b JOIN item i ON i.id = b.item_id WHERE b.user_id = :u"
            ),
            {"u": user},
        ).one()


@pytest.mark.integration
def test_two_users_imports_are_served_round_robin(
    fair: Settings, upload_root: Path, user_id: str
) -> None:
    ann, bob = f"{user_id}-ann", f"{user_id}-bob"
    jobs = {u: start_import(fair, upload_root, u, 120) for u in (ann, bob)}
    for user, job in jobs.items():
        done = client.wait_for_import(user, job, timeout=300)
        assert done.status == "done" and done.lane == "bulk", done
        assert done.processed == done.total == done.created == 120
        row = library(user)
        assert (row.bookmarks, row.urls, row.vectors, row.done) == (120, 120, 120, 120)
    with session_scope() as s:
        order = list(
            s.execute(
                text(
                    "SELECT user_id FROM import_batch WHERE import_job_id = ANY(:j) "
                    "ORDER BY released_at, id"
                ),
                {"j": list(jobs.values())},
            ).scalars()
        )
    assert sorted(order) == sorted([ann] * 6 + [bob] * 6)
    # Once both were staged (bob's first release), they alternate until one has no more.
    first_bob = order.index(bob)
    assert first_bob <= 2, order  # bob did not wait for ann's import
    tail = order[first_bob:]
    both = 2 * min(tail.count(ann), tail.count(bob))
    assert all(tail[i] != tail[i + 1] for i in range(both - 1)), order


@pytest.mark.integration
def test_an_upload_overtakes_a_big_import(fair: Settings, upload_root: Path, user_id: str) -> None:
    importer, uploader = f"{user_id}-bulk", f"{user_id}-up"
    job = start_import(fair, upload_root, importer, 400)
    wait_until("the import to embed", lambda: processed(importer, job) >= 40)
    doc = upload_root / f"{uploader}.md"
    doc.write_text("# Sourdough\n\nWild yeast ferments the dough slowly overnight.\n")
    before = processed(importer, job)
    item = client.enqueue_upload(uploader, doc, settings=fair)
    counts = client.wait_for_items(uploader, [item], timeout=120, poll=0.05)
    after = processed(importer, job)
    assert counts == {"done": 1}
    status = client.import_status(importer, job)
    assert status is not None and status.status == "processing"
    # It waited for the batch in hand (20 bookmarks), and perhaps one released with it,
    # not for the 15-odd batches still staged.
    assert after - before <= 2 * 20, (before, after)
    assert status.rate_per_s and status.eta_s  # progress shows a rate and an ETA
    assert client.cancel_import(importer, job)["ok"]
    assert library(importer).bookmarks == 0


@pytest.mark.integration
def test_pause_resume_loses_and_duplicates_nothing(
    fair: Settings, upload_root: Path, user_id: str
) -> None:
    job = start_import(fair, upload_root, user_id, 200)
    wait_until("the import to embed", lambda: processed(user_id, job) >= 40)
    result = client.pause_import(user_id, job)
    assert result["ok"] and result["status"] == "paused", result
    assert not client.pause_import(user_id, job)["ok"]  # already paused
    at_pause = processed(user_id, job)
    time.sleep(2)  # a batch in hand when pause came stores nothing and counts nothing
    status = client.import_status(user_id, job)
    assert status is not None and (status.status, status.note) == ("paused", "paused")
    assert status.processed == at_pause < status.total
    with session_scope() as s:
        held = s.execute(
            text(
                "SELECT count(*) FILTER (WHERE held) AS held, "
                "count(*) FILTER (WHERE status = 'processing') AS running "
                "FROM import_batch WHERE import_job_id = :j AND status <> 'done'"
            ),
            {"j": job},
        ).one()
    assert held.held > 0 and held.running == 0
    [row] = [r for r in imports_running(fair) if r["id"] == job]  # `worker status`
    assert (row["status"], row["lane"], row["note"]) == ("paused", "bulk", "paused")
    assert row["eta_s"] is None
    assert not client.resume_import(f"{user_id}-other", job, settings=fair)["ok"]  # not theirs
    assert client.resume_import(user_id, job, settings=fair)["ok"]
    final = client.wait_for_import(user_id, job, timeout=300)
    assert final.status == "done" and final.processed == final.total == 200, final
    row = library(user_id)
    assert (row.bookmarks, row.urls, row.vectors, row.done) == (200, 200, 200, 200)


@pytest.mark.integration
def test_cancel_removes_what_it_created_and_keep_keeps_the_embedded(
    fair: Settings, upload_root: Path, user_id: str, engine: Engine
) -> None:
    # keep: the embedded bookmarks stay; importing the file again adds exactly the rest.
    job = start_import(fair, upload_root, user_id, 200)
    wait_until("the import to embed", lambda: processed(user_id, job) >= 40)
    result = client.cancel_import(user_id, job, keep=True)
    assert result["ok"] and result["removed"] > 0, result
    kept = library(user_id)
    assert kept.bookmarks == kept.done == kept.vectors == 200 - result["removed"]
    assert kept.waiting == 0
    again = client.import_bookmarks(user_id, upload_root / f"{user_id}-200.html", settings=fair)
    redone = client.wait_for_import(user_id, again, timeout=300)
    assert redone.status == "done" and redone.created == result["removed"]
    row = library(user_id)
    assert (row.bookmarks, row.urls, row.vectors, row.done) == (200, 200, 200, 200)

    # without keep: everything it created goes; bookmarks merged into it stay.
    other = f"{user_id}-b"
    small = upload_root / f"{other}-few.html"
    small.write_bytes(export(5, other))  # the first 5 URLs of the big import
    first = client.import_bookmarks(other, small, settings=fair)
    assert client.wait_for_import(other, first, timeout=120).status == "done"
    job = start_import(fair, upload_root, other, 200)
    wait_until("the import to embed", lambda: processed(other, job) >= 25)
    result = client.cancel_import(other, job)
    assert result["ok"] and result["removed"] == 195, result
    row = library(other)
    assert (row.bookmarks, row.vectors, row.done, row.waiting) == (5, 5, 5, 0)
    status = client.import_status(other, job)
    assert status is not None and status.status == "cancelled" and status.finished
    with session_scope() as s:
        batches = s.execute(
            text("SELECT count(*) FROM import_batch WHERE import_job_id = :j"), {"j": job}
        ).scalar_one()
    assert batches == 0
    assert not client.cancel_import(other, first)["ok"]  # a finished import
    assert control.cancel(engine, job, user_id=f"{other}-x").status is None  # not theirs
