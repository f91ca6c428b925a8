"""A task takes the user's other queued uploads along (store.adopted_uploads), so that the
model runs on batches cut from many documents: each item still gets its own claim, outcome
and transaction, another user's items are never taken, and an item whose group cannot
finish it goes back to the queue. The pipeline is called in-process against the real
database and the real model; no message is sent."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import Engine, text

from worker.config import Settings, get_settings
from worker.db import queries
from worker.db.engine import session_scope
from worker.ingest import process, store
from worker.runtime import default_embedder

pytestmark = pytest.mark.integration

PARAGRAPH = (
    "The {n} lighthouse keeper climbed the stairs at dusk. He trimmed the wick, wound the "
    "clockwork and watched the beam sweep across the bay where the fishing boats came home."
)


@pytest.fixture(autouse=True)
def _leave_nothing_queued(user_id: str) -> Iterator[None]:
    """Rows left queued or processing would be resent by other tests' requeue runs."""
    yield
    with session_scope() as s:
        s.execute(text("DELETE FROM item WHERE user_id IN (:u, :u || '-other')"), {"u": user_id})


def enqueue(root: Path, user_id: str, name: str, body: str, *, size: int | None = None) -> int:
    """An upload row as the client registers it, with no message sent."""
    path = root / user_id / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body, encoding="utf-8")
    with session_scope() as s:
        return queries.insert_upload(
            s,
            user_id=user_id,
            file_path=str(path.relative_to(root)),
            filename=name,
            original_filename=None,
            file_size=len(body.encode()) if size is None else size,
            mime_type=None,
        )


def story(n: int, paragraphs: int) -> str:
    words = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth")
    return "\n\n".join(PARAGRAPH.format(n=words[(n + k) % len(words)]) for k in range(paragraphs))


def statuses(ids: list[int]) -> dict[int, tuple[str, int]]:
    with session_scope() as s:
        rows = s.execute(
            text("SELECT id, status, attempts FROM item WHERE id = ANY(:ids)"), {"ids": ids}
        ).all()
    return {r.id: (r.status, r.attempts) for r in rows}


def settings(**update: Any) -> Settings:
    return get_settings().model_copy(update=update)


def fail_write(monkeypatch: pytest.MonkeyPatch, item_id: int, error: BaseException) -> None:
    """``store.write_upload`` raises ``error`` for ``item_id`` and writes the others."""
    real_write = store.write_upload

    def write_upload(engine: Engine, claim: store.Claim, **kwargs: Any) -> bool:
        if claim.item_id == item_id:
            raise error
        return real_write(engine, claim, **kwargs)

    monkeypatch.setattr(store, "write_upload", write_upload)


def test_a_task_takes_the_users_queued_uploads_along(
    upload_root: Path, user_id: str, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="worker")
    other = f"{user_id}-other"
    theirs = [enqueue(upload_root, other, f"o{i}.txt", story(i, 2)) for i in range(2)]
    # Sizes from one paragraph to twelve, so that the shared batches mix lengths; one empty
    # file among them fails alone.
    ours = [enqueue(upload_root, user_id, f"d{i}.txt", story(i, 1 + 3 * i)) for i in range(4)]
    empty = enqueue(upload_root, user_id, "empty.txt", "")
    left = enqueue(upload_root, user_id, "later.txt", story(7, 2))

    first = process.process_upload(
        ours[0],
        trace_id="task-1",
        settings=settings(upload_group_items=5, worker_concurrency=1),
        engine=engine,
    )
    assert (first.status, first.group) == ("done", 5)
    after = statuses([*ours, empty, left, *theirs])
    # Each adopted item was claimed once, like its own message would have done.
    assert {i: after[i] for i in ours} == {i: ("done", 1) for i in ours}
    assert after[empty] == ("skipped", 1)
    assert after[left][0] == "queued"  # past the group's size
    assert {after[i][0] for i in theirs} == {"queued"}  # never another user's
    # One outcome line per item, as if each had had its own task.
    said = [re.match(r"item (\d+) (\w+) \(", r.getMessage()) for r in caplog.records]
    outcomes = [(int(m[1]), m[2]) for m in said if m]
    assert sorted(outcomes) == sorted([*((i, "done") for i in ours), (empty, "skipped")])

    embedder = default_embedder()
    with session_scope() as s:
        for item_id in ours:
            rows = s.execute(
                text(
                    "SELECT e.chunk_index, e.content, e.embedding::text AS v, a.trace_id "
                    "FROM embedding e JOIN analysis a ON a.id = e.analysis_id "
                    "WHERE e.item_id = :i ORDER BY e.chunk_index"
                ),
                {"i": item_id},
            ).all()
            assert [r.chunk_index for r in rows] == list(range(-1, len(rows) - 1))
            assert {r.trace_id for r in rows} == {"task-1"}
            # Cut back to the right item: each stored vector is its own text's.
            stored = np.array([[float(x) for x in r.v.strip("[]").split(",")] for r in rows])
            alone = embedder.encode([r.content for r in rows])
            np.testing.assert_allclose(stored, alone, atol=2e-3)

    # The adopted items' own messages, when they come, find them done.
    assert process.process_upload(ours[2], engine=engine).status == "finished"
    assert process.process_upload(left, engine=engine).status == "done"

    # An unchanged re-upload needs no model: it is done at once and takes nothing along.
    again = [enqueue(upload_root, user_id, f"d{i}.txt", story(i, 1 + 3 * i)) for i in range(2)]
    assert again == ours[:2]
    one = settings(upload_group_items=5, worker_concurrency=1)
    redo = process.process_upload(ours[0], settings=one, engine=engine)
    assert (redo.status, redo.group) == ("unchanged", 1)
    assert statuses([ours[1]])[ours[1]][0] == "queued"


def test_an_adopted_item_is_left_alone_while_its_group_lives(
    upload_root: Path, user_id: str, engine: Engine
) -> None:
    ids = [enqueue(upload_root, user_id, f"d{i}.txt", story(i, 1)) for i in range(4)]
    big = enqueue(upload_root, user_id, "big.txt", story(5, 1), size=10_000)
    tired = enqueue(upload_root, user_id, "tired.txt", story(6, 1))
    with session_scope() as s:
        s.execute(text("UPDATE item SET attempts = 5 WHERE id = :i"), {"i": tired})
    claim = store.claim_upload(engine, ids[0], max_attempts=5).claim
    assert claim is not None
    with store.adopted_uploads(engine, claim, limit=10, max_bytes=1_000, max_attempts=5) as adopted:
        # Taken in id order until the bytes run out; an item out of attempts stays for its
        # own message (which fails it with the reason).
        assert [c.item_id for c in adopted] == ids[1:]
        assert all(c.attempt == 1 and c.user_id == user_id for c in adopted)
        # Its message meanwhile is acknowledged, not a second claim; so is a redelivery of
        # the group's own item.
        for item_id in ids[:2]:
            again = store.claim_upload(engine, item_id, max_attempts=5)
            assert (again.claim, again.reason) == (None, "adopted")
        assert statuses([ids[1]])[ids[1]] == ("processing", 1)
    # The group's connection is gone (as when its worker dies): the message claims the item.
    again = store.claim_upload(engine, ids[1], max_attempts=5)
    assert again.claim is not None and again.claim.attempt == 2
    assert statuses([big])[big] == ("queued", 0)


def test_an_item_its_group_cannot_finish_goes_back_to_the_queue(
    upload_root: Path, user_id: str, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = [enqueue(upload_root, user_id, f"d{i}.txt", story(i, 2)) for i in range(3)]
    fail_write(monkeypatch, ids[1], ConnectionError("the database went away"))
    sent: list[int] = []
    free_when_sent: list[bool] = []

    def resend(item_id: int) -> None:
        # The group's lock on the item is gone by then: should the worker that claims the
        # resent message die in turn, its redelivery claims the item again at once.
        with engine.connect() as conn:
            lock = store._GROUP_LOCK.format(":id")
            free_when_sent.append(
                conn.execute(
                    text(f"SELECT pg_try_advisory_lock({lock})"), {"id": item_id}
                ).scalar_one()
            )
            conn.execute(text("SELECT pg_advisory_unlock_all()"))
        sent.append(item_id)

    one = settings(worker_concurrency=1)
    first = process.process_upload(ids[0], settings=one, engine=engine, resend=resend)
    assert first.status == "done"
    after = statuses(ids)
    assert after[ids[1]] == ("queued", 1) and sent == [ids[1]] and free_when_sent == [True]
    assert after[ids[2]] == ("done", 1)

    # When the task's own item meets the error (its write still fails), the others still
    # finish and the task gets the exception (to retry it, or record it).
    late = enqueue(upload_root, user_id, "late.txt", story(3, 1))
    with pytest.raises(ConnectionError):
        process.process_upload(ids[1], settings=one, engine=engine, resend=sent.append)
    assert statuses([ids[1], late]) == {ids[1]: ("processing", 2), late: ("done", 1)}


def test_when_nothing_can_be_sent_back_the_requeue_task_has_it(
    upload_root: Path,
    user_id: str,
    engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The database goes away after the task's own item was written: the other item cannot
    be written nor sent back. It stays ``processing`` (the requeue task resends it once its
    claim is stale), still gets its outcome line, and the task is told its item is done."""
    caplog.set_level(logging.INFO, logger="worker")
    ids = [enqueue(upload_root, user_id, f"d{i}.txt", story(i, 2)) for i in range(2)]
    fail_write(monkeypatch, ids[1], ConnectionError("the database went away"))

    def release_claims(engine: Engine, claims: Any) -> list[int]:
        raise ConnectionError("still away")

    monkeypatch.setattr(store, "release_claims", release_claims)
    sent: list[int] = []
    own = process.process_upload(
        ids[0], settings=settings(worker_concurrency=1), engine=engine, resend=sent.append
    )
    assert own.status == "done" and sent == []
    assert statuses(ids) == {ids[0]: ("done", 1), ids[1]: ("processing", 1)}
    said = [re.match(r"item (\d+) (\w+) \(", r.getMessage()) for r in caplog.records]
    assert sorted((int(m[1]), m[2]) for m in said if m) == [(ids[0], "done"), (ids[1], "error")]


def test_a_group_leaves_the_other_processes_their_share(
    upload_root: Path, user_id: str, engine: Engine
) -> None:
    ids = [enqueue(upload_root, user_id, f"d{i}.txt", story(i, 1)) for i in range(8)]
    claim = store.claim_upload(engine, ids[0], max_attempts=5).claim
    assert claim is not None
    # Seven wait and three processes share them: this task takes two, so that a burst
    # still runs on every process.
    with store.adopted_uploads(
        engine, claim, limit=15, max_bytes=10**6, max_attempts=5, processes=3
    ) as adopted:
        assert [c.item_id for c in adopted] == ids[1:3]
    one = store.claim_upload(engine, ids[7], max_attempts=5).claim
    assert one is not None
    # Four wait (two are being processed) for five processes: none is taken.
    with store.adopted_uploads(
        engine, one, limit=15, max_bytes=10**6, max_attempts=5, processes=5
    ) as adopted:
        assert adopted == []


def test_the_time_limit_stops_the_whole_group(
    upload_root: Path, user_id: str, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from celery.exceptions import SoftTimeLimitExceeded

    ids = [enqueue(upload_root, user_id, f"d{i}.txt", story(i, 2)) for i in range(3)]
    fail_write(monkeypatch, ids[1], SoftTimeLimitExceeded())
    sent: list[int] = []
    one = settings(worker_concurrency=1)
    # The task's own item was written before the limit: the task is told it is done (not
    # that it failed, which would retry or record a failure for a done item).
    own = process.process_upload(ids[0], settings=one, engine=engine, resend=sent.append)
    assert own.status == "done" and own.chunks > 0
    # What was written stays; the rest of the group is not processed past the limit but
    # goes back to the queue.
    assert statuses(ids) == {ids[0]: ("done", 1), ids[1]: ("queued", 1), ids[2]: ("queued", 1)}
    assert sent == ids[1:]

    # When the limit strikes before the task's own item is written, the task gets it.
    fail_write(monkeypatch, ids[1], SoftTimeLimitExceeded())
    with pytest.raises(SoftTimeLimitExceeded):
        process.process_upload(ids[1], settings=one, engine=engine, resend=sent.append)
    assert statuses(ids[1:]) == {ids[1]: ("processing", 2), ids[2]: ("queued", 2)}
    assert sent == [ids[1], ids[2], ids[2]]


def test_a_groups_connection_asks_the_server_to_notice_a_dead_host(
    upload_root: Path, user_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The group's locks go when its connection does; a host that dies without closing it is
    noticed by the server's keepalive probes in about two minutes, not two hours. The
    server's own values are back before the connection returns to the pool."""
    from worker.db.engine import make_engine

    names = list(store.GROUP_KEEPALIVE)

    def current(conn: Any) -> dict[str, str]:
        rows = conn.execute(
            text("SELECT name, setting FROM pg_settings WHERE name = ANY(:n)"), {"n": names}
        )
        return dict(rows.all())

    # One pooled connection: the group's is the one the next checkout gets back.
    engine = make_engine(settings(db_pool_size=1, db_max_overflow=0))
    try:
        ids = [enqueue(upload_root, user_id, f"d{i}.txt", story(i, 1)) for i in range(2)]
        claim = store.claim_upload(engine, ids[0], max_attempts=5).claim
        assert claim is not None
        with engine.connect() as conn:
            before = current(conn)
        assert before != store.GROUP_KEEPALIVE
        seen: list[dict[str, str]] = []
        adopt = store._adopt

        def spy(conn: Any, *args: Any) -> list[store.Claim]:
            seen.append(current(conn))
            return adopt(conn, *args)

        monkeypatch.setattr(store, "_adopt", spy)
        with store.adopted_uploads(
            engine, claim, limit=5, max_bytes=10**6, max_attempts=5
        ) as adopted:
            assert [c.item_id for c in adopted] == ids[1:]
        assert seen == [store.GROUP_KEEPALIVE]  # over TCP, as the tests connect
        with engine.connect() as conn:
            assert current(conn) == before
    finally:
        engine.dispose()
