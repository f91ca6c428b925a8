"""Tenancy: no public function of ``worker.client`` or ``worker.search`` shows user A anything
of user B, and PostgreSQL row-level security (migration 0005, ``ROW_LEVEL_SECURITY``) holds a
role to the user its transaction declares even for a query without a ``user_id`` filter.

The walk enumerates the modules' public functions with ``inspect``: a function added later
without a case here (or, for a pure helper that reads no data, without being listed as one)
fails the test. Each case runs as A over B's data (must find nothing of B) and as B (must
find B's rows: a case that finds nothing for anybody would prove nothing).
"""

from __future__ import annotations

import inspect
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, text
from testsupport import restored_environ

from worker import client, search
from worker.config import get_settings
from worker.db.engine import get_engine, session_scope
from worker.fixtures import prose

pytestmark = pytest.mark.integration

TEST_DB = os.environ.get("TEST_DB_NAME", "worker_test")
TENANT_TABLES = (
    "item",
    "upload",
    "bookmark",
    "import_job",
    "import_batch",
    "analysis",
    "embedding",
)
B_WORDS = "zebra quartz lantern"


@dataclass
class World:
    a: str
    b: str
    b_upload: int  # B's upload, done, with vectors
    b_extra_path: Path  # a file of B's, uploaded afresh by the delete_item case
    b_bookmarks: list[int]
    b_job: int
    b_path: Path
    b_export: Path
    b_vector: list[float]  # a stored vector of B's upload (no model needed to search)

    @property
    def b_items(self) -> set[int]:
        return {self.b_upload, *self.b_bookmarks}


def _export(prefix: str, n: int) -> bytes:
    entries = "".join(
        f'<DT><A HREF="https://{prefix}.example.org/{i}">{B_WORDS} page {i}</A>\n' for i in range(n)
    )
    return f"<!DOCTYPE NETSCAPE-Bookmark-file-1>\n<DL><p>\n{entries}</DL><p>\n".encode()


@pytest.fixture(scope="module")
def world(celery_worker: Any, service_urls: dict[str, str], engine: Engine) -> World:
    """Real rows for two users, made by the real worker: B has two uploads and an import of
    three bookmarks, A has one upload."""
    upload_root = Path(service_urls["UPLOAD_ROOT"])
    tag = uuid.uuid4().hex[:8]
    a, b = f"tenant-a-{tag}", f"tenant-b-{tag}"
    b_path = upload_root / f"{b}-note.txt"
    b_path.write_text(f"{B_WORDS}. " + prose(11, 2))
    extra = upload_root / f"{b}-extra.txt"
    extra.write_text(f"{B_WORDS} again. " + prose(12, 1))
    a_path = upload_root / f"{a}-note.txt"
    a_path.write_text(prose(13, 2))
    b_export = upload_root / f"{b}-bookmarks.html"
    b_export.write_bytes(_export(b, 3))
    b_upload = client.enqueue_upload(b, b_path)
    a_upload = client.enqueue_upload(a, a_path)
    b_job = client.import_bookmarks(b, b_export)
    assert client.wait_for_items(b, [b_upload], timeout=300) == {"done": 1}
    assert client.wait_for_items(a, [a_upload], timeout=300) == {"done": 1}
    assert client.wait_for_import(b, b_job, timeout=300).status == "done"
    with engine.connect() as conn:
        bookmarks = list(
            conn.execute(
                text("SELECT item_id FROM bookmark WHERE user_id = :u"), {"u": b}
            ).scalars()
        )
        vector = conn.execute(
            text(
                "SELECT embedding FROM embedding WHERE item_id = :i AND chunk_index = 0 "
                "AND model = (SELECT name FROM embedding_model WHERE serving)"
            ),
            {"i": b_upload},
        ).scalar_one()
    assert len(bookmarks) == 3
    return World(a, b, b_upload, extra, bookmarks, b_job, b_path, b_export, vector.to_list())


# --- the cases: each returns the ids of B's items (or B's job) that ``user`` got to see ----


def _found(ids: Any, world: World) -> set[int]:
    return set(ids) & (world.b_items | {world.b_job})


def _enqueue_upload(world: World, user: str) -> set[int]:
    """Enqueueing the same path again re-queues the user's own item for it: looked up per
    user, so A naming B's file gets an item of A's own, and B's item is not touched."""
    return _found([client.enqueue_upload(user, world.b_path)], world)


def _import_bookmarks(world: World, user: str) -> set[int]:
    job = client.import_bookmarks(user, world.b_export)
    # A new job every time: never B's job, whoever imports (a job is never reused).
    return {world.b_job} if job == world.b_job or user == world.b else set()


def _item_status(world: World, user: str) -> set[int]:
    status = client.item_status(user, world.b_upload)
    return {status["id"]} if status else set()


def _list_items(world: World, user: str) -> set[int]:
    seen: set[int] = set()
    for filters in ({}, {"kind": "upload"}, {"kind": "bookmark"}, {"status": "done"}):
        seen |= {row["id"] for row in client.list_items(user, limit=1000, **filters)}
    return _found(seen, world)


def _delete_item(world: World, user: str) -> set[int]:
    target = client.enqueue_upload(world.b, world.b_extra_path)  # a live item of B's
    return {target} if client.delete_item(user, target) else set()


def _import_status(world: World, user: str) -> set[int]:
    progress = client.import_status(user, world.b_job)
    return {progress.id} if progress else set()


def _wait_for_items(world: World, user: str) -> set[int]:
    counts = client.wait_for_items(user, sorted(world.b_items), timeout=0)
    return world.b_items if counts else set()


def _wait_for_import(world: World, user: str) -> set[int]:
    try:
        return {client.wait_for_import(user, world.b_job, timeout=0).id}
    except LookupError:
        return set()


def _controlled(name: str) -> Callable[[World, str], set[int]]:
    """pause/resume/cancel of B's (finished) job: B's call finds it and is told it is
    finished; A's is told there is no such job, and changes nothing."""

    def case(world: World, user: str) -> set[int]:
        result = getattr(client, name)(user, world.b_job)
        return {world.b_job} if result["status"] is not None else set()

    return case


CLIENT_CASES: dict[str, Callable[[World, str], set[int]]] = {
    "pause_import": _controlled("pause_import"),
    "resume_import": _controlled("resume_import"),
    "cancel_import": _controlled("cancel_import"),
    "enqueue_upload": _enqueue_upload,
    "import_bookmarks": _import_bookmarks,
    "item_status": _item_status,
    "list_items": _list_items,
    "delete_item": _delete_item,
    "import_status": _import_status,
    "wait_for_items": _wait_for_items,
    "wait_for_import": _wait_for_import,
}


def _searched(run: Callable[[Any], list[search.SearchHit]]) -> Callable[[World, str], set[int]]:
    def case(world: World, user: str) -> set[int]:
        with session_scope(get_engine()) as session:
            return _found((hit.item_id for hit in run((session, user, world))), world)

    return case


SEARCH_CASES: dict[str, Callable[[World, str], set[int]]] = {
    "semantic_search": _searched(
        lambda a: search.semantic_search(a[0], a[1], vector=a[2].b_vector, limit=50)
    ),
    "text_search": _searched(lambda a: search.text_search(a[0], a[1], B_WORDS, limit=50)),
    "hybrid_search": _searched(
        lambda a: search.hybrid_search(a[0], a[1], B_WORDS, vector=a[2].b_vector, limit=50)
    ),
    "search": _searched(
        lambda a: [
            hit
            for mode in ("hybrid", "semantic", "text")
            for hit in search.search(a[0], a[1], B_WORDS, mode=mode, vector=a[2].b_vector)  # type: ignore[arg-type]
        ]
    ),
}
# Helpers that take no session and no user: they compute, they read no data.
SEARCH_PURE = {"rrf_scores", "similarity", "index_candidates_sql"}


def public_functions(module: ModuleType) -> set[str]:
    return {
        name
        for name, obj in inspect.getmembers(module, inspect.isfunction)
        if not name.startswith("_") and obj.__module__ == module.__name__
    }


def test_every_public_function_has_a_tenancy_case() -> None:
    assert public_functions(client) == set(CLIENT_CASES)
    assert public_functions(search) == set(SEARCH_CASES) | SEARCH_PURE
    for name in SEARCH_PURE:
        params = inspect.signature(getattr(search, name)).parameters
        assert not {"session", "user_id"} & set(params), name


def _b_state(engine: Engine, world: World) -> list[tuple[Any, ...]]:
    """B's rows as the superuser sees them: anything a call of A's changed shows here."""
    with engine.connect() as conn:
        items = conn.execute(
            text(
                "SELECT id, status, attempts, claimed_at, deleted_at, updated_at FROM item "
                "WHERE id = ANY(:ids) ORDER BY id"
            ),
            {"ids": sorted(world.b_items)},
        ).all()
        job = conn.execute(
            text("SELECT status, processed, updated_at FROM import_job WHERE id = :j"),
            {"j": world.b_job},
        ).all()
    return [tuple(r) for r in [*items, *job]]


def walk(world: World, engine: Engine) -> dict[str, tuple[set[int], set[int]]]:
    """Every case as A, then every case as B: name -> (what A saw of B's rows, what B saw
    of its own). A's pass must leave B's rows exactly as they were (A enqueueing B's file
    must not re-queue B's item, A's delete must not delete it)."""
    cases = {**CLIENT_CASES, **SEARCH_CASES}
    assert client.wait_for_items(world.b, sorted(world.b_items), timeout=120) == {
        "done": len(world.b_items)
    }
    before = _b_state(engine, world)
    as_a = {name: case(world, world.a) for name, case in cases.items()}
    assert _b_state(engine, world) == before, "a call of user A changed user B's rows"
    as_b = {name: case(world, world.b) for name, case in cases.items()}
    return {name: (as_a[name], as_b[name]) for name in cases}


def assert_isolated(results: dict[str, tuple[set[int], set[int]]]) -> None:
    leaks = {name: seen for name, (seen, _) in results.items() if seen}
    blind = [name for name, (_, own) in results.items() if not own]
    assert not leaks, f"user A saw user B's rows: {leaks}"
    assert not blind, f"these cases found nothing even for B (they prove nothing): {blind}"


def test_user_a_finds_nothing_of_user_b(world: World, engine: Engine) -> None:
    assert_isolated(walk(world, engine))


# --- row-level security ----------------------------------------------------------------------


@dataclass
class Role:
    name: str
    url: str  # SQLAlchemy URL connecting as this role
    dsn: str  # libpq DSN


@pytest.fixture(scope="module")
def tenant_role(engine: Engine, service_urls: dict[str, str]) -> Iterator[Role]:
    """A login role that is neither superuser nor owner of the tables (the embedded server
    trusts local connections, so it needs no password), with the grants a producer or a
    search API needs."""
    name = f"{TEST_DB}_tenant"[:63]
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        if conn.execute(text("SELECT 1 FROM pg_roles WHERE rolname = :n"), {"n": name}).first():
            conn.execute(text(f'DROP OWNED BY "{name}"'))
            conn.execute(text(f'DROP ROLE "{name}"'))
        conn.execute(text(f'CREATE ROLE "{name}" LOGIN NOSUPERUSER NOBYPASSRLS'))
        conn.execute(text(f'GRANT CONNECT ON DATABASE "{TEST_DB}" TO "{name}"'))
        conn.execute(text(f'GRANT USAGE ON SCHEMA public TO "{name}"'))
        conn.execute(
            text(f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO "{name}"')
        )
        conn.execute(text(f'GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO "{name}"'))
    url = service_urls["DATABASE_URL"].replace("://postgres@", f"://{name}@", 1)
    assert name in url, "the test database URL does not connect as postgres"
    try:
        yield Role(name, url, url.replace("+psycopg", "", 1))
    finally:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f'DROP OWNED BY "{name}"'))
            conn.execute(text(f'DROP ROLE "{name}"'))


@pytest.fixture
def as_role(tenant_role: Role) -> Iterator[Callable[[bool], None]]:
    """Switch this process's client and search to the role's connection, with
    ROW_LEVEL_SECURITY on or off; everything is put back afterwards."""

    def switch(rls: bool) -> None:
        os.environ.update(DATABASE_URL=tenant_role.url, ROW_LEVEL_SECURITY=str(rls).lower())
        get_settings.cache_clear()

    with restored_environ(("DATABASE_URL", "ROW_LEVEL_SECURITY")):
        try:
            yield switch
        finally:
            get_engine(load_role_settings(tenant_role)).dispose()


def load_role_settings(role: Role) -> Any:
    return get_settings().model_copy(update={"database_url": role.url})


def test_the_policies_hold_a_bound_role_to_the_declared_user(
    world: World, tenant_role: Role, engine: Engine
) -> None:
    """Raw SQL without any user filter, through the role: nothing without a declared user,
    only the declared user's rows with one, no writes into another user's rows."""
    with engine.connect() as conn:
        owners = set(
            conn.execute(
                text("SELECT tableowner FROM pg_tables WHERE tablename = ANY(:t)"),
                {"t": list(TENANT_TABLES)},
            ).scalars()
        )
        flags = conn.execute(
            text("SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = :n"),
            {"n": tenant_role.name},
        ).one()
    assert tenant_role.name not in owners and tuple(flags) == (False, False)

    def user_ids(conn: psycopg.Connection[Any], table: str) -> set[str]:
        return {r[0] for r in conn.execute(f"SELECT DISTINCT user_id FROM {table}")}

    with psycopg.connect(tenant_role.dsn) as conn:
        for table in TENANT_TABLES:  # nobody declared: nothing at all
            assert user_ids(conn, table) == set(), table
        conn.commit()
        conn.execute("SELECT set_config('app.user_id', %s, true)", (world.a,))
        for table in TENANT_TABLES:
            assert user_ids(conn, table) <= {world.a}, table
        assert user_ids(conn, "item") == {world.a}
        assert (
            conn.execute("UPDATE item SET title = 'x' WHERE id = %s", (world.b_upload,)).rowcount
            == 0
        )
        assert (
            conn.execute("DELETE FROM embedding WHERE item_id = %s", (world.b_upload,)).rowcount
            == 0
        )
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            conn.execute(
                "INSERT INTO item (user_id, kind, status) VALUES (%s, 'upload', 'queued')",
                (world.b,),
            )
        conn.rollback()
        # The declaration ended with its transaction: a pooled connection carries no user.
        assert user_ids(conn, "item") == set()
        conn.execute("SELECT set_config('app.user_id', %s, true)", (world.b,))
        assert user_ids(conn, "item") == {world.b}
        assert user_ids(conn, "embedding") == {world.b}


def test_client_and_search_through_a_bound_role(
    world: World, as_role: Callable[[bool], None], engine: Engine
) -> None:
    """ROW_LEVEL_SECURITY on: the walk gives the same answers through the bound role (each
    call declares its user). Off: the role sees nothing at all (it fails closed)."""
    as_role(False)
    assert client.list_items(world.b) == [] and client.item_status(world.b, world.b_upload) is None
    as_role(True)
    assert_isolated(walk(world, engine))
