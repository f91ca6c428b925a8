"""Bookmark imports: merging and staging (real PostgreSQL), and whole imports through a real
worker and real Redis, including re-import and a worker killed mid-import."""

from __future__ import annotations

import io
import shutil
import signal
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from worker import client
from worker.bookmarks.importer import bookmark_text, read_export, stage_import
from worker.db import queries
from worker.db.engine import session_scope

FIXTURES = Path(__file__).parent / "fixtures" / "bookmarks"


def netscape(entries: list[str]) -> bytes:
    body = "\n".join(f"    <DT>{e}" for e in entries)
    return (
        "<!DOCTYPE NETSCAPE-Bookmark-file-1>\n<TITLE>Bookmarks</TITLE>\n<H1>Bookmarks</H1>\n"
        f"<DL><p>\n{body}\n</DL><p>\n"
    ).encode()


def generated_export(n: int, *, prefix: str = "site") -> bytes:
    entries = [
        f'<A HREF="https://{prefix}{i % 97}.example.org/page/{i}?utm_source=x" '
        f'ADD_DATE="{1600000000 + i}" TAGS="t{i % 7}">Page {i} about topic {i % 13}</A>'
        for i in range(n)
    ]
    return netscape(entries)


def test_duplicates_in_file_are_merged_with_tags_united() -> None:
    data = netscape(
        [
            '<A HREF="https://Example.com/a?utm_source=x&b=2&a=1" TAGS="one">A</A>',
            '<A HREF="https://example.com:443/a?a=1&b=2#frag" TAGS="two">A again</A>',
            '<A HREF="javascript:void(0)">bookmarklet</A>',
            '<A HREF="place:sort=8">smart folder</A>',
            '<A HREF="https://other.example.com/">Other</A>',
        ]
    )
    export = read_export(io.BytesIO(data))
    assert export.entries == 5
    assert export.duplicates_in_file == 1
    assert dict(export.skipped) == {"javascript": 1, "place": 1}
    merged = export.bookmarks["https://example.com/a?a=1&b=2"]
    assert merged.tags == ["one", "two"] and merged.title == "A"


def test_bookmark_text_combines_every_field() -> None:
    embedded = bookmark_text(
        "Sourdough",
        "Wild yeast bread",
        ["bread", "baking"],
        ["Cooking", "Bread"],
        "en.wikipedia.org",
        "https://en.wikipedia.org/wiki/Sourdough_starter",
        note="feed it twice a day",
    )
    for part in (
        "feed it twice a day",
        "Sourdough",
        "Wild yeast",
        "bread, baking",
        "Cooking / Bread",
        "wikipedia",
        "starter",
    ):
        assert part in embedded


def test_stage_merges_against_existing_and_is_per_user(db_session, user_id: str) -> None:  # type: ignore[no-untyped-def]
    other = user_id + "-other"
    first = read_export(io.BytesIO(netscape(['<A HREF="https://a.example/x" TAGS="old">X</A>'])))
    second = read_export(
        io.BytesIO(
            netscape(
                [
                    '<A HREF="https://a.example/x/" TAGS="new">X</A>',
                    '<A HREF="https://a.example/y">Y</A>',
                ]
            )
        )
    )
    job1 = queries.insert_import_job(db_session, user_id=user_id, filename="a", file_size=1)
    job2 = queries.insert_import_job(db_session, user_id=user_id, filename="b", file_size=1)
    job3 = queries.insert_import_job(db_session, user_id=other, filename="c", file_size=1)
    assert stage_import(db_session, job1, user_id, first, batch_size=10)["created"] == 1
    result = stage_import(db_session, job2, user_id, second, batch_size=10)
    assert result["created"] == 2 and result["duplicates"] == 0  # /x/ is not /x
    again = stage_import(db_session, job3, other, first, batch_size=10)
    assert again["created"] == 1  # another user's identical URL is theirs to keep
    third = read_export(
        io.BytesIO(netscape(['<A HREF="https://A.example/x#top" TAGS="more">X</A>']))
    )
    job4 = queries.insert_import_job(db_session, user_id=user_id, filename="d", file_size=1)
    result = stage_import(db_session, job4, user_id, third, batch_size=10)
    assert result == {"created": 0, "duplicates": 1, "skipped": 0, "batches": 0, "segment": 0}
    tags = db_session.execute(
        text(
            "SELECT tags FROM bookmark WHERE user_id = :u AND canonical_url = 'https://a.example/x'"
        ),
        {"u": user_id},
    ).scalar_one()
    assert sorted(tags) == ["more", "old"]


@pytest.mark.integration
def test_browser_exports_import_and_reimport_adds_nothing(
    celery_worker, upload_root: Path, user_id: str
) -> None:  # type: ignore[no-untyped-def]
    target = upload_root / user_id
    target.mkdir(parents=True)
    shutil.copy(FIXTURES / "chrome.html", target / "chrome.html")
    job = client.import_bookmarks(user_id, target / "chrome.html")
    progress = client.wait_for_import(user_id, job)
    assert progress.status == "done", (progress, celery_worker.log()[-3000:])
    assert progress.created > 0 and progress.processed == progress.total
    with session_scope() as s:
        rows = s.execute(
            text(
                "SELECT b.canonical_url, b.folder_path, i.status, "
                "(SELECT count(*) FROM embedding e WHERE e.item_id = i.id) AS vectors "
                "FROM bookmark b JOIN item i ON i.id = b.item_id WHERE b.user_id = :u"
            ),
            {"u": user_id},
        ).all()
    assert len(rows) == progress.created
    assert all(r.status == "done" and r.vectors == 1 for r in rows)
    assert any(r.folder_path for r in rows)

    again = client.import_bookmarks(user_id, target / "chrome.html")
    second = client.wait_for_import(user_id, again)
    assert second.status == "done" and second.created == 0
    assert second.duplicates == progress.created
    with session_scope() as s:
        count = s.execute(
            text("SELECT count(*) FROM bookmark WHERE user_id = :u"), {"u": user_id}
        ).scalar_one()
    assert count == progress.created


@pytest.mark.integration
def test_unrecognised_file_fails_the_job_with_a_message(
    celery_worker, upload_root: Path, user_id: str
) -> None:  # type: ignore[no-untyped-def]
    path = upload_root / f"{user_id}-notes.txt"
    path.write_text("just some notes and not bookmarks at all\n" * 10)
    job = client.import_bookmarks(user_id, path)
    progress = client.wait_for_import(user_id, job)
    assert progress.status == "failed"
    assert progress.error and "netscape" in progress.error.lower()


@pytest.mark.integration
@pytest.mark.slow
def test_worker_killed_mid_import_resumes_with_every_bookmark_once(
    celery_worker, upload_root: Path, user_id: str, engine
) -> None:  # type: ignore[no-untyped-def]

    from worker.app import app
    from worker.config import get_settings
    from worker.maintenance.requeue import find_and_requeue

    n = 3000
    path = upload_root / f"{user_id}-big.html"
    path.write_bytes(generated_export(n, prefix=user_id))
    job = client.import_bookmarks(user_id, path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        progress = client.import_status(user_id, job)
        assert progress is not None
        if progress.processed >= 512:
            break
        time.sleep(0.2)
    celery_worker.kill(signal.SIGKILL)
    celery_worker.start()
    celery_worker.wait_ready()
    # The killed worker's unacknowledged message waits for Redis' visibility timeout; the
    # requeue task finds the stuck batch in the database and sends it again at once.
    settings = get_settings().model_copy(update={"stuck_after_seconds": 1})
    time.sleep(1.5)

    def send(task: str, args: list[object], queue: str) -> None:
        app.send_task(task, args=args, queue=queue)

    find_and_requeue(engine, settings, send)
    progress = client.wait_for_import(user_id, job)
    assert progress.status == "done", progress
    with session_scope() as s:
        stats = s.execute(
            text(
                "SELECT count(*) AS bookmarks, count(DISTINCT b.canonical_url) AS urls, "
                "sum((SELECT count(*) FROM embedding e WHERE e.item_id = b.item_id)) AS vectors, "
                "count(*) FILTER (WHERE i.status = 'done') AS done "
                "FROM bookmark b JOIN item i ON i.id = b.item_id WHERE b.user_id = :u"
            ),
            {"u": user_id},
        ).one()
    assert stats.bookmarks == n and stats.urls == n
    assert stats.vectors == n and stats.done == n
    assert progress.processed == progress.total == n


def test_fetched_pages_become_more_chunks_of_the_bookmark(
    engine, upload_root: Path, user_id: str
) -> None:  # type: ignore[no-untyped-def]
    """FETCH_PAGES: the page's main text is chunked and embedded with the bookmark; a page
    that cannot be fetched leaves the bookmark with its own text (and is counted)."""
    import http.server
    import threading

    from worker.bookmarks import importer
    from worker.config import get_settings

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/article":
                body = (
                    b"<html><head><title>Sourdough guide</title></head><body><nav>menu</nav>"
                    b"<main><p>Wild yeast ferments the dough slowly overnight.</p></main>"
                    b"</body></html>"
                )
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
            else:
                body = b"missing"
                self.send_response(404)
                self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        path = upload_root / f"{user_id}-fetch.html"
        path.write_bytes(
            netscape([f'<A HREF="{base}/article">Bread</A>', f'<A HREF="{base}/gone">Gone</A>'])
        )
        with session_scope() as s:
            job = queries.insert_import_job(s, user_id=user_id, filename=path.name, file_size=1)
        settings = get_settings().model_copy(
            update={"fetch_pages": True, "fetch_allow_private": True, "fetch_timeout": 5.0}
        )
        for batch_id in importer.run_import(engine, settings, job):
            result = importer.embed_batch(engine, settings, batch_id)
            assert result["status"] == "done"
    finally:
        server.shutdown()
    with session_scope() as s:
        rows = s.execute(
            text(
                "SELECT b.url, e.chunk_index, e.content, e.source->>'kind' AS kind "
                "FROM embedding e JOIN bookmark b ON b.item_id = e.item_id "
                "WHERE e.user_id = :u ORDER BY b.url, e.chunk_index"
            ),
            {"u": user_id},
        ).all()
    article = [r for r in rows if r.url.endswith("/article")]
    gone = [r for r in rows if r.url.endswith("/gone")]
    assert [r.kind for r in article] == ["bookmark", "page"]
    assert "Wild yeast ferments" in article[1].content and "menu" not in article[1].content
    assert [r.kind for r in gone] == ["bookmark"]


def test_a_large_import_writes_its_own_segment_searched_before_and_after_its_index(
    engine, upload_root: Path, user_id: str
) -> None:  # type: ignore[no-untyped-def]
    """BULK_SEGMENT_MIN_BOOKMARKS: the import's vectors go to a partition of their own with no
    vector index, are found by search at once (exactly), and get their index in bulk when
    the import ends; a redelivered batch writes nothing twice; another user sees nothing."""
    from worker.bookmarks import importer, segments
    from worker.config import get_settings
    from worker.db.indexes import IndexSpec, index_state, segment_index_name
    from worker.search import semantic_search

    path = upload_root / f"{user_id}-bulk.html"
    path.write_bytes(generated_export(12, prefix=f"bulk{user_id}"))
    with session_scope() as s:
        job = queries.insert_import_job(s, user_id=user_id, filename=path.name, file_size=1)
    settings = get_settings().model_copy(
        update={"bulk_segment_min_bookmarks": 5, "bookmark_batch_size": 5}
    )
    batches = importer.run_import(engine, settings, job)
    assert len(batches) == 3
    results = [importer.embed_batch(engine, settings, b) for b in batches]
    assert [r["segment"] for r in results] == [job] * 3
    assert results[-1]["job_finished"] is True
    assert importer.embed_batch(engine, settings, batches[0])["status"] == "skipped"

    table = f"embedding_s{job}"
    with session_scope() as s:
        in_segment = s.execute(text(f"SELECT count(*), min(user_id) FROM {table}")).one()
        elsewhere = s.execute(
            text("SELECT count(*) FROM embedding_main WHERE user_id = :u"), {"u": user_id}
        ).scalar_one()
        assert (in_segment[0], in_segment[1], elsewhere) == (12, user_id, 0)
        assert segments.pending_segments(s.connection()) == [job]
        # Searched before its index exists (exact_threshold=0 asks for the index plan).
        hits = semantic_search(s, user_id, "Page 7 about topic 7", exact_threshold=0, limit=3)
        assert hits and hits[0].title == "Page 7 about topic 7"
        assert semantic_search(s, f"{user_id}-other", "Page 7 about topic 7", limit=3) == []
        spec_row = s.execute(
            text(
                "SELECT name, dimensions, distance, index_kind, index_precision, index_params "
                "FROM embedding_model WHERE serving"
            )
        ).one()

    report = segments.index_segment(engine, job)
    spec = IndexSpec.from_row(spec_row)
    assert report["built"] == [segment_index_name(spec, job)]
    with session_scope() as s:
        conn = s.connection()
        assert index_state(conn, segment_index_name(spec, job)) == "valid"
        assert job not in segments.pending_segments(conn)
        hits = semantic_search(s, user_id, "Page 7 about topic 7", exact_threshold=0, limit=3)
        assert hits and hits[0].title == "Page 7 about topic 7"
    assert segments.index_segment(engine, job)["built"] == []  # idempotent

    # Cancelling or deleting such an import drops its partition with every vector in it.
    with session_scope() as s:
        s.execute(text("DELETE FROM item WHERE user_id = :u"), {"u": user_id})
    assert segments.drop_segment(engine, job) is True
    assert segments.drop_segment(engine, job) is False
    with session_scope() as s:
        assert s.execute(text("SELECT to_regclass(:t)"), {"t": table}).scalar() is None
