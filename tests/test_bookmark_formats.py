"""The exports of Pocket, Instapaper, Raindrop, Readwise, Omnivore, wallabag, Linkwarden,
Karakeep, OneTab and plain URL lists: detection, what each maps, damage, and whole imports
through a real worker."""

from __future__ import annotations

import io
import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from testsupport import consume, mutate

from worker import client
from worker.bookmarks.canonical import canonicalize
from worker.bookmarks.importer import read_export
from worker.bookmarks.parse import (
    FORMAT_LABELS,
    FORMATS,
    ParsedBookmark,
    SkippedEntry,
    detect_format,
    iter_bookmarks,
)
from worker.db.engine import session_scope
from worker.errors import BookmarkFormatError

TOOLS = Path(__file__).parent / "fixtures" / "bookmarks" / "tools"
TOOL_FORMATS = tuple(f for f in FORMATS if f not in ("netscape", "pinboard_json", "csv"))

# fixture -> (format, entries, distinct bookmarks, duplicates in the file, skipped by reason)
FIXTURES: dict[str, tuple[str, int, int, int, dict[str, int]]] = {
    "pocket_ril_export.html": ("pocket_html", 5, 3, 1, {"javascript": 1}),
    "pocket_part_000000.csv": ("pocket_csv", 5, 3, 1, {"empty": 1}),
    "instapaper-export.csv": ("instapaper_csv", 6, 4, 1, {"invalid": 1}),
    "raindrop-export.csv": ("raindrop_csv", 5, 3, 1, {"javascript": 1}),
    "readwise-reader-export.csv": ("readwise_csv", 5, 3, 1, {"feed": 1}),
    "omnivore-metadata_0_to_4.json": ("omnivore_json", 4, 3, 1, {}),
    "wallabag-export.json": ("wallabag_json", 4, 2, 1, {"deleted": 1}),
    "linkwarden-backup.json": ("linkwarden_json", 5, 3, 1, {"empty": 1}),
    "karakeep-export.json": ("karakeep_json", 6, 3, 1, {"not_a_link": 2}),
    "onetab.txt": ("onetab", 5, 3, 1, {"browser": 1}),
    "urls.txt": ("url_list", 5, 3, 1, {"invalid": 1}),
}

Entry = ParsedBookmark | SkippedEntry


def parse(name: str, fmt: str | None = None) -> list[Entry]:
    with (TOOLS / name).open("rb") as fp:
        return list(iter_bookmarks(fp, fmt=fmt, filename=name))


def marks(name: str) -> dict[str, ParsedBookmark]:
    """The fixture's bookmarks by URL (a duplicate's later spelling has a URL of its own)."""
    return {e.url: e for e in parse(name) if isinstance(e, ParsedBookmark)}


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


# --------------------------------------------------------------------------- detection


def test_every_tool_format_has_a_fixture() -> None:
    assert sorted(fmt for fmt, *_ in FIXTURES.values()) == sorted(TOOL_FORMATS)


@pytest.mark.parametrize("name", list(FIXTURES))
def test_detected_from_the_content(name: str) -> None:
    assert detect_format((TOOLS / name).read_bytes()[:65536]) == FIXTURES[name][0]


@pytest.mark.parametrize("name", list(FIXTURES))
def test_counts_through_the_merge(name: str) -> None:
    fmt, entries, distinct, duplicates, skipped = FIXTURES[name]
    with (TOOLS / name).open("rb") as fp:
        export = read_export(fp, filename=name)
    assert export.format == fmt
    assert export.entries == entries
    assert len(export.bookmarks) == distinct
    assert export.duplicates_in_file == duplicates
    assert dict(export.skipped) == skipped


@pytest.mark.parametrize(
    ("head", "fmt"),
    [
        pytest.param(b"[]", "pinboard_json", id="empty-array"),
        pytest.param(b'[{"href": "https://e.com/"}]', "pinboard_json", id="pinboard"),
        pytest.param(b'[{"id": 1, "is_starred": 0}]', "wallabag_json", id="wallabag"),
        pytest.param(b'[{"slug": "a", "savedAt": "2024"}]', "omnivore_json", id="omnivore"),
        pytest.param(b'{"bookmarks": [], "lists": []}', "karakeep_json", id="karakeep"),
        pytest.param(b'{"name": "x", "collections": []}', "linkwarden_json", id="linkwarden"),
        pytest.param(b"<h1>Unread</h1><ul><li><a href='h' time_added='1'>", "pocket_html"),
        pytest.param(b"https://e.com/ | E\nhttps://f.com/\n", "onetab", id="onetab"),
        pytest.param(b"\n# mine\nhttps://e.com/\nhttps://f.com/ F\n", "url_list", id="urls"),
        pytest.param(b"URL,Title,Selection,Folder\n", "instapaper_csv", id="instapaper-old"),
        pytest.param(
            b"\xef\xbb\xbfTitle,URL,ID,Document tags,Saved date,Reading progress,Location,Seen\n",
            "readwise_csv",
            id="readwise-bom",
        ),
        pytest.param(b"url,title,tags\nhttps://e.com/,E,x\n", "csv", id="generic-csv"),
        pytest.param(b"title;url;time_added;tags;status\n", "pocket_csv", id="semicolons"),
    ],
)
def test_detection_order(head: bytes, fmt: str) -> None:
    assert detect_format(head) == fmt


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(b'[{"name": "x", "value": 1}]', id="unknown-json-array"),
        pytest.param(b'{"data": [1, 2]}', id="unknown-json-object"),
        pytest.param(b"just some notes\nand not bookmarks\n", id="prose"),
        pytest.param(b"<html><body><p>hello</p></body></html>", id="html-page"),
    ],
)
def test_unrecognised_lists_every_format(head: bytes) -> None:
    with pytest.raises(BookmarkFormatError) as info:
        detect_format(head)
    for label in FORMAT_LABELS.values():
        assert label in str(info.value)


def test_format_flag_overrides_detection() -> None:
    # Raindrop's file read by the generic CSV reader: the note becomes the description.
    with (TOOLS / "raindrop-export.csv").open("rb") as fp:
        entries = iter_bookmarks(fp, fmt="csv")
        first = next(entries)
    assert entries.format == "csv"
    assert isinstance(first, ParsedBookmark)
    assert first.note == "" and first.description.startswith("Run it with VERBOSE")


def test_unknown_format_name_lists_the_names() -> None:
    with pytest.raises(BookmarkFormatError, match=r"unknown bookmark format 'opml'.*karakeep_json"):
        iter_bookmarks(io.BytesIO(b"<DL>"), fmt="opml")


def test_wrong_format_named_says_what_is_missing() -> None:
    with pytest.raises(BookmarkFormatError, match=r"not a Raindrop CSV export.*'url'"):
        list(iter_bookmarks(io.BytesIO(b"Link,Name\nhttps://e.com/,E\n"), fmt="raindrop_csv"))
    with pytest.raises(BookmarkFormatError, match="a Karakeep export must be a JSON object"):
        list(iter_bookmarks(io.BytesIO(b"[1, 2]"), fmt="karakeep_json"))
    with pytest.raises(BookmarkFormatError, match="a wallabag export must be a JSON array"):
        list(iter_bookmarks(io.BytesIO(b'{"a": 1}'), fmt="wallabag_json"))


# --------------------------------------------------------------------------- each tool


def test_pocket_html() -> None:
    entries = parse("pocket_ril_export.html")
    by_url = marks("pocket_ril_export.html")
    slow = by_url["https://www.theatlantic.com/technology/archive/2023/07/slow-web/674522/"]
    assert slow.tags == ("longread", "web")
    assert (slow.read, slow.archived) == (False, False)  # the "Unread" section
    assert slow.added_at == utc(2023, 7, 6, 7, 31, 35)
    vacuum = by_url["https://blog.crunchydata.com/blog/postgres-vacuum-explained"]
    assert (vacuum.read, vacuum.archived) == (None, True)  # "Read Archive"
    titles = [e.title for e in entries if isinstance(e, ParsedBookmark)]
    assert "Jeux vidéo & culture : l\u2019été des rééditions" in titles  # entities decoded
    assert not any("fish" in t for t in titles)  # the comments hold no bookmarks


def test_pocket_csv() -> None:
    by_url = marks("pocket_part_000000.csv")
    great = by_url["https://paulgraham.com/greatwork.html"]
    assert great.tags == ("essays", "career")
    assert (great.read, great.archived) == (False, False)
    assert great.added_at == utc(2023, 7, 10, 14, 40)
    rust = by_url["https://rustwasm.github.io/book/"]
    assert rust.title == "Rust, WebAssembly and you"
    assert rust.tags == ("rust", "wasm", "web assembly")  # "|" only; case-insensitive dedupe
    ddia = by_url[
        "https://martin.kleppmann.com/2017/03/27/designing-data-intensive-applications.html"
    ]
    assert ddia.archived is True and ddia.tags == ()


def test_instapaper_csv() -> None:
    by_url = marks("instapaper-export.csv")
    unread = by_url["https://www.newyorker.com/magazine/2023/01/09/the-slow-cooker"]
    assert (unread.folder_path, unread.read, unread.archived) == ((), False, False)
    assert unread.tags == ("food",) and unread.added_at == utc(2023, 11, 14, 22, 13, 20)
    archived = by_url["https://danluu.com/productivity-velocity/"]
    assert archived.archived is True and archived.folder_path == ()
    assert archived.description == "The selected passage, saved with the page"
    assert archived.tags == ("programming", "productivity")
    pizza = by_url["https://www.seriouseats.com/the-pizza-lab-three-ingredient-pizza-dough"]
    assert pizza.folder_path == ("Recipes",) and pizza.tags == ()
    starred = by_url[
        "https://jvns.ca/blog/2023/02/08/why-does-0-1-plus-0-2-equal-0-30000000000000004/"
    ]
    assert starred.extra == {"favorite": True} and starred.folder_path == ()


def test_instapaper_old_four_columns() -> None:
    data = b"URL,Title,Selection,Folder\nhttps://e.com/a,A,,Archive\nhttps://e.com/b,B,,Work\n"
    a, b = parse_bytes(data)
    assert isinstance(a, ParsedBookmark) and isinstance(b, ParsedBookmark)
    assert (a.archived, a.added_at, a.tags) == (True, None, ())
    assert b.folder_path == ("Work",)


def parse_bytes(data: bytes, fmt: str | None = None) -> list[Entry]:
    return list(iter_bookmarks(io.BytesIO(data), fmt=fmt))


def test_raindrop_csv() -> None:
    by_url = marks("raindrop-export.csv")
    vacuum = by_url["https://www.postgresql.org/docs/16/sql-vacuum.html"]
    assert vacuum.folder_path == ("Development", "Databases")
    assert vacuum.tags == ("postgres", "databases")
    assert vacuum.note == "Run it with VERBOSE when debugging\nand check the autovacuum logs"
    assert vacuum.description == "VACUUM reclaims storage occupied by dead tuples."
    assert vacuum.added_at == utc(2024, 1, 15, 9, 30)
    assert vacuum.extra == {"favorite": True}
    book = by_url["https://doc.rust-lang.org/book/"]
    assert book.folder_path == ("Development", "Languages/Rust")  # "/" inside a name
    assert book.extra["highlights"] == "Ownership is Rust\u2019s most unique feature"
    cookies = by_url["https://cooking.nytimes.com/recipes/1015819-chocolate-chip-cookies"]
    assert cookies.folder_path == ()  # Unsorted is the inbox


def test_raindrop_older_slash_folders() -> None:
    header = b"id,title,note,excerpt,url,folder,tags,created,cover,highlights,favorite\n"
    (mark,) = parse_bytes(header + b"1,T,,,https://e.com/,Work/Projects/Q3,,1700000000,,,\n")
    assert isinstance(mark, ParsedBookmark)
    assert mark.folder_path == ("Work", "Projects", "Q3")
    assert mark.added_at == utc(2023, 11, 14, 22, 13, 20)


def test_readwise_csv() -> None:
    entries = parse("readwise-reader-export.csv")
    by_url = marks("readwise-reader-export.csv")
    paper = by_url["https://arxiv.org/abs/1706.03762"]
    assert paper.tags == ("ai", "papers")
    assert (paper.read, paper.archived) == (True, True)
    assert paper.added_at == datetime(2023, 5, 2, 19, 47, 0, 442000, tzinfo=UTC)
    assert paper.extra == {"location": "archive", "seen": True}
    later = by_url["http://www.incompleteideas.net/IncIdeas/BitterLesson.html"]
    assert (later.read, later.archived, later.extra["location"]) == (False, False, "later")
    again = by_url["https://arxiv.org/abs/1706.03762?utm_campaign=shortlist"]
    assert again.tags == ("transformers", "reader's pick")
    feed = [e for e in entries if isinstance(e, SkippedEntry)]
    assert [(s.reason, s.url) for s in feed] == [
        ("feed", "https://newsletter.example.com/p/issue-42")
    ]


def test_omnivore_json() -> None:
    by_url = marks("omnivore-metadata_0_to_4.json")
    essay = by_url["https://nothinghuman.substack.com/p/the-tyranny-of-the-marginal-user"]
    assert essay.tags == ("software", "essays")
    assert (essay.read, essay.archived) == (True, True)  # progress 100, state Archived
    assert essay.added_at == datetime(2023, 10, 30, 12, 39, 28, 23000, tzinfo=UTC)
    assert essay.modified_at == utc(2023, 11, 1, 8)
    assert essay.description.startswith("Why consumer software")
    assert essay.extra == {"author": "Ivan Vendrov"}
    rust = by_url["https://bitbashing.io/async-rust.html"]
    assert (rust.read, rust.archived, rust.extra) == (False, False, {})  # 45%, no author


def test_wallabag_json() -> None:
    by_url = marks("wallabag-export.json")
    anne = by_url["https://blog.wikimedia.org/2016/02/10/anne-frank-diary-removal/"]
    assert anne.tags == ("copyright", "wikipedia")
    assert (anne.read, anne.archived) == (True, True)
    assert anne.added_at == utc(2016, 9, 8, 9, 55, 58)  # +0200
    assert anne.note == (
        "\u201cthe Anne Frank original text will be under copyright until 2042\u201d: "
        "The US term is 95 years from publication"
    )  # the highlight without a note adds nothing
    tails = by_url["https://tails.boum.org/news/version_2.0.1/index.en.html"]
    assert (tails.archived, tails.extra) == (False, {"favorite": True})
    assert "https://example.org/deleted-entry" not in by_url


def test_linkwarden_json() -> None:
    entries = parse("linkwarden-backup.json")
    by_url = marks("linkwarden-backup.json")
    assert by_url["https://linkwarden.app/"].folder_path == ("Unorganized",)
    assert by_url["https://linkwarden.app/"].tags == ("tools", "self-hosted")
    tokio = by_url["https://tokio.rs/tokio/tutorial"]
    # The Rust collection comes before its parent in the file.
    assert tokio.folder_path == ("Programming", "Rust")
    assert tokio.tags == ("rust", "async")
    assert tokio.added_at == utc(2021, 5, 4, 12)  # importDate before createdAt
    assert by_url["https://craftinginterpreters.com/"].folder_path == ("Programming",)
    assert [s.reason for s in entries if isinstance(s, SkippedEntry)] == ["empty"]  # a PDF


def test_linkwarden_collection_name_after_its_links() -> None:
    doc = {
        "collections": [
            {"links": [{"url": "https://e.com/1", "name": "one"}], "id": 7, "name": "Late"},
            {"id": 8, "parentId": 9, "name": "Orphan", "links": [{"url": "https://e.com/2"}]},
        ]
    }
    one, two = parse_bytes(json.dumps(doc).encode())
    assert isinstance(one, ParsedBookmark) and isinstance(two, ParsedBookmark)
    assert one.folder_path == ("Late",)
    assert two.folder_path == ("Orphan",)  # its parent never appears


def test_karakeep_json() -> None:
    entries = parse("karakeep-export.json")
    by_url = marks("karakeep-export.json")
    docs = by_url["https://www.postgresql.org/docs/current/routine-vacuuming.html"]
    assert docs.folder_path == ("Tech", "Databases")  # a child list listed before its parent
    assert docs.note == "Check the autovacuum section before tuning"
    assert docs.description.startswith("PostgreSQL databases require")
    assert (docs.archived, docs.extra) == (False, {"favorite": True})
    assert docs.added_at == utc(2023, 11, 14, 22, 13, 20)
    falsehoods = by_url[
        "https://infiniteundo.com/post/25326999628/falsehoods-programmers-believe-about-time"
    ]
    assert falsehoods.folder_path == () and falsehoods.archived is True  # a smart list only
    luke = by_url["https://use-the-index-luke.com/"]
    assert luke.folder_path == ("Tech",)
    assert luke.extra["lists"] == ["Tech", "Tech / Databases"]
    assert [s.detail for s in entries if isinstance(s, SkippedEntry)] == [
        "a Karakeep text bookmark, not a link",
        "a Karakeep asset bookmark, not a link",
    ]


def test_karakeep_lists_before_bookmarks_are_used_at_once() -> None:
    doc = {
        "lists": [{"id": "a", "name": "A", "type": "manual", "parentId": None}],
        "bookmarks": [
            {
                "createdAt": 1,
                "tags": [],
                "lists": ["a", "gone"],
                "note": None,
                "content": {"type": "link", "url": "https://e.com/"},
                "title": None,
            },
        ],
    }
    (mark,) = parse_bytes(json.dumps(doc).encode())
    assert isinstance(mark, ParsedBookmark) and mark.folder_path == ("A",)


def test_onetab() -> None:
    entries = parse("onetab.txt")
    by_url = marks("onetab.txt")
    hn = by_url["https://news.ycombinator.com/item?id=38309611"]
    assert hn.title == "Ask HN: What are you working on? | Hacker News"  # split at the first
    assert hn.extra == {"group": 1}
    assert by_url["https://docs.celeryq.dev/en/stable/userguide/tasks.html"].extra == {"group": 2}
    assert [s.reason for s in entries if isinstance(s, SkippedEntry)] == ["browser"]


def test_url_list() -> None:
    by_url = marks("urls.txt")
    assert by_url["https://www.brendangregg.com/linuxperf.html"].title == "Linux Performance"
    assert "ftp://ftp.gnu.org/gnu/" in by_url
    assert all(not url.startswith("#") for url in by_url)


def test_an_overlong_line_is_skipped_not_read_whole() -> None:
    data = b"https://e.com/1\n" + b"x" * (3 << 20) + b"\nhttps://e.com/2\n"
    entries = parse_bytes(data)
    assert [type(e).__name__ for e in entries] == [
        "ParsedBookmark",
        "SkippedEntry",
        "ParsedBookmark",
    ]


@pytest.mark.parametrize("name", list(FIXTURES))
def test_every_truncation_point_is_safe(name: str) -> None:
    data = (TOOLS / name).read_bytes()
    fmt = FIXTURES[name][0]
    # Every URL the whole file holds, skipped ones too: a cut can turn Readwise's "feed"
    # into "fe" and so import what the whole file skips.
    full = [e.url for e in parse_bytes(data)]
    for cut in range(1, len(data), 5):
        try:
            urls = [b.url for b in parse_bytes(data[:cut], fmt) if isinstance(b, ParsedBookmark)]
        except BookmarkFormatError:
            continue
        # A prefix yields bookmarks of the whole file (the last one's URL may be cut short).
        assert len(urls) <= len(full)
        assert all(any(f.startswith(u) for f in full) for u in urls), (cut, urls)


# --------------------------------------------------------------------------- properties


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_tool_exports_never_crash(data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(list(FIXTURES)))
    raw = mutate(data, (TOOLS / name).read_bytes())
    consume(raw, data.draw(st.sampled_from([None, FIXTURES[name][0]])))


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_KEYS = st.sampled_from(
    [
        "url",
        "given_url",
        "title",
        "tags",
        "labels",
        "lists",
        "content",
        "type",
        "name",
        "id",
        "parentId",
        "links",
        "note",
        "createdAt",
        "savedAt",
        "is_archived",
        "annotations",
        "state",
        "readingProgress",
        "deleted_at",
        "description",
        "importDate",
    ]
)
_LOOSE_OBJECT = st.dictionaries(_KEYS, _JSON | st.text(max_size=30), max_size=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(["omnivore_json", "wallabag_json", "linkwarden_json", "karakeep_json"]),
    st.lists(_LOOSE_OBJECT | _JSON, max_size=5),
    st.dictionaries(
        st.sampled_from(["bookmarks", "lists", "collections", "pinnedLinks"]),
        st.lists(_LOOSE_OBJECT | _JSON, max_size=4) | _JSON,
        max_size=4,
    ),
    st.integers(0, 100),
)
def test_json_shaped_garbage_never_crashes(
    fmt: str, elements: list[object], members: dict[str, object], cut: int
) -> None:
    for doc in (elements, members, {"collections": [{"name": "c", "links": elements}]}):
        raw = json.dumps(doc).encode()
        consume(raw, fmt)
        consume(raw[: len(raw) * cut // 100], fmt)


_CSV_HEADERS = {
    "pocket_csv": "title,url,time_added,tags,status",
    "instapaper_csv": "URL,Title,Selection,Folder,Timestamp,Tags",
    "raindrop_csv": "id,title,note,excerpt,url,folder,tags,created,cover,highlights,favorite",
    "readwise_csv": "Title,URL,ID,Document tags,Saved date,Reading progress,Location,Seen",
}
_CELL = st.one_of(
    st.text(max_size=15),
    st.sampled_from(
        [
            "https://e.com/",
            '["a", 1]',
            "['x', \"y's\"]",
            "a|b",
            "Archive",
            "feed",
            "1.5",
            "nan",
            "-3",
            "1e999",
            "35%",
            "Unsorted",
            "x / y/z",
            '"',
            "\r",
            "",
        ]
    ),
)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(list(_CSV_HEADERS)),
    st.lists(st.lists(_CELL, max_size=12), max_size=6),
    st.sampled_from([",", ";", "\t"]),
)
def test_csv_shaped_garbage_never_crashes(fmt: str, rows: list[list[str]], sep: str) -> None:
    lines = [_CSV_HEADERS[fmt]] + [sep.join(row) for row in rows]
    consume("\n".join(lines).encode("utf-8", "surrogatepass"), fmt)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["onetab", "url_list", "pocket_html"]),
    st.lists(
        st.one_of(
            st.text(max_size=30),
            st.sampled_from(
                [
                    "https://e.com/ | T",
                    " | ",
                    "#",
                    "\r",
                    "<a href='x'>",
                    "</a>",
                    "<h1>Read Archive</h1>",
                    "<!--",
                    "-->",
                    "<",
                    ">",
                    "&amp;",
                    "time_added='1e99'",
                    "javascript:x",
                ]
            ),
        ),
        max_size=40,
    ),
)
def test_line_and_markup_garbage_never_crashes(fmt: str, parts: list[str]) -> None:
    consume("\n".join(parts).encode("utf-8", "surrogatepass"), fmt)


def test_pocket_html_garbage_is_linear() -> None:
    import time

    data = b"<h1>Unread</h1><ul><li><a href='https://e.com/1'>one</a>" + b"<a " * (1 << 17)
    data += b"<" * (1 << 17) + b"<!--" + b"x" * (1 << 20)
    started = time.perf_counter()
    entries = parse_bytes(data, "pocket_html")
    assert time.perf_counter() - started < 20
    assert isinstance(entries[0], ParsedBookmark) and entries[0].url == "https://e.com/1"


# --------------------------------------------------------------------------- producers


def test_client_refuses_an_unknown_format() -> None:
    with pytest.raises(ValueError, match=r"unknown bookmark format 'opml'.*onetab"):
        client.import_bookmarks("user-x", "/nowhere", fmt="opml")


def test_cli_passes_the_format(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from worker.cli import cli

    calls: list[tuple[str, str | None]] = []

    def fake(user_id: str, path: Path, *, fmt: str | None = None) -> int:
        calls.append((user_id, fmt))
        return 7

    monkeypatch.setattr(client, "import_bookmarks", fake)
    path = tmp_path / "links.txt"
    path.write_text("https://e.com/\n")
    runner = CliRunner()
    result = runner.invoke(
        cli, ["import", "bookmarks", str(path), "--user", "u", "--format", "onetab"]
    )
    assert result.exit_code == 0, result.output
    assert calls == [("u", "onetab")]
    refused = runner.invoke(cli, ["import", "bookmarks", str(path), "--user", "u", "--format", "x"])
    assert refused.exit_code != 0 and "karakeep_json" in refused.output


# --------------------------------------------------------------------------- whole imports


@pytest.mark.integration
def test_every_tool_export_imports_for_one_user(
    celery_worker, upload_root: Path, user_id: str
) -> None:  # type: ignore[no-untyped-def]
    target = upload_root / user_id
    target.mkdir(parents=True)
    for name, (fmt, entries, distinct, duplicates, skipped) in FIXTURES.items():
        shutil.copy(TOOLS / name, target / name)
        job = client.import_bookmarks(user_id, target / name)
        progress = client.wait_for_import(user_id, job, timeout=300)
        assert progress.status == "done", (name, progress, celery_worker.log()[-3000:])
        assert progress.source_format == fmt
        assert (progress.total, progress.processed) == (entries, entries)
        assert (progress.created, progress.duplicates) == (distinct, duplicates), name
        assert progress.skipped_reasons == skipped and progress.failed == 0

    # The producer names the format: the generic CSV reader reads Pocket's file.
    shutil.copy(TOOLS.parent / "pocket.csv", target / "pocket.csv")
    job = client.import_bookmarks(user_id, target / "pocket.csv", fmt="csv")
    progress = client.wait_for_import(user_id, job, timeout=300)
    assert (progress.status, progress.source_format, progress.created) == ("done", "csv", 2)

    with session_scope() as s:
        rows = {
            r.canonical_url: r
            for r in s.execute(
                text(
                    "SELECT b.canonical_url, b.folder_path, b.tags, b.note, b.description, "
                    "b.is_read, b.is_archived, b.extra, b.added_at, i.status, "
                    "(SELECT count(*) FROM embedding e WHERE e.item_id = i.id) AS vectors "
                    "FROM bookmark b JOIN item i ON i.id = b.item_id WHERE b.user_id = :u"
                ),
                {"u": user_id},
            )
        }
    assert len(rows) == sum(f[2] for f in FIXTURES.values()) + 2
    assert all(r.status == "done" and r.vectors == 1 for r in rows.values())

    def row(url: str) -> Any:
        return rows[canonicalize(url)]

    atlantic = row("https://www.theatlantic.com/technology/archive/2023/07/slow-web/674522/")
    assert sorted(atlantic.tags) == ["favorites", "longread", "web"]  # merged with its twin
    assert (atlantic.is_read, atlantic.is_archived) == (False, False)
    book = row("https://doc.rust-lang.org/book/")
    assert book.folder_path == ["Development", "Languages/Rust"]
    assert book.extra == {
        "favorite": False,
        "highlights": "Ownership is Rust\u2019s most unique feature",
    }
    tokio = row("https://tokio.rs/tokio/tutorial")
    assert tokio.folder_path == ["Programming", "Rust"]
    assert tokio.added_at == utc(2021, 5, 4, 12)
    pizza = row("https://www.seriouseats.com/the-pizza-lab-three-ingredient-pizza-dough")
    assert pizza.folder_path == ["Recipes"]
    anne = row("https://blog.wikimedia.org/2016/02/10/anne-frank-diary-removal/")
    assert sorted(anne.tags) == ["copyright", "law", "wikipedia"]
    assert "95 years" in anne.note and (anne.is_read, anne.is_archived) == (True, True)
    docs = row("https://www.postgresql.org/docs/current/routine-vacuuming.html")
    assert docs.folder_path == ["Tech", "Databases"]
    assert sorted(docs.tags) == ["databases", "postgres", "reading"]
    assert docs.note.startswith("Check the autovacuum") and docs.extra == {"favorite": True}
    paper = row("https://arxiv.org/abs/1706.03762")
    assert sorted(paper.tags) == ["ai", "papers", "reader's pick", "transformers"]
    assert (paper.is_read, paper.is_archived) == (True, True)
    assert row("https://grugbrain.dev/").is_read is False
    assert row("https://docs.celeryq.dev/en/stable/userguide/tasks.html").extra == {"group": 2}
    assert row("https://example.com/archived").is_archived is True  # read by the generic CSV

    # Importing the same exports again adds nothing and keeps what is stored.
    name = "karakeep-export.json"
    again = client.wait_for_import(user_id, client.import_bookmarks(user_id, target / name))
    assert (again.status, again.created, again.duplicates) == ("done", 0, FIXTURES[name][1] - 2)
    with session_scope() as s:
        kept = s.execute(
            text(
                "SELECT note, extra, is_archived, folder_path FROM bookmark "
                "WHERE user_id = :u AND canonical_url = :c"
            ),
            {"u": user_id, "c": docs.canonical_url},
        ).one()
    assert (kept.note, kept.extra, kept.is_archived) == (docs.note, docs.extra, False)
    assert kept.folder_path == ["Tech", "Databases"]


@pytest.mark.integration
def test_unrecognised_export_fails_with_the_formats_we_take(
    celery_worker, upload_root: Path, user_id: str
) -> None:  # type: ignore[no-untyped-def]
    path = upload_root / f"{user_id}-notes.json"
    path.write_text('{"notes": ["not", "bookmarks"]}')
    progress = client.wait_for_import(user_id, client.import_bookmarks(user_id, path))
    assert progress.status == "failed" and progress.error is not None
    assert progress.error.startswith(f"{path.name}: this is a JSON object")
    for label in FORMAT_LABELS.values():
        assert label in progress.error


# --------------------------------------------------------------------------- size


def big_linkwarden(links_per_collection: int, collections: int) -> bytes:
    """A Linkwarden export whose links carry page text (older exports included it)."""
    page = "Lorem ipsum dolor sit amet. " * 80  # ~2 KiB per link
    cols = []
    for c in range(collections):
        links = [
            {
                "id": c * links_per_collection + i,
                "name": f"Link {c}-{i}",
                "url": f"https://example.com/{c}/{i}",
                "textContent": page,
                "tags": [{"id": i % 5, "name": f"t{i % 5}"}],
                "createdAt": "2024-01-02T10:04:00.000Z",
            }
            for i in range(links_per_collection)
        ]
        cols.append({"id": c + 1, "name": f"C{c}", "parentId": None, "links": links})
    return json.dumps({"name": "x", "collections": cols, "pinnedLinks": cols[0]["links"]}).encode()


def test_linkwarden_streams_in_bounded_memory(tmp_path: Path) -> None:
    import tracemalloc

    path = tmp_path / "backup.json"
    path.write_bytes(big_linkwarden(2500, 4))
    assert path.stat().st_size > 20_000_000
    tracemalloc.start()
    try:
        count, last = 0, None
        with path.open("rb") as fp:
            for entry in iter_bookmarks(fp):
                assert isinstance(entry, ParsedBookmark)
                count, last = count + 1, entry
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 10_000
    assert last is not None and last.folder_path == ("C3",) and last.tags == ("t4",)
    assert peak < 16 * 1024 * 1024  # a fraction of the 20 MB file


def test_karakeep_elements_spanning_blocks() -> None:
    bookmarks = [
        {
            "createdAt": 1700000000 + i,
            "title": "x" * (i * 37 % 5000),
            "tags": ["a"],
            "lists": ["l"] if i % 2 else [],
            "content": {"type": "link", "url": f"https://e.com/{i}"},
            "note": None,
        }
        for i in range(400)
    ]
    data = json.dumps({"bookmarks": bookmarks, "lists": [{"id": "l", "name": "L"}]}).encode()
    assert len(data) > 3 * 65536
    marks = [e for e in parse_bytes(data) if isinstance(e, ParsedBookmark)]
    assert sorted(m.url for m in marks) == sorted(f"https://e.com/{i}" for i in range(400))
    assert all(m.folder_path == (("L",) if int(m.url.rsplit("/", 1)[1]) % 2 else ()) for m in marks)
