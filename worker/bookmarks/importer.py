"""Bookmark imports: parse a whole export as a stream, merge duplicates (within the file and
against the user's live bookmarks), stage new rows and their embedding batches in ONE
transaction, then embed batch by batch.

Why this shape: staging everything before any embedding makes the import resumable from the
database alone. A worker killed while parsing leaves nothing; killed after staging, the job's
batches are still ``queued``/``processing`` and are sent again (by the redelivered job task or
by requeue); a batch's vectors, item statuses and job counters are written in one
transaction, so nothing is counted or embedded twice.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, BinaryIO, Final, cast
from urllib.parse import unquote, urlsplit

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from worker import metrics
from worker.bookmarks import dispatch, first_pass, segments
from worker.bookmarks.canonical import canonicalize, skip_reason
from worker.bookmarks.fetch import (
    FetchedPage,
    FetchError,
    fetch_page,
    page_fetching_enabled,
    policy_from_settings,
)
from worker.bookmarks.parse import ParsedBookmark, SkippedEntry, iter_bookmarks
from worker.config import Settings
from worker.db import queries
from worker.db.engine import session_scope
from worker.errors import PermanentError, WorkerError
from worker.ingest.chunk import chunk_document
from worker.ingest.sources import open_source
from worker.ingest.store import copy_embeddings, psycopg_connection, writable_models
from worker.ingest.types import Document, EmbeddedChunk, Embedder
from worker.logs import Stopwatch, bind_context, log_context

log = logging.getLogger(__name__)

# Pages are fetched concurrently within a batch: the time is spent waiting on the network.
FETCH_THREADS = 8


# --- parse and merge ---------------------------------------------------------------------


@dataclass
class StagedBookmark:
    canonical_url: str
    url: str
    title: str
    domain: str | None
    folder_path: list[str]
    tags: list[str]
    description: str | None
    added_at: datetime | None
    note: str | None = None
    is_read: bool | None = None
    is_archived: bool | None = None
    extra: dict[str, object] = field(default_factory=dict)
    # Handed to the staging transaction already: a later duplicate is merged into its row at
    # the end (ParsedExport.late).
    sent: bool = False

    def merge(self, other: ParsedBookmark) -> None:
        """A duplicate within the file: unite tags and folders, fill what is missing."""
        self.tags = _union(self.tags, other.tags)
        self.folder_path = _union(self.folder_path, other.folder_path)
        self.title = self.title or other.title
        self.description = self.description or other.description or None
        if other.added_at and (self.added_at is None or other.added_at < self.added_at):
            self.added_at = other.added_at
        self.note = self.note or other.note.strip() or None
        self.is_read = other.read if self.is_read is None else self.is_read
        self.is_archived = other.archived if self.is_archived is None else self.is_archived
        self.extra = {**other.extra, **self.extra}


@dataclass
class ParsedExport:
    format: str
    bookmarks: dict[str, StagedBookmark] = field(default_factory=dict)
    entries: int = 0
    duplicates_in_file: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    # Bookmarks merged with a duplicate after they were handed on: their rows are rewritten
    # from the merged state once the file is read.
    late: dict[str, StagedBookmark] = field(default_factory=dict)


def _union(a: Sequence[str], b: Sequence[str]) -> list[str]:
    return list(dict.fromkeys([*a, *b]))


# The host of a plain URL, without urlsplit (100,000 calls per large import). The lookahead
# refuses "user:pass@host", whose first token is not the host.
_PLAIN_HOST_OF: Final = re.compile(
    r"^[A-Za-z][A-Za-z0-9+.\-]*://([A-Za-z0-9\-._]+)(?=[/?#]|$|:[0-9]*(?:[/?#]|$))"
)


def domain_of(url: str) -> str | None:
    if plain := _PLAIN_HOST_OF.match(url):
        return plain.group(1).lower()
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return None
    return host.lower() if host else None


# New bookmarks are handed to the staging transaction in blocks of this many while the
# file is still being read, so that the database inserts one block while the next is parsed.
STAGE_BLOCK_ROWS: Final = 10_000

BlockSink = Callable[[list[StagedBookmark]], None]
_STOP_CHECK_EVERY: Final = 512


class _Stopped(Exception):
    """The staging transaction gave up: the reading thread stops too."""


def read_export(
    fp: BinaryIO,
    *,
    fmt: str | None = None,
    filename: str = "",
    on_block: BlockSink | None = None,
    block_rows: int = STAGE_BLOCK_ROWS,
    should_stop: Callable[[], bool] | None = None,
) -> ParsedExport:
    """Stream the export; memory grows with the number of distinct bookmarks, not the size
    of the file (icons and long lines are dropped by the parser as it goes). With
    ``on_block``, each ``block_rows`` new bookmarks are handed to it as they are found;
    ``should_stop`` is asked every few hundred entries (raising _Stopped when it says so)."""
    entries = iter_bookmarks(fp, fmt=fmt, filename=filename)
    export = ParsedExport(format=entries.format)
    pending: list[StagedBookmark] = []
    for entry in entries:
        export.entries += 1
        if should_stop is not None and export.entries % _STOP_CHECK_EVERY == 0 and should_stop():
            raise _Stopped
        if isinstance(entry, SkippedEntry):
            export.skipped[entry.reason] += 1
            continue
        reason = None if entry.url_checked else skip_reason(entry.url)
        if reason:
            export.skipped[reason] += 1
            continue
        key = canonicalize(entry.url)
        found = export.bookmarks.get(key)
        if found is not None:
            found.merge(entry)
            export.duplicates_in_file += 1
            if found.sent:
                export.late[key] = found
            continue
        staged = export.bookmarks[key] = StagedBookmark(
            canonical_url=key,
            url=entry.url.strip(),
            title=entry.title.strip(),
            domain=domain_of(key),
            folder_path=list(entry.folder_path),
            tags=list(dict.fromkeys(entry.tags)),
            description=entry.description.strip() or None,
            added_at=entry.added_at,
            note=entry.note.strip() or None,
            is_read=entry.read,
            is_archived=entry.archived,
            extra=dict(entry.extra),
        )
        if on_block is not None:
            pending.append(staged)
            if len(pending) >= block_rows:
                _hand_on(pending, on_block)
                pending = []
    if on_block is not None and pending:
        _hand_on(pending, on_block)
    return export


def _hand_on(block: list[StagedBookmark], on_block: BlockSink) -> None:
    for b in block:
        b.sent = True  # before the hand-over: a duplicate found from now on is "late"
    on_block(block)


class BackgroundExport:
    """Read an export in a thread, yielding its new bookmarks block by block: the caller
    writes one block (the database works in its own process) while the next is parsed.
    ``export`` holds the counters and ``late`` merges once the blocks are exhausted; an error
    of the reader (a bad file) is raised by the iteration, in the caller's thread."""

    def __init__(
        self,
        fp: BinaryIO,
        *,
        fmt: str | None = None,
        filename: str = "",
        block_rows: int = STAGE_BLOCK_ROWS,
    ) -> None:
        self.block_rows = block_rows
        self._rows = 0  # handed on so far: the next block's first ord
        self._queue: queue.Queue[object] = queue.Queue(maxsize=4)  # bounds memory ahead
        self._stop = threading.Event()
        self._export: ParsedExport | None = None
        self.parse_seconds = 0.0
        self._thread = threading.Thread(
            target=self._read, args=(fp, fmt, filename), name="export-reader", daemon=True
        )

    def _put(self, obj: object) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(obj, timeout=0.1)
                return
            except queue.Full:
                continue
        raise _Stopped

    def _read(self, fp: BinaryIO, fmt: str | None, filename: str) -> None:
        start = time.perf_counter()
        try:
            export = read_export(
                fp,
                fmt=fmt,
                filename=filename,
                on_block=self._hand,
                block_rows=self.block_rows,
                should_stop=self._stop.is_set,
            )
        except _Stopped:
            return
        except BaseException as exc:  # handed to the caller's thread, raised there
            export_or_error: object = _ReadFailed(exc)
        else:
            export_or_error = export
        self.parse_seconds = time.perf_counter() - start
        with contextlib.suppress(_Stopped):
            self._put(export_or_error)

    def __enter__(self) -> BackgroundExport:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _hand(self, bookmarks: list[StagedBookmark]) -> None:
        block = stage_block(bookmarks, self._rows)
        self._rows += block.rows
        self._put(block)

    def __iter__(self) -> Iterator[StageBlock]:
        while True:
            obj = self._queue.get()
            if isinstance(obj, _ReadFailed):
                raise obj.error
            if isinstance(obj, ParsedExport):
                self._export = obj
                return
            yield cast(StageBlock, obj)

    @property
    def export(self) -> ParsedExport:
        if self._export is None:
            raise RuntimeError("the export is known once its blocks are exhausted")
        return self._export


@dataclass(frozen=True)
class _ReadFailed:
    error: BaseException


# --- stage -------------------------------------------------------------------------------

_STAGE_COLUMNS = (
    "ord, canonical_url, url, title, domain, folders_raw, tags_raw, description, added_at, "
    "note, is_read, is_archived, extra"
)


_COPY_ESCAPES: Final = str.maketrans(
    {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r", "\x00": ""}
)
# Folder and tag lists travel as one text field split in SQL: psycopg adapting a Python list
# per row was a third of the staging time for a 100,000-bookmark import.
_LIST_SEP: Final = "\x1f"


def _copy_escaped(value: str) -> str:
    # Most fields need no escape: two scans in C are far cheaper than translate's per-character
    # table lookups (which were two thirds of formatting a block).
    if value.isprintable() and "\\" not in value:
        return value
    return value.translate(_COPY_ESCAPES)


def _copy_field(value: str | None) -> str:
    return "\\N" if value is None else _copy_escaped(value)


def _copy_list(values: Sequence[str]) -> str:
    return _copy_escaped(_LIST_SEP.join(v.replace(_LIST_SEP, " ") for v in values))


def _copy_bool(value: bool | None) -> str:
    return "\\N" if value is None else ("t" if value else "f")


def _create_stage(session: Session) -> None:
    """``bookmark_stage`` takes each block; ``bookmark_live_stage`` keeps, until the whole
    file is read, the bookmarks the user already had (merged into their rows once, at the
    end, so that a duplicate later in the file counts as if it had come first)."""
    for table in ("bookmark_stage", "bookmark_live_stage"):
        session.execute(
            text(
                f"CREATE TEMP TABLE {table} (ord int, canonical_url text, url text, "
                "title text, domain text, description text, "
                "added_at timestamptz, note text, is_read boolean, is_archived boolean, "
                "extra jsonb, folders_raw text, tags_raw text) ON COMMIT DROP"
            )
        )


@dataclass(frozen=True)
class StageBlock:
    """New bookmarks as COPY text for the stage table, rows numbered (``ord``) in the file's
    order: formatted where they are parsed, so the staging thread only sends them."""

    rows: int
    copy_text: str


def stage_block(bookmarks: Sequence[StagedBookmark], first_ord: int = 0) -> StageBlock:
    # COPY's text format written by hand: no per-row adaptation.
    lines = [
        "\t".join(
            (
                str(ord_),
                _copy_field(b.canonical_url),
                _copy_field(b.url),
                _copy_field(b.title),
                _copy_field(b.domain),
                _copy_list(b.folder_path),
                _copy_list(b.tags),
                _copy_field(b.description or None),
                "\\N" if b.added_at is None else b.added_at.isoformat(),
                _copy_field(b.note or None),
                _copy_bool(b.is_read),
                _copy_bool(b.is_archived),
                _copy_field(_json(_without_nul(b.extra))) if b.extra else "{}",
            )
        )
        for ord_, b in enumerate(bookmarks, start=first_ord)
    ]
    lines.append("")
    return StageBlock(len(bookmarks), "\n".join(lines))


def _copy_block(session: Session, block: StageBlock) -> None:
    raw = psycopg_connection(session.connection())
    with (
        raw.cursor() as cur,
        cur.copy(f"COPY bookmark_stage ({_STAGE_COLUMNS}) FROM STDIN") as copy,
    ):
        copy.write(block.copy_text)


def _list_sql(column: str) -> str:
    """SQL for a list column of the stage table as text[] (split where it is read: an
    UPDATE splitting them in place would write every stage row a second time)."""
    return (
        f"CASE WHEN s.{column} = '' THEN CAST('{{}}' AS text[]) "
        f"ELSE string_to_array(s.{column}, chr(31)) END"
    )


# A bookmark of the file that the user already has (live, from an earlier import or upload):
# tags and descriptions are united into the existing row rather than a second one made.
_MERGE_INTO_LIVE: Final = (
    "UPDATE bookmark b SET "
    f"tags = ARRAY(SELECT DISTINCT t FROM unnest(b.tags || {_list_sql('tags_raw')}) t), "
    "folder_path = CASE WHEN cardinality(b.folder_path) = 0 THEN "
    f"{_list_sql('folders_raw')} ELSE b.folder_path END, "
    "description = coalesce(b.description, s.description), "
    "note = coalesce(b.note, s.note), is_read = coalesce(b.is_read, s.is_read), "
    "is_archived = coalesce(b.is_archived, s.is_archived), "
    "extra = s.extra || b.extra, updated_at = now() "
    "FROM bookmark_live_stage s WHERE b.user_id = :u AND b.deleted_at IS NULL "
    "AND b.canonical_url = s.canonical_url AND b.import_job_id IS DISTINCT FROM :job"
)
_SET_ASIDE_LIVE: Final = (
    "INSERT INTO bookmark_live_stage SELECT * FROM bookmark_stage s WHERE EXISTS "
    "(SELECT 1 FROM bookmark b WHERE b.user_id = :u AND b.deleted_at IS NULL "
    "AND b.canonical_url = s.canonical_url)"
)
# A late duplicate of a bookmark the user already had: its set-aside row takes the merged
# state before the one merge into the user's row.
_UPDATE_LIVE_STAGE: Final = (
    "UPDATE bookmark_live_stage l SET url = s.url, title = s.title, "
    "description = s.description, added_at = s.added_at, note = s.note, "
    "is_read = s.is_read, is_archived = s.is_archived, extra = s.extra, "
    "folders_raw = s.folders_raw, tags_raw = s.tags_raw "
    "FROM bookmark_stage s WHERE l.canonical_url = s.canonical_url"
)

# About the length of ``bookmark_text`` for a new row, in characters: what its batch is
# chosen by (``cut_batches``).
_EMBEDDED_LENGTH: Final = (
    "length(coalesce(nullif(title, ''), url)) + length(coalesce(description, '')) "
    "+ length(coalesce(note, '')) + length(array_to_string(tags, ', ')) "
    "+ length(array_to_string(folder_path, ' / ')) + length(url)"
)

# The new bookmarks, their item ids drawn and both rows inserted in one statement (one pass
# over the stage table; the foreign key is checked at the statement's end, when the items are
# in). Volatile nextval() in the select list runs after the ORDER BY, so ids follow the
# file's order.
_INSERT_NEW: Final = (
    "WITH new AS MATERIALIZED (SELECT nextval(pg_get_serial_sequence('item', 'id')) "
    f"AS item_id, s.ord, s.url, s.canonical_url, s.title, s.domain, "
    f"{_list_sql('folders_raw')} AS folder_path, {_list_sql('tags_raw')} AS tags, "
    "s.description, s.added_at, s.note, s.is_read, s.is_archived, s.extra "
    "FROM bookmark_stage s {only_new} ORDER BY s.ord), "
    "items AS (INSERT INTO item (id, user_id, kind, status, title) "
    "OVERRIDING SYSTEM VALUE SELECT item_id, :u, 'bookmark', 'queued', "
    "coalesce(nullif(title, ''), url) FROM new), "
    "bookmarks AS (INSERT INTO bookmark (item_id, user_id, url, canonical_url, "
    "domain, folder_path, tags, description, added_at, note, is_read, is_archived, "
    "extra, import_job_id) SELECT item_id, :u, url, canonical_url, domain, "
    "folder_path, tags, description, added_at, note, is_read, is_archived, extra, "
    ":job FROM new) "
    f"SELECT item_id, {_EMBEDDED_LENGTH} FROM new ORDER BY ord"
)
_NOT_LIVE: Final = (
    "WHERE NOT EXISTS (SELECT 1 FROM bookmark b WHERE b.user_id = :u "
    "AND b.deleted_at IS NULL AND b.canonical_url = s.canonical_url)"
)

# A bookmark this job inserted from an earlier block, merged since with a later duplicate:
# its row takes the merged state whole, as if the duplicate had come before the insert.
_REWRITE_LATE: Final = (
    "WITH changed AS (UPDATE bookmark b SET "
    f"folder_path = {_list_sql('folders_raw')}, tags = {_list_sql('tags_raw')}, "
    "description = s.description, added_at = s.added_at, note = s.note, "
    "is_read = s.is_read, is_archived = s.is_archived, extra = s.extra, updated_at = now() "
    "FROM bookmark_stage s WHERE b.user_id = :u AND b.import_job_id = :job "
    "AND b.deleted_at IS NULL AND b.canonical_url = s.canonical_url "
    "RETURNING b.item_id, coalesce(nullif(s.title, ''), s.url) AS title) "
    "UPDATE item i SET title = c.title FROM changed c "
    "WHERE i.id = c.item_id AND i.user_id = :u AND i.title IS DISTINCT FROM c.title"
)


@dataclass
class StagedRows:
    new_ids: list[int] = field(default_factory=list)  # in the file's order
    lengths: list[int] = field(default_factory=list)  # of their embedded text, in characters
    merged: int = 0  # bookmarks of the file the user already had


class AlreadyStaged(WorkerError):
    """Another delivery of the job task staged it while this one waited: stage nothing."""


def stage_rows(
    session: Session, job_id: int, user_id: str, blocks: Iterable[StageBlock]
) -> StagedRows:
    """In the caller's transaction, block by block as they come: insert the new items +
    bookmarks, and set aside the bookmarks the user already has (``merge_late`` merges
    them). Raises AlreadyStaged, or ImportCancelled when the job is cancelled meanwhile."""
    # One import per user at a time through this section: two concurrent imports of the same
    # URL would otherwise both see it as new and one would hit the unique index.
    session.execute(
        text("SELECT pg_advisory_xact_lock(hashtextextended('bookmarks:' || :u, 0))"),
        {"u": user_id},
    )
    params = {"u": user_id, "job": job_id}
    if session.execute(
        text("SELECT EXISTS (SELECT 1 FROM import_batch WHERE import_job_id = :job)"), params
    ).scalar_one():
        raise AlreadyStaged(f"import job {job_id} was staged by another delivery")
    _create_stage(session)
    # A first import has nothing to merge into: skip a join per block (the lock above keeps
    # other imports of this user out until commit).
    had_bookmarks = session.execute(
        text("SELECT EXISTS (SELECT 1 FROM bookmark WHERE user_id = :u AND deleted_at IS NULL)"),
        params,
    ).scalar_one()
    # Without earlier bookmarks every row is new: the file's own duplicates were merged as it
    # was read, so no block holds a URL that an earlier block inserted.
    insert_new = text(_INSERT_NEW.replace("{only_new}", _NOT_LIVE if had_bookmarks else ""))
    staged = StagedRows()
    for block in blocks:
        _copy_block(session, block)
        if had_bookmarks:
            session.execute(text(_SET_ASIDE_LIVE), params)
        for item_id, length in session.execute(insert_new, params):
            staged.new_ids.append(item_id)
            staged.lengths.append(length)
        session.execute(text("TRUNCATE bookmark_stage"))
        # A cancel does not wait for this transaction (its row lock does not conflict with
        # the foreign-key checks of the inserts); see it here instead of after the file.
        status = session.execute(
            text("SELECT status FROM import_job WHERE id = :job"), params
        ).scalar_one_or_none()
        if status == "cancelled":
            raise dispatch.ImportCancelled(f"import job {job_id} was cancelled while staged")
    return staged


def merge_late(
    session: Session, job_id: int, user_id: str, late: Collection[StagedBookmark]
) -> int:
    """After ``stage_rows``: write the merged state of bookmarks whose duplicate came after
    they were staged (this job's rows are rewritten), then merge the bookmarks the user
    already had into their rows. Returns how many of those there were."""
    params = {"u": user_id, "job": job_id}
    if late:
        _copy_block(session, stage_block(list(late)))
        session.execute(text(_REWRITE_LATE), params)
        session.execute(text(_UPDATE_LIVE_STAGE), params)
        session.execute(text("TRUNCATE bookmark_stage"))
    merged: int = session.execute(text(_MERGE_INTO_LIVE), params).rowcount  # type: ignore[attr-defined]
    return merged


def cut_batches(
    session: Session,
    job_id: int,
    user_id: str,
    export: ParsedExport,
    staged: StagedRows,
    *,
    batch_size: int,
    segment_min_rows: int | None = None,
) -> dict[str, int]:
    """Cut the new ids into embedding batches and record the job's counters. With at least
    ``segment_min_rows`` new bookmarks the job gets an embedding partition of its own
    (worker.bookmarks.segments)."""
    new_ids = staged.new_ids
    batches = -(-len(new_ids) // batch_size)  # the last one may be short
    segment = 0
    if segment_min_rows is not None and len(new_ids) >= segment_min_rows:
        segment = segments.create_segment(session, job_id)
    if new_ids:
        # One statement for every batch: seq n holds ids [n*size, (n+1)*size) of the new
        # bookmarks in order of the length of the text embedded for them, so that each batch
        # holds texts of about one length: the model computes padding like real tokens, and
        # batches cut in file order made the same import 7 % slower to embed
        # (bench/import_bookmarks.py).
        by_length = [item_id for _, item_id in sorted(zip(staged.lengths, new_ids, strict=True))]
        session.execute(
            text(
                "INSERT INTO import_batch (import_job_id, user_id, seq, item_ids) "
                "SELECT :job, :u, (o - 1) / :size, array_agg(id ORDER BY o) "
                "FROM unnest(CAST(:ids AS bigint[])) WITH ORDINALITY AS t(id, o) "
                "GROUP BY (o - 1) / :size ORDER BY 3"
            ),
            {"job": job_id, "u": user_id, "size": batch_size, "ids": by_length},
        )
    # ON COMMIT DROP covers the usual case; dropping now lets a caller stage twice in one
    # transaction.
    session.execute(text("DROP TABLE bookmark_stage, bookmark_live_stage"))
    duplicates = export.duplicates_in_file + staged.merged
    skipped = sum(export.skipped.values())
    finished = not batches
    session.execute(
        text(
            "UPDATE import_job SET source_format = :fmt, total = :total, "
            "processed = :processed, created_count = :created, duplicate_count = :dupes, "
            "skipped_count = :skipped, skipped_reasons = CAST(:reasons AS jsonb), "
            "status = CASE WHEN :finished THEN 'done' ELSE status END, "
            "finished_at = CASE WHEN :finished THEN now() END, updated_at = now() "
            "WHERE id = :job"
        ),
        {
            "fmt": export.format,
            "total": export.entries,
            "processed": duplicates + skipped,
            "created": len(new_ids),
            "dupes": duplicates,
            "skipped": skipped,
            "reasons": _json(dict(export.skipped)),
            "finished": finished,
            "job": job_id,
        },
    )
    return {
        "created": len(new_ids),
        "duplicates": duplicates,
        "skipped": skipped,
        "batches": batches,
        "segment": segment,
    }


def stage_import(
    session: Session,
    job_id: int,
    user_id: str,
    export: ParsedExport,
    *,
    batch_size: int,
    segment_min_rows: int | None = None,
) -> dict[str, int]:
    """Stage an export read whole beforehand, in the caller's transaction."""
    blocks = [stage_block(list(export.bookmarks.values()))] if export.bookmarks else []
    staged = stage_rows(session, job_id, user_id, blocks)
    staged.merged = merge_late(session, job_id, user_id, list(export.late.values()))
    return cut_batches(
        session,
        job_id,
        user_id,
        export,
        staged,
        batch_size=batch_size,
        segment_min_rows=segment_min_rows,
    )


def _without_nul(value: Any) -> Any:
    """``value`` with NUL characters dropped from its strings: jsonb refuses ``\\u0000``."""
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_without_nul(v) for v in value]
    return value


def _json(value: Any) -> str:
    import json

    return json.dumps(value)


# --- the job -----------------------------------------------------------------------------


@dataclass(frozen=True)
class JobClaim:
    job_id: int
    user_id: str
    filename: str
    staged: bool  # batches exist: parsing is done, only embedding remains
    fmt: str | None = None  # the format the producer named; None: detect it


def claim_job(engine: Engine, job_id: int) -> JobClaim | None:
    with session_scope(engine) as s:
        row = s.execute(
            text(
                "SELECT user_id, filename, status, source_format FROM import_job "
                "WHERE id = :id FOR UPDATE"
            ),
            {"id": job_id},
        ).first()
        if row is None or row.status not in ("queued", "processing"):
            return None
        s.execute(
            text(
                "UPDATE import_job SET status = 'processing', attempts = attempts + 1, "
                "started_at = coalesce(started_at, now()), updated_at = now() WHERE id = :id"
            ),
            {"id": job_id},
        )
        staged = s.execute(
            text("SELECT EXISTS (SELECT 1 FROM import_batch WHERE import_job_id = :id)"),
            {"id": job_id},
        ).scalar_one()
        return JobClaim(job_id, row.user_id, row.filename, bool(staged), row.source_format)


def fail_job(engine: Engine, job_id: int, message: str) -> None:
    with session_scope(engine) as s:
        s.execute(
            text(
                "UPDATE import_job SET status = 'failed', error = :e, finished_at = now(), "
                "updated_at = now() WHERE id = :id AND status IN ('queued', 'processing')"
            ),
            {"id": job_id, "e": message},
        )


def open_export(settings: Settings, filename: str) -> BinaryIO:
    return open_source(
        filename, upload_root=settings.upload_root, max_bytes=settings.max_bookmark_file_bytes
    )


def run_import(engine: Engine, settings: Settings, job_id: int) -> list[int]:
    """Parse and stage a job (once); return the ids of its batches still to embed."""
    with log_context(import_job_id=job_id, stage="claim"):
        claim = claim_job(engine, job_id)
        if claim is None:
            log.info("import job %s not processed: missing or finished", job_id)
            return []
    bind_context(user_id=claim.user_id)  # the task's retry/failure lines name the user too
    with log_context(user_id=claim.user_id, import_job_id=job_id):
        if not claim.staged:
            parse_and_stage(engine, settings, claim)
        return pending_batches(engine, job_id)


def parse_and_stage(engine: Engine, settings: Settings, claim: JobClaim) -> None:
    watch = Stopwatch()
    try:
        # The file is read in a thread while this one stages what it has found so far, all
        # in one transaction: a bad file or a crash leaves nothing staged.
        with (
            watch.stage("stage"),
            open_export(settings, claim.filename) as fp,
            BackgroundExport(fp, fmt=claim.fmt, filename=claim.filename) as reader,
            session_scope(engine) as s,
        ):
            staged = stage_rows(s, claim.job_id, claim.user_id, reader)
            export = reader.export
            staged.merged = merge_late(s, claim.job_id, claim.user_id, list(export.late.values()))
            # The lane (interactive or bulk) decides the batch size and whether the batches
            # wait for the dispatcher; it raises ImportCancelled for a job cancelled while
            # parsing (the transaction then rolls back).
            lane = dispatch.begin_staging(s, settings, claim.job_id, len(export.bookmarks))
            summary = cut_batches(
                s,
                claim.job_id,
                claim.user_id,
                export,
                staged,
                batch_size=dispatch.batch_size(settings, lane),
                segment_min_rows=settings.bulk_segment_min_bookmarks or None,
            )
            if first_pass.wanted(settings, summary["created"]):
                with watch.stage("first_pass"):
                    done = first_pass.embed_first_pass(
                        s, claim.job_id, claim.user_id, segment=summary["segment"]
                    )
                if done is not None:
                    summary["first_pass_vectors"] = done["vectors"]
            dispatch.finish_staging(s, claim.job_id, lane)
    except AlreadyStaged as exc:
        log.info("%s; its batches are sent as they are", exc)
        return
    except PermanentError as exc:  # format, source, empty file
        fail_job(engine, claim.job_id, str(exc))
        _job_line(claim.job_id, "failed", watch, {}, error=str(exc))
        return
    if summary["segment"]:
        # Thousands of new items of one user: until autovacuum gets to it, the planner would
        # take the user for a small one and join the items first when searching.
        with watch.stage("analyze"):
            segments.analyze_quietly(engine, "item", ("user_id", "deleted_at"))
    watch.ms["parse"] = round(reader.parse_seconds * 1000, 2)
    _job_line(claim.job_id, "staged", watch, summary)
    metrics.bookmarks({"duplicate": summary["duplicates"], "skipped": summary["skipped"]})


def _job_line(
    job_id: int, outcome: str, watch: Stopwatch, counts: dict[str, int], error: str = ""
) -> None:
    """The one line per import job's parse: outcome, durations (stage; parse, the reading
    thread's own time) and counts."""
    log.log(
        logging.WARNING if error else logging.INFO,
        "import job %s %s%s",
        job_id,
        outcome,
        f": {error}" if error else "",
        extra={
            "outcome": outcome,
            "durations_ms": watch.ms,
            "counts": counts,
            "stage": watch.failed_stage or "finish",
        },
    )
    metrics.item_done("import", outcome, watch.ms)


def pending_batches(engine: Engine, job_id: int) -> list[int]:
    with session_scope(engine) as s:
        return list(
            s.execute(
                text(
                    "SELECT id FROM import_batch WHERE import_job_id = :id "
                    "AND status IN ('queued', 'processing') ORDER BY seq"
                ),
                {"id": job_id},
            ).scalars()
        )


# --- a batch -----------------------------------------------------------------------------

_WORDS = re.compile(r"[A-Za-z0-9]+")


def bookmark_text(
    title: str | None,
    description: str | None,
    tags: Sequence[str],
    folder_path: Sequence[str],
    domain: str | None,
    url: str,
    note: str | None = None,
) -> str:
    """What is embedded for a bookmark: its title, description, the user's own note, tags,
    folders, domain and the words of the URL path (``/wiki/Sourdough_bread`` → "wiki
    Sourdough bread")."""
    return joined_bookmark_text(
        title,
        description,
        note,
        ", ".join(tags) if tags else None,
        " / ".join(folder_path) if folder_path else None,
        domain,
        url,
    )


# The columns ``joined_bookmark_text`` takes, in its order (item i, bookmark b): the lists are
# joined by the server, which is 3.5x faster to read than text[] columns for 100,000 rows.
BOOKMARK_TEXT_COLUMNS: Final = (
    "i.title, b.description, b.note, "
    "CASE WHEN cardinality(b.tags) > 0 THEN array_to_string(b.tags, ', ') END, "
    "CASE WHEN cardinality(b.folder_path) > 0 THEN array_to_string(b.folder_path, ' / ') END, "
    "b.domain, b.url"
)


def joined_bookmark_text(
    title: str | None,
    description: str | None,
    note: str | None,
    tags: str | None,
    folders: str | None,
    domain: str | None,
    url: str,
) -> str:
    """``bookmark_text`` with the tag and folder lists already joined (None: an empty list)."""
    try:
        path_words = " ".join(_WORDS.findall(unquote(urlsplit(url).path)))
    except ValueError:
        path_words = ""
    parts = [
        title or "",
        description or "",
        note or "",
        ("tags: " + tags) if tags is not None else "",
        ("folder: " + folders) if folders is not None else "",
        domain or "",
        path_words,
    ]
    return "\n".join(p.strip() for p in parts if p and p.strip())


@dataclass(frozen=True)
class BatchClaim:
    batch_id: int
    job_id: int
    user_id: str
    item_ids: list[int]
    attempt: int
    claimed_at: datetime
    segment: int = 0  # the embedding partition its vectors go to (0: the main one)
    seq: int = 0  # its place in the job's batches


def claim_batch(engine: Engine, batch_id: int, *, max_attempts: int) -> BatchClaim | None:
    with session_scope(engine) as s:
        row = s.execute(
            text(
                "SELECT b.import_job_id, b.user_id, b.item_ids, b.status, b.attempts, b.held, "
                "b.seq, j.status AS job_status, coalesce(j.segment, 0) AS segment "
                "FROM import_batch b JOIN import_job j ON j.id = b.import_job_id "
                "WHERE b.id = :id FOR UPDATE OF b"
            ),
            {"id": batch_id},
        ).first()
        if row is None or row.status not in ("queued", "processing"):
            return None
        if row.held:
            return None  # a stale message: the batch waits for the dispatcher or a resume
        if row.job_status not in ("processing", "queued"):
            return None  # paused, cancelled or failed: leave the batch staged
        if row.attempts >= max_attempts:
            message = (
                f"gave up after {row.attempts} attempts (the worker died or timed out each "
                "time); check the worker logs, then `worker retry job`"
            )
            _fail_batch_items(s, batch_id, row.import_job_id, list(row.item_ids), message)
            return None
        attempt, claimed_at = s.execute(
            text(
                "UPDATE import_batch SET status = 'processing', attempts = attempts + 1, "
                "claimed_at = clock_timestamp(), updated_at = now() WHERE id = :id "
                "RETURNING attempts, claimed_at"
            ),
            {"id": batch_id},
        ).one()
        return BatchClaim(
            batch_id,
            row.import_job_id,
            row.user_id,
            list(row.item_ids),
            attempt,
            claimed_at,
            segment=row.segment,
            seq=row.seq,
        )


@dataclass
class BatchRow:
    """One bookmark of a batch: the text embedded for it (chunk 0) and, with FETCH_PAGES,
    the chunks of its page's main text (chunks 1..n)."""

    item_id: int
    url: str
    text: str
    page_chunks: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def pieces(self) -> list[tuple[int, str, dict[str, Any]]]:
        head = (0, self.text, {"kind": "bookmark"})
        return [head, *((i, t, src) for i, (t, src) in enumerate(self.page_chunks, 1))]


def load_batch(engine: Engine, claim: BatchClaim) -> list[BatchRow]:
    with session_scope(engine) as s:
        rows = s.execute(
            text(
                f"SELECT i.id, {BOOKMARK_TEXT_COLUMNS} FROM item i "
                "JOIN bookmark b ON b.item_id = i.id "
                "WHERE i.id = ANY(:ids) AND i.user_id = :u AND i.deleted_at IS NULL "
                "ORDER BY i.id"
            ),
            {"ids": claim.item_ids, "u": claim.user_id},
        ).all()
    # The last column is the URL.
    return [BatchRow(r[0], r[-1], joined_bookmark_text(*r[1:])) for r in rows]


def _finish_batch(
    s: Session, batch_id: int, job_id: int, size: int, *, failed: bool, error: str | None = None
) -> bool:
    """Mark the batch, advance the job's counters and close the job after its last batch.
    Returns True when this call finished the job."""
    s.execute(
        text("UPDATE import_batch SET status = :st, error = :e, updated_at = now() WHERE id = :id"),
        {"st": "failed" if failed else "done", "e": error, "id": batch_id},
    )
    # Lock the job row: two batches ending together must not both miss the "last one".
    s.execute(text("SELECT 1 FROM import_job WHERE id = :id FOR UPDATE"), {"id": job_id})
    s.execute(
        text(
            "UPDATE import_job SET processed = processed + :n, "
            "failed_count = failed_count + :f, updated_at = now() WHERE id = :id"
        ),
        {"n": size, "f": size if failed else 0, "id": job_id},
    )
    metrics.bookmarks({"failed" if failed else "embedded": size})  # import progress
    remaining = s.execute(
        text(
            "SELECT count(*) FROM import_batch WHERE import_job_id = :id "
            "AND status IN ('queued', 'processing')"
        ),
        {"id": job_id},
    ).scalar_one()
    if remaining:
        return False
    s.execute(
        text(
            "UPDATE import_job SET status = 'done', finished_at = now(), updated_at = now() "
            "WHERE id = :id AND status = 'processing'"
        ),
        {"id": job_id},
    )
    return True


def write_batch(
    engine: Engine,
    claim: BatchClaim,
    rows: Sequence[BatchRow],
    vectors: dict[str, tuple[int, Sequence[Sequence[float]]]],
) -> bool | None:
    """Vectors, item statuses, batch and job counters in one transaction. Returns None when
    the claim was lost (nothing written), else whether this batch finished the job."""
    with session_scope(engine) as s:
        if not queries.batch_claim_holds(
            s, "import_batch", claim.batch_id, claim.attempt, claim.claimed_at
        ):
            return None
        ids = [r.item_id for r in rows]
        conn = s.connection()
        writable = writable_models(conn, list(vectors))
        for model, (dimensions, model_vectors) in vectors.items():
            if model not in writable:
                continue  # retired while this batch was being embedded
            conn.execute(
                text("DELETE FROM embedding WHERE item_id = ANY(:ids) AND model = :m"),
                {"ids": ids, "m": model},
            )
            pieces = [(r.item_id, piece) for r in rows for piece in r.pieces()]
            copy_embeddings(
                conn,
                (
                    (item_id, None, claim.user_id, EmbeddedChunk(index, text_, v, source))
                    for (item_id, (index, text_, source)), v in zip(
                        pieces, model_vectors, strict=True
                    )
                ),
                model=model,
                dimensions=dimensions,
                segment=claim.segment,
            )
        # The real vectors are in: the first pass's stand-ins for these items go (they were
        # written into the same segment when the job was staged).
        conn.execute(
            text(
                "DELETE FROM embedding WHERE item_id = ANY(:ids) AND segment = :segment "
                "AND model IN (SELECT name FROM embedding_model WHERE state = 'first_pass')"
            ),
            {"ids": ids, "segment": claim.segment},
        )
        s.execute(
            text(
                "UPDATE item SET status = 'done', error = NULL, processed_at = now(), "
                "updated_at = now() WHERE id = ANY(:ids) AND user_id = :u"
            ),
            {"ids": ids, "u": claim.user_id},
        )
        return _finish_batch(s, claim.batch_id, claim.job_id, len(claim.item_ids), failed=False)


def fail_batch(engine: Engine, batch_id: int, message: str) -> None:
    with session_scope(engine) as s:
        row = s.execute(
            text(
                "SELECT import_job_id, item_ids, status FROM import_batch WHERE id = :id FOR UPDATE"
            ),
            {"id": batch_id},
        ).first()
        if row is None or row.status not in ("queued", "processing"):
            return
        _fail_batch_items(s, batch_id, row.import_job_id, list(row.item_ids), message)


def _fail_batch_items(
    s: Session, batch_id: int, job_id: int, item_ids: list[int], message: str
) -> None:
    """The batch and its unfinished items fail together, and the job counts them."""
    s.execute(
        text(
            "UPDATE item SET status = 'failed', error = :e, updated_at = now() "
            "WHERE id = ANY(:ids) AND status IN ('queued', 'processing')"
        ),
        {"ids": item_ids, "e": message},
    )
    _finish_batch(s, batch_id, job_id, len(item_ids), failed=True, error=message)


def embed_batch(engine: Engine, settings: Settings, batch_id: int) -> dict[str, Any]:
    """Embed one staged batch with every active/backfilling model and write it."""
    with log_context(batch_id=batch_id, stage="claim"):
        claim = claim_batch(engine, batch_id, max_attempts=settings.max_attempts)
        if claim is None:
            log.info(
                "bookmark batch %s not processed: finished, or its job is not running", batch_id
            )
            return {"batch_id": batch_id, "status": "skipped"}
    bind_context(user_id=claim.user_id, import_job_id=claim.job_id)
    with log_context(user_id=claim.user_id, import_job_id=claim.job_id, batch_id=batch_id):
        return _embed_claimed(engine, settings, claim)


def _embed_claimed(engine: Engine, settings: Settings, claim: BatchClaim) -> dict[str, Any]:
    from worker.ingest.process import model_targets

    watch = Stopwatch()
    with watch.stage("load"):
        rows = load_batch(engine, claim)
        targets = model_targets(engine, settings)
    fetch_failures: Counter[str] = Counter()
    if page_fetching_enabled(settings):
        with watch.stage("fetch"):
            fetch_failures = fetch_pages(rows, settings, targets[0].embedder)
    texts = [text_ for r in rows for _, text_, _ in r.pieces()]
    vectors: dict[str, tuple[int, Sequence[Sequence[float]]]] = {}
    with watch.stage("encode"):
        for target in targets:
            encoded: Sequence[Sequence[float]] = (
                list(target.embedder.encode(texts)) if texts else []
            )
            vectors[target.name] = (target.dimensions, encoded)
            metrics.embedded(len(texts), source="bookmark")
    with watch.stage("write"):
        finished = write_batch(engine, claim, rows, vectors)
    if finished is not None and claim.segment and _is_power_of_two(claim.seq + 1):
        # The segment's statistics drift fastest at the start (its first pass's rows are
        # replaced, or it fills from empty), and autovacuum may wait a minute to ANALYZE it:
        # meanwhile the planner took the serving model's thousands of rows there for none,
        # and a search joined them to the items in a nested loop (over 30 s instead of
        # 0.2 s). After batches 1, 2, 4, 8, ... the estimates stay within 2x, for about
        # ten ANALYZEs of 0.1-0.2 s per 100,000 bookmarks.
        with watch.stage("analyze"):
            segments.analyze_segment(engine, claim.segment)
    status = "stale" if finished is None else "done"
    _batch_line(claim, status, watch, len(rows), len(targets), fetch_failures)
    return {
        "batch_id": claim.batch_id,
        "job_id": claim.job_id,
        "status": status,
        "items": len(rows),
        "job_finished": bool(finished),
        "segment": claim.segment,
    }


def _batch_line(
    claim: BatchClaim,
    status: str,
    watch: Stopwatch,
    rows: int,
    models: int,
    fetch_failures: Counter[str],
) -> None:
    """The one line per bookmark batch: outcome, counts and durations (load, fetch, encode,
    write)."""
    log.info(
        "bookmark batch %s of import job %s %s: %d bookmarks",
        claim.batch_id,
        claim.job_id,
        status,
        rows,
        extra={
            "outcome": status,
            "durations_ms": watch.ms,
            "counts": {
                "bookmarks": rows,
                "models": models,
                "attempt": claim.attempt,
                "pages_not_fetched": dict(fetch_failures),
            },
            "stage": "finish",
        },
    )
    metrics.item_done("bookmark_batch", status, watch.ms)


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# --- page fetching (FETCH_PAGES) ----------------------------------------------------------


def fetch_pages(rows: Sequence[BatchRow], settings: Settings, embedder: Embedder) -> Counter[str]:
    """Fetch each bookmark's page (in threads: it is waiting on the network, not the CPU),
    and add its main text's chunks to the row. A page that cannot be fetched leaves the
    bookmark with its own text; the reasons are counted for the batch's log line."""
    policy = policy_from_settings(settings)
    failures: Counter[str] = Counter()

    def one(row: BatchRow) -> tuple[BatchRow, FetchedPage | None, str | None]:
        try:
            return row, fetch_page(row.url, policy), None
        except FetchError as exc:
            return row, None, exc.reason
        except PermanentError as exc:  # the page had no text, or was not text at all
            return row, None, "no_text" if exc.skip else "unparsable"

    with ThreadPoolExecutor(max_workers=FETCH_THREADS) as pool:
        for row, page, reason in pool.map(one, rows):
            if page is None:
                failures[reason or "unknown"] += 1
                continue
            doc = Document(text=page.text, title=page.title, mime_type=page.content_type)
            chunks = chunk_document(
                doc,
                embedder,
                max_tokens=settings.chunk_max_tokens,
                overlap_tokens=settings.chunk_overlap_tokens,
            )
            source = {"kind": "page", "url": page.final_url}
            row.page_chunks = [(c.text, {**source, "start": c.start, "end": c.end}) for c in chunks]
    return failures
