"""Bookmark imports: merging and staging (real PostgreSQL), and whole imports through a real
worker and real Redis, including re-import and a worker killed mid-import."""

from __future__ import annotations

import io
import itertools
import shutil
import signal
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from worker import client
from worker.bookmarks.dispatch import ImportCancelled
from worker.bookmarks.importer import (
    AlreadyStaged,
    BackgroundExport,
    bookmark_text,
    cut_batches,
    merge_late,
    read_export,
    stage_import,
    stage_rows,
)
from worker.db import queries
from worker.db.engine import session_scope
from worker.errors import BookmarkFormatError

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


def _late_duplicates_export() -> bytes:
    """Duplicates far apart: with blocks of 2, each first copy is staged before its twin is
    read. One URL the user already has (in no folder) comes twice, early in folder A and
    late in folder B."""
    return netscape(
        [
            '<A HREF="https://late.example/a" TAGS="one">A</A>',
            '<H3>A</H3>\n<DL><p>\n<DT><A HREF="https://had.example/" TAGS="early">Had</A>'
            "\n</DL><p>",
            '<A HREF="https://late.example/b" ADD_DATE="1700000000"></A>',
            '<A HREF="https://late.example/c">C</A>',
            '<A HREF="https://late.example/d">D</A>',
            '<A HREF="https://late.example/a?utm_source=x" TAGS="two">A again</A>',
            '<A HREF="https://late.example/b#x" ADD_DATE="1600000000" TAGS="b">B title</A>'
            "\n<DD>description of b",
            '<H3>B</H3>\n<DL><p>\n<DT><A HREF="https://HAD.example" TAGS="late">Had again</A>'
            "\n</DL><p>",
        ]
    )


def _rows_of(session, user_id: str) -> list[tuple[object, ...]]:  # type: ignore[no-untyped-def]
    return [
        tuple(r)
        for r in session.execute(
            text(
                "SELECT b.canonical_url, i.title, b.tags, b.folder_path, b.description, "
                "b.added_at FROM bookmark b JOIN item i ON i.id = b.item_id "
                "WHERE b.user_id = :u ORDER BY b.item_id"
            ),
            {"u": user_id},
        )
    ]


def test_block_by_block_staging_equals_staging_the_whole_file(db_session, user_id: str) -> None:  # type: ignore[no-untyped-def]
    data = _late_duplicates_export()
    results = {}
    for mode, user in (("whole", user_id + "-whole"), ("blocks", user_id + "-blocks")):
        had = queries.insert_import_job(db_session, user_id=user, filename="h", file_size=1)
        before = netscape(['<A HREF="https://had.example/" TAGS="old">Had</A>'])
        stage_import(db_session, had, user, read_export(io.BytesIO(before)), batch_size=10)
        job = queries.insert_import_job(db_session, user_id=user, filename="x", file_size=1)
        if mode == "whole":
            summary = stage_import(
                db_session, job, user, read_export(io.BytesIO(data)), batch_size=2
            )
        else:
            with BackgroundExport(io.BytesIO(data), block_rows=2) as reader:
                staged = stage_rows(db_session, job, user, reader)
                export = reader.export
            assert set(export.late) == {
                "https://late.example/a",
                "https://late.example/b",
                "https://had.example",
            }
            staged.merged = merge_late(db_session, job, user, list(export.late.values()))
            summary = cut_batches(db_session, job, user, export, staged, batch_size=2)
        results[mode] = (summary, _rows_of(db_session, user))
    assert results["blocks"] == results["whole"]
    summary, rows = results["whole"]
    # three twins in the file, and had.example which the user already had
    assert summary == {"created": 4, "duplicates": 4, "skipped": 0, "batches": 2, "segment": 0}
    by_url = {r[0]: r for r in rows}
    had = by_url["https://had.example"]
    assert sorted(had[2]) == ["early", "late", "old"]  # type: ignore[call-overload]
    assert had[3] == ["A", "B"]  # the folders of both copies fill the row that had none
    late_b = by_url["https://late.example/b"]
    assert late_b[1] == "B title" and late_b[2] == ["b"] and late_b[4] == "description of b"
    assert late_b[5].timestamp() == 1600000000  # type: ignore[union-attr]
    assert by_url["https://late.example/a"][2] == ["one", "two"]


def test_staging_keeps_every_awkward_character_of_a_field(db_session, user_id: str) -> None:  # type: ignore[no-untyped-def]
    """COPY's text format escapes backslash, tab, newline and carriage return; NUL cannot be
    stored in text and is dropped; everything else (the list separator too) arrives as is."""
    awkward = "a\\b\tc\nd\re\x00f\x1fg \\N h\u202eé😀\x0b"
    stored = awkward.replace("\x00", "")
    export = read_export(io.BytesIO(netscape(['<A HREF="https://awkward.example/">T</A>'])))
    bookmark = export.bookmarks["https://awkward.example"]
    bookmark.title = awkward
    bookmark.description = awkward
    bookmark.tags = [awkward, "plain"]
    bookmark.extra = {"k": awkward}
    job = queries.insert_import_job(db_session, user_id=user_id, filename="x", file_size=1)
    stage_import(db_session, job, user_id, export, batch_size=10)
    row = db_session.execute(
        text(
            "SELECT i.title, b.description, b.tags, b.extra FROM bookmark b "
            "JOIN item i ON i.id = b.item_id WHERE b.user_id = :u"
        ),
        {"u": user_id},
    ).one()
    # a tag keeps everything but the list separator, which becomes a space
    assert row == (stored, stored, [stored.replace("\x1f", " "), "plain"], {"k": stored})


def test_batches_hold_bookmarks_of_about_one_length(db_session, user_id: str) -> None:  # type: ignore[no-untyped-def]
    """Batches are cut by the length of the embedded text (less padding per model call),
    and together they hold every new bookmark exactly once."""
    entries = [
        f'<A HREF="https://len.example/{i}">{"word " * ((i * 7) % 23 + 1)}</A>' for i in range(40)
    ]
    export = read_export(io.BytesIO(netscape(entries)))
    job = queries.insert_import_job(db_session, user_id=user_id, filename="x", file_size=1)
    summary = stage_import(db_session, job, user_id, export, batch_size=8)
    batches = (
        db_session.execute(
            text("SELECT item_ids FROM import_batch WHERE import_job_id = :j ORDER BY seq"),
            {"j": job},
        )
        .scalars()
        .all()
    )
    assert summary["batches"] == len(batches) == 5
    ids = [i for batch in batches for i in batch]
    assert len(ids) == len(set(ids)) == 40
    titles = dict(
        db_session.execute(
            text("SELECT id, length(title) FROM item WHERE id = ANY(:ids)"), {"ids": ids}
        ).all()
    )
    lengths = [[titles[i] for i in batch] for batch in batches]
    for shorter, longer in itertools.pairwise(lengths):
        assert max(shorter) <= min(longer)


def test_staging_stops_at_a_cancel_and_never_stages_a_job_twice(db_session, user_id: str) -> None:  # type: ignore[no-untyped-def]
    data = generated_export(300)
    job = queries.insert_import_job(db_session, user_id=user_id, filename="x", file_size=1)
    db_session.execute(text("UPDATE import_job SET status = 'cancelled' WHERE id = :j"), {"j": job})
    with (
        pytest.raises(ImportCancelled),
        BackgroundExport(io.BytesIO(data), block_rows=100) as reader,
    ):
        stage_rows(db_session, job, user_id, reader)
    db_session.rollback()
    job = queries.insert_import_job(db_session, user_id=user_id, filename="y", file_size=1)
    stage_import(db_session, job, user_id, read_export(io.BytesIO(data)), batch_size=100)
    with pytest.raises(AlreadyStaged):  # a second delivery of the job task, after the first
        stage_rows(db_session, job, user_id, [])


class _BrokenFile(io.BytesIO):
    """A file whose read fails part-way (a disk error, a file truncated under us)."""

    def __init__(self, data: bytes, fail_after: int) -> None:
        super().__init__(data)
        self.fail_after = fail_after

    def read(self, size: int | None = -1) -> bytes:
        if self.tell() >= self.fail_after:
            raise OSError("read error (simulated)")
        return super().read(min(size or 4096, 4096) if size and size > 0 else 4096)

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def,override]
        chunk = self.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)


def test_a_read_error_part_way_is_raised_in_the_staging_thread() -> None:
    data = generated_export(3000)
    blocks = 0
    with (
        pytest.raises(BookmarkFormatError, match=r"stopped being readable.*simulated"),
        BackgroundExport(_BrokenFile(data, len(data) // 2), block_rows=100) as reader,
    ):
        for _block in reader:
            blocks += 1
    assert blocks >= 5  # blocks came before the error, and the error still reached us
    assert not reader._thread.is_alive()


def test_a_staging_error_stops_the_reading_thread() -> None:
    data = generated_export(3000)
    with (
        pytest.raises(RuntimeError, match="database gone"),
        BackgroundExport(io.BytesIO(data), block_rows=10) as reader,
    ):
        for _block in reader:
            raise RuntimeError("database gone")
    assert not reader._thread.is_alive()  # it stopped at its next hand-over, not at the end


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
