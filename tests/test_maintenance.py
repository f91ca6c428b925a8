"""Scheduled upkeep against the real PostgreSQL + pgvector (issue 7).

These tests commit (concurrent builds, VACUUM and advisory locks need real transactions), so
each works on rows of its own users and deletes them at the end. Nothing asserts on timing:
where two things must overlap, one is held up deterministically (an open writer transaction
makes ``REINDEX … CONCURRENTLY`` wait) instead of hoping the machine is slow enough.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
from sqlalchemy import Connection, Engine, text

from worker.app import (
    TASK_DISPATCH_BULK,
    TASK_EMBED_BOOKMARKS,
    TASK_IMPORT_BOOKMARKS,
    TASK_MAINT_INDEXES,
    TASK_MAINT_PURGE,
    TASK_MAINT_REQUEUE,
    TASK_MAINT_STATS,
    TASK_MAINT_VACUUM,
    TASK_PROCESS_UPLOAD,
    beat_schedule,
)
from worker.config import DEFAULT_MODEL, get_settings, load_settings
from worker.db.indexes import IndexSpec, index_state
from worker.maintenance import indexes as upkeep
from worker.maintenance.purge import purge_deleted
from worker.maintenance.requeue import find_and_requeue
from worker.maintenance.runs import history, maintenance_run, table_stats
from worker.maintenance.stats import snapshot
from worker.maintenance.vacuum import run_vacuum

DIM = 384
SPEC = IndexSpec(DEFAULT_MODEL, DIM)
pytestmark = pytest.mark.integration


# --- helpers -------------------------------------------------------------------------------


def clustered(n: int, rng: np.random.Generator, clusters: int = 20) -> np.ndarray:
    """Normalised 384-d vectors around a few centres (text embeddings cluster too)."""
    centres = rng.standard_normal((clusters, DIM)).astype(np.float32)
    points = centres[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, DIM))
    points = points.astype(np.float32)
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def new_items(conn: Connection, user: str, n: int, **cols: Any) -> list[int]:
    names = ", ".join(cols)
    values = ", ".join(f":{c}" for c in cols)
    rows = conn.execute(
        text(
            f"INSERT INTO item (user_id, kind, status{', ' + names if cols else ''}) "
            f"SELECT :u, 'upload', 'done'{', ' + values if cols else ''} "
            "FROM generate_series(1, :n) RETURNING id"
        ),
        {"u": user, "n": n, **cols},
    )
    return [int(r[0]) for r in rows]


def copy_vectors(
    conn: Connection,
    user: str,
    item_ids: list[int],
    vectors: np.ndarray,
    model: str = DEFAULT_MODEL,
) -> None:
    """Binary COPY through the engine's psycopg connection (pgvector adapters registered)."""
    raw = conn.connection.driver_connection
    assert raw is not None
    sql = (
        "COPY embedding (item_id, user_id, chunk_index, content, embedding, model, dimensions) "
        "FROM STDIN WITH (FORMAT BINARY)"
    )
    with raw.cursor() as cur, cur.copy(sql) as copy:
        copy.set_types(["int8", "text", "int4", "text", "vector", "text", "int4"])
        for i, vec in enumerate(vectors):
            item = item_ids[i % len(item_ids)]
            copy.write_row((item, user, i // len(item_ids), "", vec, model, DIM))


def load_user(engine: Engine, user: str, n: int, rng: np.random.Generator, items: int = 0) -> None:
    with engine.begin() as conn:
        ids = new_items(conn, user, items or max(1, n // 50))
        copy_vectors(conn, user, ids, clustered(n, rng))


def flush_stats(conn: Connection) -> None:
    """Make this backend publish its table counters when the transaction ends."""
    conn.execute(text("SELECT pg_stat_force_next_flush()"))


def wait_for(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def dead_tuples(engine: Engine, table: str) -> int:
    with engine.connect() as conn:
        return int(table_stats(conn, [table])[table]["dead"])


def reindex_running(engine: Engine) -> bool:
    with engine.connect() as conn:
        return bool(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_progress_create_index "
                    "WHERE relid = 'embedding_main'::regclass AND command LIKE 'REINDEX%'"
                )
            ).scalar()
        )


class Writer:
    """An open transaction that has written to ``embedding``: ``REINDEX … CONCURRENTLY``
    waits for it before building, which holds a rebuild in progress for as long as a
    test needs."""

    def __init__(self, engine: Engine, user: str, rng: np.random.Generator) -> None:
        self.conn = engine.connect()
        self.conn.begin()
        ids = new_items(self.conn, user, 1)
        copy_vectors(self.conn, user, ids, clustered(1, rng))

    def release(self) -> None:
        self.conn.commit()
        self.conn.close()


class Runner(threading.Thread):
    """Run ``fn`` in a thread, keeping its result or exception."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.fn = fn
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:
            self.error = exc


@pytest.fixture
def users(engine: Engine) -> Iterator[Callable[[], str]]:
    """New user ids; their items (and, by cascade, vectors) are deleted after the test."""
    made: list[str] = []

    def make() -> str:
        made.append(f"maint-{uuid.uuid4().hex[:10]}")
        return made[-1]

    yield make
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM item WHERE user_id = ANY(:u)"), {"u": made})
        conn.execute(text("DELETE FROM import_job WHERE user_id = ANY(:u)"), {"u": made})


@pytest.fixture
def no_autovacuum(engine: Engine) -> Iterator[None]:
    """Autovacuum could clean the dead tuples a test made before the code under test sees
    them; switched off on the two tables for the test only."""
    with engine.begin() as conn:
        for table in ("item", "embedding_main"):
            conn.execute(text(f"ALTER TABLE {table} SET (autovacuum_enabled = false)"))
    yield
    with engine.begin() as conn:
        for table in ("item", "embedding_main"):
            conn.execute(text(f"ALTER TABLE {table} RESET (autovacuum_enabled)"))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


def latest_runs(engine: Engine, kind: str, since: Any) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT id, status, details FROM maintenance_run "
                "WHERE kind = :k AND started_at >= :s ORDER BY id"
            ),
            {"k": kind, "s": since},
        )
        return [dict(r._mapping) for r in rows]


def db_now(engine: Engine) -> Any:
    with engine.connect() as conn:
        return conn.execute(text("SELECT now()")).scalar_one()


# --- runs: lock and record -------------------------------------------------------------------


def test_maintenance_run_records_and_skips_when_locked(engine: Engine) -> None:
    target = f"t-{uuid.uuid4().hex[:6]}"
    with maintenance_run(engine, "test", target) as outer:
        assert not outer.skipped
        outer.details["seen"] = 1
        with maintenance_run(engine, "test", target) as inner:
            assert inner.skipped
    rows = [r for r in history(engine, limit=50) if r["target"] == target]
    by_status = {r["status"]: r for r in rows}
    assert set(by_status) == {"done", "skipped"}
    assert by_status["done"]["details"]["seen"] == 1
    assert by_status["done"]["finished_at"] is not None
    assert by_status["skipped"]["details"] == {"reason": "another run holds the lock"}


def test_maintenance_run_records_failure_and_releases_the_lock(engine: Engine) -> None:
    target = f"t-{uuid.uuid4().hex[:6]}"
    with pytest.raises(RuntimeError), maintenance_run(engine, "test", target):
        raise RuntimeError("boom")
    with maintenance_run(engine, "test", target) as again:
        assert not again.skipped  # the lock went with the failed run
    failed = [r for r in history(engine, limit=50) if r["target"] == target][-1]
    assert failed["status"] == "failed"
    assert "RuntimeError: boom" in failed["details"]["error"]


def test_a_run_left_running_by_a_dead_process_is_closed(engine: Engine) -> None:
    target = f"t-{uuid.uuid4().hex[:6]}"
    with engine.begin() as conn:
        stale = conn.execute(
            text("INSERT INTO maintenance_run (kind, target) VALUES ('test', :t) RETURNING id"),
            {"t": target},
        ).scalar_one()
    with maintenance_run(engine, "test", target):
        pass
    [row] = [r for r in history(engine, limit=50) if r["id"] == stale]
    assert row["status"] == "failed" and "interrupted" in row["details"]["error"]


# --- index upkeep ----------------------------------------------------------------------------


def test_upkeep_measures_rebuilds_after_churn_and_records(
    engine: Engine, users: Callable[[], str], rng: np.random.Generator, no_autovacuum: None
) -> None:
    big, small = users(), users()
    load_user(engine, big, 2800, rng)
    load_user(engine, small, 40, rng)
    with engine.begin() as conn:  # many deletes: 2000 dead tuples in the table
        conn.execute(
            text("DELETE FROM embedding WHERE user_id = :u AND chunk_index % 7 <> 0"), {"u": big}
        )
        flush_stats(conn)
    wait_for(lambda: dead_tuples(engine, "embedding_main") >= 2000, "dead tuples in pg_stat")
    since = db_now(engine)

    result = upkeep.run_index_upkeep(engine, get_settings(), sample_size=30, models=[DEFAULT_MODEL])

    seen = result["models"][DEFAULT_MODEL]
    assert seen["drift"]["dead_share"] > 0.2
    assert any(r.startswith("dead tuples") for r in seen["reasons"])
    assert seen["decision"] == "rebuilt: reindex concurrently"
    before, after = seen["recall_before"], seen["recall_after"]
    assert 0.0 <= before["recall"] <= 1.0 and before["queries"] == 30
    assert 0.0 <= after["recall"] <= 1.0 and after["index_used"] is True
    assert seen["vacuum"]["dead_after"] < 2000  # VACUUM right after the rebuild
    tenants = {t["user_id"]: t for t in seen["tenants"]}
    with engine.connect() as conn:  # other test modules may leave a larger tenant behind
        largest = conn.execute(
            text(
                "SELECT user_id FROM embedding WHERE model = :m GROUP BY user_id "
                "ORDER BY count(*) DESC, user_id LIMIT 1"
            ),
            {"m": DEFAULT_MODEL},
        ).scalar_one()
    assert largest in tenants  # the largest tenant is always sampled
    assert all(t["returned_mean"] is not None for t in tenants.values())

    [run] = latest_runs(engine, "indexes", since)
    assert run["status"] == "done"
    recorded = run["details"]["models"][DEFAULT_MODEL]
    assert recorded["recall_before"]["recall"] == before["recall"]
    assert recorded["recall_after"]["recall"] == after["recall"]
    with engine.connect() as conn:
        model = conn.execute(
            text("SELECT * FROM embedding_model WHERE name = :n"), {"n": DEFAULT_MODEL}
        ).one()
        rows = upkeep.count_rows(conn, DEFAULT_MODEL)
        assert index_state(conn, SPEC.name) == "valid"
    assert model.last_recall == pytest.approx(after["recall"])
    assert model.last_recall_at is not None and model.built_at is not None
    assert model.rows_at_build == seen["drift"]["rows"] == rows
    assert model.index_params["ef_search"] == after["hnsw.ef_search"]


def test_inserts_keep_working_during_reindex_concurrently(
    engine: Engine, users: Callable[[], str], rng: np.random.Generator
) -> None:
    user = users()
    load_user(engine, user, 400, rng)
    writer = Writer(engine, user, rng)  # the rebuild waits for this transaction
    rebuild = Runner(lambda: upkeep.rebuild(engine, SPEC, True))
    rebuild.start()
    try:
        wait_for(lambda: reindex_running(engine), "REINDEX CONCURRENTLY to start")
        fresh = clustered(20, rng)
        with engine.begin() as conn:  # committed while the rebuild is in progress
            fresh_ids = new_items(conn, user, 20)
            copy_vectors(conn, user, fresh_ids, fresh)
        assert rebuild.is_alive() and reindex_running(engine)
    finally:
        writer.release()
    while rebuild.is_alive():  # and more while it builds, until it ends
        # New vectors each time: hundreds of exact duplicates would wall off a corner of
        # the HNSW graph (their neighbour lists fill with each other), which is not what
        # this test is about.
        with engine.begin() as conn:
            copy_vectors(conn, user, new_items(conn, user, 20), clustered(20, rng))
    rebuild.join()
    assert rebuild.error is None and rebuild.result == "reindex concurrently"
    with engine.connect() as conn:
        assert index_state(conn, SPEC.name) == "valid"
        conn.commit()
        # The vectors written during the rebuild are in the new index: each finds itself.
        with conn.begin():
            conn.execute(text("SET LOCAL enable_seqscan = off"))
            conn.execute(text("SET LOCAL enable_sort = off"))
            conn.execute(text("SET LOCAL hnsw.ef_search = 100"))
            for item_id, vec in zip(fresh_ids[:5], fresh[:5], strict=True):
                nearest = conn.execute(
                    text(
                        "SELECT item_id FROM embedding "
                        f"WHERE model = '{DEFAULT_MODEL}' "
                        "ORDER BY (embedding::vector(384)) <=> CAST(:q AS vector(384)) LIMIT 1"
                    ),
                    {"q": vec},
                ).scalar_one()
                assert nearest == item_id


def test_two_runs_together_give_one_rebuild_and_one_skip(
    engine: Engine, users: Callable[[], str], rng: np.random.Generator
) -> None:
    user = users()
    load_user(engine, user, 300, rng)
    since = db_now(engine)
    settings = get_settings()
    writer = Writer(engine, user, rng)  # whichever run wins waits in REINDEX for it
    barrier = threading.Barrier(2)

    def one_run() -> dict[str, Any]:
        barrier.wait()
        return upkeep.run_index_upkeep(
            engine, settings, force=True, sample_size=10, models=[DEFAULT_MODEL]
        )

    runs = [Runner(one_run), Runner(one_run)]
    try:
        for r in runs:
            r.start()
        wait_for(lambda: any(not r.is_alive() for r in runs), "one run to skip")
    finally:
        writer.release()
    for r in runs:
        r.join()
        assert r.error is None
    results = sorted((r.result for r in runs), key=lambda res: bool(res["skipped"]))
    done, skipped = results
    assert skipped["skipped"] is True and skipped["reason"] == "another run holds the lock"
    assert done["models"][DEFAULT_MODEL]["decision"].startswith("rebuilt")
    statuses = sorted(r["status"] for r in latest_runs(engine, "indexes", since))
    assert statuses == ["done", "skipped"]


def test_invalid_index_from_failed_concurrent_build_is_dropped(engine: Engine) -> None:
    table = f"maint_scratch_{uuid.uuid4().hex[:6]}"
    index = f"{table}_v_uq"
    with engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE {table} (v int)"))
        conn.execute(text(f"INSERT INTO {table} VALUES (1), (1)"))
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            with pytest.raises(Exception, match="could not create unique index"):
                conn.execute(text(f"CREATE UNIQUE INDEX CONCURRENTLY {index} ON {table} (v)"))
            assert index_state(conn, index) == "invalid"

        result = upkeep.run_index_upkeep(engine, get_settings(), models=[])

        dropped = {i["index"]: i for i in result["invalid_indexes"]}
        assert dropped[index]["dropped"] is True
        with engine.connect() as conn:
            assert index_state(conn, index) == "missing"
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"DROP TABLE IF EXISTS {table}"))


def test_dry_run_reports_without_changing(
    engine: Engine, users: Callable[[], str], rng: np.random.Generator
) -> None:
    load_user(engine, users(), 200, rng)
    with engine.connect() as conn:
        before = conn.execute(
            text("SELECT built_at, index_params FROM embedding_model WHERE name = :n"),
            {"n": DEFAULT_MODEL},
        ).one()
        runs_before = conn.execute(text("SELECT count(*) FROM maintenance_run")).scalar()
    result = upkeep.run_index_upkeep(
        engine, get_settings(), dry_run=True, force=True, sample_size=10, models=[DEFAULT_MODEL]
    )
    assert result["models"][DEFAULT_MODEL]["decision"] == "would rebuild"
    with engine.connect() as conn:
        after = conn.execute(
            text("SELECT built_at, index_params FROM embedding_model WHERE name = :n"),
            {"n": DEFAULT_MODEL},
        ).one()
        runs_after = conn.execute(text("SELECT count(*) FROM maintenance_run")).scalar()
    assert tuple(after) == tuple(before) and runs_after == runs_before


def test_ivfflat_model_is_created_when_trainable_and_rebuilt_with_new_lists(
    engine: Engine, users: Callable[[], str], rng: np.random.Generator
) -> None:
    model = f"maint-ivf-{uuid.uuid4().hex[:6]}"
    spec = IndexSpec(model, DIM, kind="ivfflat")
    user = users()
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO embedding_model (name, dimensions, index_kind, state) "
                "VALUES (:n, :d, 'ivfflat', 'backfilling')"
            ),
            {"n": model, "d": DIM},
        )
    try:

        def add(n: int) -> None:
            with engine.begin() as conn:
                ids = new_items(conn, user, max(1, n // 50))
                copy_vectors(conn, user, ids, clustered(n, rng), model=model)

        settings = get_settings()
        add(500)
        first = upkeep.run_index_upkeep(engine, settings, sample_size=10, models=[model])
        assert first["models"][model]["decision"].startswith("wait")  # too few to train on
        add(1700)
        second = upkeep.run_index_upkeep(engine, settings, sample_size=20, models=[model])
        created = second["models"][model]
        assert created["decision"] == "created (missing)"
        assert created["recall_after"]["index_used"] is True
        with engine.connect() as conn:
            params = conn.execute(
                text("SELECT index_params FROM embedding_model WHERE name = :n"), {"n": model}
            ).scalar_one()
        assert params["lists"] == 10 and params["probes"] >= 1

        add(2000)  # rows grew > 50%: new lists, built beside the old index and swapped in
        third = upkeep.run_index_upkeep(engine, settings, sample_size=20, models=[model])
        rebuilt = third["models"][model]
        assert rebuilt["decision"] == "rebuilt: build concurrently + swap"
        with engine.connect() as conn:
            assert index_state(conn, spec.name) == "valid"
            assert index_state(conn, f"{spec.name}_new") == "missing"
            params = conn.execute(
                text("SELECT index_params FROM embedding_model WHERE name = :n"), {"n": model}
            ).scalar_one()
        assert params["lists"] == 10  # 4200 rows / 1000, at least 10
        assert upkeep.ivfflat_lists(5_000_000) == int(5_000_000**0.5)
    finally:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM embedding WHERE model = :n"), {"n": model})
            conn.execute(text("DELETE FROM embedding_model WHERE name = :n"), {"n": model})
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f"DROP INDEX IF EXISTS {spec.name}"))


# --- vacuum ----------------------------------------------------------------------------------


def test_vacuum_lowers_dead_tuples_and_rebuilds_churned_hnsw_first(
    engine: Engine, users: Callable[[], str], rng: np.random.Generator, no_autovacuum: None
) -> None:
    user = users()
    with engine.begin() as conn:
        ids = new_items(conn, user, 1500)
        copy_vectors(conn, user, ids, clustered(1500, rng))
    with engine.begin() as conn:  # cascades: 1500 dead items and 1500 dead vectors
        conn.execute(text("DELETE FROM item WHERE user_id = :u"), {"u": user})
        flush_stats(conn)
    wait_for(
        lambda: (
            dead_tuples(engine, "item") >= 1500 and dead_tuples(engine, "embedding_main") >= 1500
        ),
        "dead tuples in pg_stat",
    )

    result = run_vacuum(engine)

    tables = {t["table"]: t for t in result["tables"]}
    for name in ("item", "embedding_main"):
        assert tables[name]["dead_before"] >= 1500
        assert tables[name]["dead_after"] < tables[name]["dead_before"]
    actions = {e["index"]: e["action"] for e in tables["embedding_main"]["pre_rebuild"]}
    assert actions[SPEC.name] == "reindex concurrently"
    assert dead_tuples(engine, "item") < 1500


def test_vacuum_force_tables_rejects_unknown_names(engine: Engine) -> None:
    with pytest.raises(ValueError, match="unknown tables"):
        run_vacuum(engine, force_tables=["no_such_table; DROP TABLE item"])


# --- requeue ---------------------------------------------------------------------------------


def test_requeue_resends_once_and_gives_up_past_max_attempts(
    engine: Engine, users: Callable[[], str]
) -> None:
    settings = load_settings(stuck_after_seconds=600, max_attempts=5)
    user = users()
    old = "now() - interval '2 hours'"
    with engine.begin() as conn:

        def item(kind: str, status: str, attempts: int, error: str | None, age: str) -> int:
            return int(
                conn.execute(
                    text(
                        "INSERT INTO item (user_id, kind, status, attempts, error, updated_at) "
                        f"VALUES (:u, :k, :s, :a, :e, {age}) RETURNING id"
                    ),
                    {"u": user, "k": kind, "s": status, "a": attempts, "e": error},
                ).scalar_one()
            )

        def job(status: str, age: str) -> int:
            return int(
                conn.execute(
                    text(
                        "INSERT INTO import_job (user_id, filename, status, updated_at) "
                        f"VALUES (:u, 'b.html', :s, {age}) RETURNING id"
                    ),
                    {"u": user, "s": status},
                ).scalar_one()
            )

        stuck = item("upload", "queued", 1, None, old)
        exhausted = item("upload", "processing", 5, "boom", old)
        fresh = item("upload", "queued", 0, None, "now()")
        bookmark = item("bookmark", "queued", 0, None, old)
        lone_job = job("queued", old)
        busy_job = job("processing", "now()")
        batch_ids = []
        for seq, attempts in enumerate((1, 5)):
            batch_ids.append(
                conn.execute(
                    text(
                        "INSERT INTO import_batch (import_job_id, user_id, seq, item_ids, "
                        f"attempts, updated_at) VALUES (:j, :u, :s, :ids, :a, {old}) RETURNING id"
                    ),
                    {"j": busy_job, "u": user, "s": seq, "ids": [bookmark], "a": attempts},
                ).scalar_one()
            )
    stuck_batch, dead_batch = batch_ids
    mine = {stuck, exhausted, fresh, bookmark, lone_job, busy_job, *batch_ids}
    sent: list[tuple[str, list[Any], str]] = []

    def send(task: str, args: list[Any], queue: str) -> None:
        sent.append((task, args, queue))

    first = find_and_requeue(engine, settings, send)
    assert not first["skipped"]
    ours = sorted((t, a, q) for t, a, q in sent if a[0] in mine)
    assert ours == sorted(
        [
            (TASK_PROCESS_UPLOAD, [stuck], settings.queue_ingest),
            (TASK_EMBED_BOOKMARKS, [stuck_batch], settings.queue_ingest),
            (TASK_IMPORT_BOOKMARKS, [lone_job], settings.queue_imports),
        ]
    )
    with engine.connect() as conn:
        failed = conn.execute(
            text("SELECT status, error FROM item WHERE id = :i"), {"i": exhausted}
        ).one()
        batch = conn.execute(
            text("SELECT status, error FROM import_batch WHERE id = :i"), {"i": dead_batch}
        ).one()
        job_row = conn.execute(
            text("SELECT processed, failed_count FROM import_job WHERE id = :i"), {"i": busy_job}
        ).one()
    assert tuple(failed) == ("failed", "gave up after 5 attempts (last: boom)")
    assert tuple(batch) == ("failed", "gave up after 5 attempts (last: stuck in queued)")
    assert tuple(job_row) == (1, 1)  # the importer's bookkeeping ran for the failed batch

    sent.clear()
    second = find_and_requeue(engine, settings, send)
    assert not second["skipped"]
    assert [s for s in sent if s[1][0] in mine] == []  # touched: not resent at once


def test_requeue_dry_run_sends_nothing(engine: Engine, users: Callable[[], str]) -> None:
    user = users()
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO item (user_id, kind, status, updated_at) "
                "VALUES (:u, 'upload', 'queued', now() - interval '2 hours')"
            ),
            {"u": user},
        )
    sent: list[Any] = []
    result = find_and_requeue(engine, get_settings(), lambda *a: sent.append(a), dry_run=True)
    assert result["uploads"]["would_resend"] >= 1 and sent == []


# --- purge, stats, beat, CLI -----------------------------------------------------------------


def test_purge_deletes_only_items_deleted_long_ago(
    engine: Engine, users: Callable[[], str], rng: np.random.Generator
) -> None:
    user = users()
    with engine.begin() as conn:
        [old] = new_items(conn, user, 1)
        [recent] = new_items(conn, user, 1)
        copy_vectors(conn, user, [old], clustered(3, rng))
        conn.execute(
            text("UPDATE item SET deleted_at = now() - interval '40 days' WHERE id = :i"),
            {"i": old},
        )
        conn.execute(
            text("UPDATE item SET deleted_at = now() - interval '1 day' WHERE id = :i"),
            {"i": recent},
        )
    result = purge_deleted(engine, load_settings(purge_after_days=30))
    assert result["deleted"] >= 1
    with engine.connect() as conn:
        left = conn.execute(
            text("SELECT id FROM item WHERE user_id = :u ORDER BY id"), {"u": user}
        ).scalars()
        assert list(left) == [recent]
        vectors = conn.execute(
            text("SELECT count(*) FROM embedding WHERE item_id = :i"), {"i": old}
        ).scalar()
        assert vectors == 0


def test_stats_snapshot_is_recorded(engine: Engine) -> None:
    result = snapshot(engine)
    assert not result["skipped"]
    tables = {t["table"] for t in result["tables"]}
    assert {"item", "embedding_main", "maintenance_run"} <= tables
    model = next(m for m in result["models"] if m["model"] == DEFAULT_MODEL)
    assert model["index"] == SPEC.name and model["index_bytes"] > 0
    [row] = [r for r in history(engine, limit=10) if r["id"] == result["run_id"]]
    assert row["kind"] == "stats" and row["status"] == "done"
    assert "items_by_status" in row["details"]


def test_beat_schedule_has_each_task_at_its_interval() -> None:
    settings = load_settings(
        beat_requeue_interval=30,
        beat_index_interval=1800,
        beat_vacuum_interval=7200,
        beat_stats_interval=0,  # switched off
        beat_purge_interval=86400,
        beat_dispatch_interval=15,
    )
    schedule = beat_schedule(settings)
    by_task = {entry["task"]: entry for entry in schedule.values()}
    assert {t: e["schedule"] for t, e in by_task.items()} == {
        TASK_MAINT_REQUEUE: timedelta(seconds=30),
        TASK_MAINT_INDEXES: timedelta(seconds=1800),
        TASK_MAINT_VACUUM: timedelta(seconds=7200),
        TASK_MAINT_PURGE: timedelta(seconds=86400),
        TASK_DISPATCH_BULK: timedelta(seconds=15),
    }
    assert TASK_MAINT_STATS not in by_task
    # Upkeep on its own queue; the dispatcher's tick (milliseconds) where a long reindex
    # cannot hold it up.
    assert {t: e["options"]["queue"] for t, e in by_task.items()} == {
        **{t: settings.queue_maintenance for t in by_task if t != TASK_DISPATCH_BULK},
        TASK_DISPATCH_BULK: settings.queue_ingest,
    }


def test_cli_runs_and_prints_history(engine: Engine) -> None:
    from click.testing import CliRunner

    from worker.maintenance.commands import maintenance

    runner = CliRunner()
    out = runner.invoke(maintenance, ["run", "stats"])
    assert out.exit_code == 0, out.output
    assert "stats: run" in out.output and "embedding" in out.output
    out = runner.invoke(maintenance, ["run", "requeue", "--dry-run"])
    assert out.exit_code == 0, out.output
    assert "would_resend" in out.output
    out = runner.invoke(maintenance, ["history", "--limit", "5"])
    assert out.exit_code == 0, out.output
    assert out.output.splitlines()[0].split()[:4] == ["id", "kind", "target", "status"]
    assert "stats" in out.output


def test_decide_names_each_reason_and_tuning_needs_confidence() -> None:
    limits = upkeep.Thresholds(recall_target=0.95)
    assert upkeep.decide(0.99, 0.1, 0.05, True, limits, churn=0.1) == []
    reasons = upkeep.decide(0.90, 0.6, 0.25, False, limits, churn=0.3, force=True)
    assert [r.split()[0] for r in reasons] == [
        "forced",
        "definition",
        "recall",
        "rows",
        "dead",
        "30%",
    ]
    # Mean 0.96 over lumpy per-query recall is not enough to settle on a setting.
    lumpy = upkeep.Recall(
        0.96, 50, "hnsw.ef_search", 40, low=upkeep.lower_bound([1.0] * 45 + [0.6] * 5)
    )
    assert lumpy.recall is not None and lumpy.recall >= 0.95 and not lumpy.meets(0.95)
    assert upkeep.ladder(SPEC, 40) == [40, 64, 100, 160, 250, 400]
