"""Schema, migrations and database operations on a real PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError

from worker import services
from worker.config import load_settings
from worker.db import migrate, ops
from worker.db.engine import session_scope
from worker.db.migrate import include_object
from worker.db.models import Base
from worker.ingest.store import Claim, write_upload
from worker.ingest.types import AnalysisResult, EmbeddedChunk


@pytest.fixture
def scratch_db(service_urls) -> Iterator[tuple[str, object]]:  # type: ignore[no-untyped-def]
    """A separate, empty database for tests that migrate up and down or reset."""
    base = service_urls["DATABASE_URL"].rsplit("/", 1)[0]
    admin = base.replace("postgresql+psycopg://", "postgresql://", 1) + "/postgres"
    name = f"scratch_{os.getpid()}"
    services.drop_database(admin, name)
    services.ensure_database(admin, name)
    url = f"{base}/{name}"
    settings = load_settings(database_url=url)
    engine = create_engine(url)
    try:
        yield url, settings
    finally:
        engine.dispose()
        services.drop_database(admin, name)


def _item(session, user_id: str, kind: str = "upload") -> int:  # type: ignore[no-untyped-def]
    return session.execute(
        text("INSERT INTO item (user_id, kind) VALUES (:u, :k) RETURNING id"),
        {"u": user_id, "k": kind},
    ).scalar_one()


def test_upgrade_downgrade_upgrade(scratch_db) -> None:  # type: ignore[no-untyped-def]
    url, settings = scratch_db
    migrate.upgrade("head", settings)
    migrate.downgrade("base", settings)
    engine = create_engine(url)
    with engine.connect() as conn:
        tables = conn.execute(
            text("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
        ).scalar_one()
    assert tables == 1  # only alembic_version is left
    migrate.upgrade("head", settings)
    with engine.connect() as conn:
        names = set(
            conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))
            .scalars()
            .all()
        )
        seeded = conn.execute(text("SELECT name, dimensions FROM embedding_model")).all()
    engine.dispose()
    assert {"item", "upload", "bookmark", "import_job", "import_batch", "analysis"} <= names
    assert {"embedding", "embedding_model", "maintenance_run"} <= names
    assert [tuple(r) for r in seeded] == [("all-MiniLM-L6-v2", 384)]


def test_autogenerate_finds_no_difference(engine) -> None:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        ctx = MigrationContext.configure(
            conn,
            opts={
                "compare_type": True,
                "include_object": include_object,
            },
        )
        diff = compare_metadata(ctx, Base.metadata)
    assert diff == []


def test_canonical_url_unique_per_user_among_live_rows(db_session, user_id: str) -> None:  # type: ignore[no-untyped-def]
    def bookmark(user: str, deleted: bool = False) -> None:
        item = _item(db_session, user, "bookmark")
        db_session.execute(
            text(
                "INSERT INTO bookmark (item_id, user_id, url, canonical_url, deleted_at) "
                "VALUES (:i, :u, 'https://a.example/', 'https://a.example', "
                "CASE WHEN :d THEN now() END)"
            ),
            {"i": item, "u": user, "d": deleted},
        )
        db_session.flush()

    bookmark(user_id)
    bookmark(user_id + "-b")  # another user: allowed
    bookmark(user_id, deleted=True)  # a soft-deleted twin: allowed
    with pytest.raises(IntegrityError), db_session.begin_nested():
        bookmark(user_id)


def _write(engine, user_id: str, item_id: int, text_: str) -> None:  # type: ignore[no-untyped-def]
    with session_scope(engine) as s:
        attempt, claimed_at = s.execute(
            text(
                "UPDATE item SET status = 'processing', attempts = attempts + 1, "
                "claimed_at = clock_timestamp() WHERE id = :i RETURNING attempts, claimed_at"
            ),
            {"i": item_id},
        ).one()
    claim = Claim(item_id, user_id, attempt, claimed_at, "x.txt", None)
    analysis = AnalysisResult(
        summary=text_,
        keywords=["alpha"],
        category="science",
        language="en",
        word_count=2,
        provider="test",
        model="test",
        title="T",
    )
    vec = (np.ones(384, dtype=np.float32) / np.sqrt(384)).tolist()
    assert write_upload(
        engine,
        claim,
        sha256=text_,
        title="T",
        analysis=analysis,
        trace_id=None,
        vectors={"all-MiniLM-L6-v2": (384, [EmbeddedChunk(0, text_, vec, {"kind": "chunk"})])},
    )


def test_deleting_an_item_cascades_and_versions_are_unique(engine, user_id: str) -> None:  # type: ignore[no-untyped-def]
    with session_scope(engine) as s:
        item_id = _item(s, user_id)
    _write(engine, user_id, item_id, "volcanoes erupt")
    _write(engine, user_id, item_id, "glaciers melt")
    with session_scope(engine) as s:
        versions = (
            s.execute(
                text("SELECT version FROM analysis WHERE item_id = :i ORDER BY version"),
                {"i": item_id},
            )
            .scalars()
            .all()
        )
        assert versions == [1, 2]
        with pytest.raises(IntegrityError), s.begin_nested():
            s.execute(
                text(
                    "INSERT INTO analysis (item_id, user_id, version, provider, model) "
                    "VALUES (:i, :u, 2, 'x', 'x')"
                ),
                {"i": item_id, "u": user_id},
            )
        s.execute(text("DELETE FROM item WHERE id = :i"), {"i": item_id})
        left = s.execute(
            text(
                "SELECT (SELECT count(*) FROM analysis WHERE item_id = :i) + "
                "(SELECT count(*) FROM embedding WHERE item_id = :i)"
            ),
            {"i": item_id},
        ).scalar_one()
    assert left == 0


def test_tsvector_follows_the_text(db_session, user_id: str) -> None:  # type: ignore[no-untyped-def]
    item = _item(db_session, user_id)
    analysis_id = db_session.execute(
        text(
            "INSERT INTO analysis (item_id, user_id, version, summary, keywords, provider, model) "
            "VALUES (:i, :u, 1, 'volcanoes erupting', ARRAY['lava'], 'x', 'x') RETURNING id"
        ),
        {"i": item, "u": user_id},
    ).scalar_one()

    def matches(query: str) -> bool:
        return bool(
            db_session.execute(
                text(
                    "SELECT search_vector @@ websearch_to_tsquery('english', :q) "
                    "FROM analysis WHERE id = :id"
                ),
                {"q": query, "id": analysis_id},
            ).scalar_one()
        )

    assert matches("volcano") and matches("lava") and not matches("glacier")
    db_session.execute(
        text("UPDATE analysis SET summary = 'glaciers retreating' WHERE id = :id"),
        {"id": analysis_id},
    )
    assert matches("glacier") and not matches("volcano")


def test_verify_fails_on_an_invalid_index(engine) -> None:  # type: ignore[no-untyped-def]
    assert ops.verify(engine).ok
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("CREATE TABLE verify_probe (v int)"))
        conn.execute(text("INSERT INTO verify_probe VALUES (1), (1)"))
        with pytest.raises(IntegrityError):
            conn.execute(
                text("CREATE UNIQUE INDEX CONCURRENTLY verify_probe_uq ON verify_probe (v)")
            )
    try:
        report = ops.verify(engine)
        assert not report.ok
        assert any("verify_probe_uq" in p and "INVALID" in p for p in report.problems)
    finally:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("DROP TABLE verify_probe"))
    assert ops.verify(engine).ok


def test_backup_reset_restore_round_trip(scratch_db, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url, settings = scratch_db
    migrate.upgrade("head", settings)
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO item (user_id, kind, title) VALUES ('u1', 'upload', 'kept')")
        )
    dump = ops.backup(settings, tmp_path / "backup.dump")
    ops.reset(settings, engine)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM item")).scalar_one() == 0
    ops.restore(settings, dump)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT title FROM item")).scalars().all() == ["kept"]
        assert conn.execute(text("SELECT count(*) FROM embedding_model")).scalar_one() == 1
    engine.dispose()


def test_db_commands_run(service_urls) -> None:  # type: ignore[no-untyped-def]
    for argv in (["db", "current"], ["db", "verify"], ["db", "stats"], ["db", "history"]):
        proc = subprocess.run(
            [sys.executable, "-m", "worker", *argv], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, (argv, proc.stdout, proc.stderr)
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "db", "reset"], capture_output=True, text=True
    )
    assert proc.returncode != 0 and "--yes" in (proc.stdout + proc.stderr)
