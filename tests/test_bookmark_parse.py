"""Streaming bookmark parsers: real browser export shapes, damaged files, bounded memory."""

from __future__ import annotations

import io
import time
import tracemalloc
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from testsupport import consume, mutate

from worker.bookmarks.parse import (
    FORMATS,
    ParsedBookmark,
    SkippedEntry,
    detect_format,
    iter_bookmarks,
)
from worker.errors import BookmarkFormatError

FIXTURES = Path(__file__).parent / "fixtures" / "bookmarks"

Entry = ParsedBookmark | SkippedEntry


def parse_bytes(data: bytes, **kwargs: str) -> list[Entry]:
    return list(iter_bookmarks(io.BytesIO(data), **kwargs))


def parse_fixture(name: str, fmt: str | None = None) -> list[Entry]:
    with (FIXTURES / name).open("rb") as fp:
        return list(iter_bookmarks(fp, fmt=fmt, filename=name))


def bookmarks(entries: list[Entry]) -> list[ParsedBookmark]:
    return [e for e in entries if isinstance(e, ParsedBookmark)]


def skipped(entries: list[Entry]) -> list[SkippedEntry]:
    return [e for e in entries if isinstance(e, SkippedEntry)]


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("chrome.html", "netscape"),
        ("firefox.html", "netscape"),
        ("safari.html", "netscape"),
        ("edge.html", "netscape"),
        ("messy.html", "netscape"),
        ("windows1252.html", "netscape"),
        ("pinboard.json", "pinboard_json"),
        ("bookmarks.csv", "raindrop_csv"),  # Raindrop's header: read by its own parser
        ("pocket.csv", "pocket_csv"),
    ],
)
def test_detect_format_of_fixtures(name: str, fmt: str) -> None:
    assert detect_format((FIXTURES / name).read_bytes()[:65536]) == fmt


@pytest.mark.parametrize(
    ("head", "message"),
    [
        pytest.param(b"", "the file is empty", id="empty"),
        pytest.param(b"  \r\n\t ", "the file is empty", id="whitespace"),
        pytest.param(b"\xef\xbb\xbf", "the file is empty", id="bom-only"),
        pytest.param(bytes(range(256)) * 4, "binary", id="binary-garbage"),
        pytest.param(b"SQLite format 3\x00" + b"\x00" * 100, "places.sqlite", id="sqlite"),
        pytest.param(b"\x1f\x8b\x08\x00" + b"\x00" * 20, "gzip", id="gzip"),
        pytest.param(b'{"checksum": "ab", "roots": {}}', "Chrome's internal", id="chrome-json"),
        pytest.param(b'{"guid":"root________","children":[]}', "Firefox JSON", id="firefox-json"),
        pytest.param(b"<html><body><p>Hello</p></body></html>", "no bookmark list", id="html-page"),
        pytest.param(b"just some words\nand more words\n", "not a bookmark export", id="prose"),
    ],
)
def test_detect_format_rejects(head: bytes, message: str) -> None:
    with pytest.raises(BookmarkFormatError, match=message) as info:
        detect_format(head)
    if message not in {"the file is empty"}:
        assert "Netscape bookmark HTML" in str(info.value)  # lists the formats we take


def test_iter_bookmarks_errors_name_the_file() -> None:
    with pytest.raises(BookmarkFormatError, match=r"^export\.html: the file is empty$"):
        iter_bookmarks(io.BytesIO(b""), filename="export.html")


def test_unknown_format_argument() -> None:
    with pytest.raises(BookmarkFormatError, match="unknown bookmark format"):
        iter_bookmarks(io.BytesIO(b"<DL>"), fmt="opml")


# --------------------------------------------------------------------------- Chrome / Edge


def test_chrome_export() -> None:
    entries = parse_fixture("chrome.html")
    marks = bookmarks(entries)
    assert len(marks) == 6
    assert [(s.reason, s.url[:11]) for s in skipped(entries)] == [
        ("javascript", "javascript:"),
        ("browser", "chrome://se"),
    ]
    assert [b.folder_path for b in marks] == [
        ("Bookmarks bar",),
        ("Bookmarks bar", "Dev"),
        ("Bookmarks bar", "Dev"),
        ("Bookmarks bar", "Dev", "Databases"),
        (),
        (),
    ]
    assert [b.toolbar for b in marks] == [True, True, True, True, False, False]
    assert marks[0] == ParsedBookmark(
        url="https://www.python.org/",
        title="Welcome to Python.org",
        folder_path=("Bookmarks bar",),
        added_at=utc(2023, 1, 1),
        toolbar=True,
    )  # ICON is not kept anywhere
    assert marks[2].title == "Highest scored 'python' questions - Stack Overflow"
    assert marks[4].url == "https://example.com/article?id=7&utm_source=newsletter"
    assert marks[4].title == "Q&A: An article"
    assert marks[4].added_at == utc(2023, 11, 14, 22, 13, 20)


def test_edge_export() -> None:
    entries = parse_fixture("edge.html")
    marks = bookmarks(entries)
    assert [b.title for b in marks] == [
        "Bing",
        "Outlook",
        "Azure documentation | Microsoft Learn",
        "MSN",
    ]
    assert [b.toolbar for b in marks] == [True, True, False, False]
    assert [b.folder_path for b in marks] == [("Favorites bar",)] * 2 + [("Work",), ()]
    assert [(s.reason, s.url) for s in skipped(entries)] == [
        ("browser", "edge://settings/profiles")
    ]
    assert marks[0].added_at == utc(2023, 7, 22, 4, 26, 41)


# --------------------------------------------------------------------------- Firefox


def test_firefox_export() -> None:
    entries = parse_fixture("firefox.html")
    marks = bookmarks(entries)
    assert len(marks) == 7
    assert Counter(s.reason for s in skipped(entries)) == {"place": 2, "about": 1}
    assert [b.folder_path for b in marks] == [("Mozilla Firefox",)] * 4 + [
        ("Bookmarks Toolbar",),
        ("Bookmarks Toolbar",),
        ("Other Bookmarks",),
    ]
    assert [b.toolbar for b in marks] == [False] * 4 + [True, True, False]
    # The folder's own DD ("Add bookmarks to this folder ...") describes no bookmark.
    assert all("Add bookmarks" not in b.description for b in marks)


def test_firefox_tags_descriptions_and_microsecond_dates() -> None:
    marks = {b.title: b for b in bookmarks(parse_fixture("firefox.html"))}
    mdn = marks["HTML: HyperText Markup Language | MDN"]
    assert mdn.tags == ("html", "Reference", "docs")
    assert mdn.description == "The <html> element reference & guides"
    assert mdn.added_at == utc(2023, 3, 28, 10, 40)
    assert mdn.modified_at == datetime(2023, 3, 28, 10, 40, 0, 123456, tzinfo=UTC)
    tutorial = marks["The Python Tutorial — Python 3.12 documentation"]
    assert tutorial.tags == ("python", "tutorial")  # case-insensitive dedupe, first spelling
    assert tutorial.description == "Start here.\nThen read the library reference."
    assert tutorial.extra == {"keyword": "pyt"}
    assert marks["Get Help"].modified_at == utc(2022, 8, 8, 23, 6, 40)


# --------------------------------------------------------------------------- Safari


def test_safari_export() -> None:
    marks = bookmarks(parse_fixture("safari.html"))
    assert [(b.title, b.folder_path, b.toolbar) for b in marks] == [
        ("Apple", ("Favorites",), True),
        ("iCloud", ("Favorites",), True),
        ("BBC News - Home", ("Favorites", "News"), True),
        ("Wikipedia, the free encyclopedia", ("Bookmarks Menu",), False),
        ("A long read", ("Reading List",), False),
    ]
    assert all(b.added_at is None and b.modified_at is None for b in marks)
    assert marks[-1].extra == {"reading_list": True}
    assert marks[-1].read is False and marks[0].read is None  # Reading List: not read yet
    assert marks[-1].description == "The first lines of the article, as Safari saved them."


# --------------------------------------------------------------------------- messy HTML


def test_messy_html_case_unquoted_and_unclosed_tags() -> None:
    entries = parse_fixture("messy.html")
    assert [type(e).__name__[0] + ":" + (e.url if e.url else "-") for e in entries] == [
        "P:https://example.com/a",
        "P:https://example.com/b",
        "S:-",
        "S:-",
        "P:https://example.com/c",
        "S:data:text/html;base64,PGgxPkhpPC9oMT4=",
        "S:file:///home/me/notes.txt",
        "S:relative/path.html",
        "P:https://example.com/d",
        "P:https://example.com/top",
    ]
    first, second, third, bad_dates, top = bookmarks(entries)
    assert first.title == "Article été & more"  # entities decoded
    assert first.tags == ("News", "World")
    assert first.description == "First line"
    assert first.folder_path == ("Reading",)
    assert first.added_at == utc(2020, 9, 13, 12, 26, 40)  # milliseconds
    assert second.title == "Spaced title"
    assert second.added_at == utc(2020, 9, 13, 12, 26, 40)  # microseconds
    assert third.title == ""  # empty title allowed
    assert third.url == "https://example.com/c"
    assert (bad_dates.added_at, bad_dates.modified_at) == (None, None)
    assert top.folder_path == () and top.description == "described"
    reasons = [s.reason for s in skipped(entries)]
    assert reasons == ["empty", "empty", "data", "file", "invalid"]
    assert skipped(entries)[0].detail == "<A> without HREF"


def test_windows_1252_declared_charset() -> None:
    (mark,) = parse_fixture("windows1252.html")
    assert isinstance(mark, ParsedBookmark)
    assert mark.title == "Café “Le Procope” \u2013 Paris"  # en dash
    assert mark.folder_path == ("Résumés",)
    assert mark.description == "L\u2019histoire du café"  # curly apostrophe
    assert mark.url == "https://example.fr/café"


def test_cp1252_without_declaration() -> None:
    data = b'<DL><DT><A HREF="https://e.com/">Caf\xe9 \x93x\x94</A></DL>'
    (mark,) = parse_bytes(data)
    assert isinstance(mark, ParsedBookmark) and mark.title == "Café “x”"


def test_utf8_with_stray_cp1252_bytes_after_the_head() -> None:
    # The first 64 KiB are valid UTF-8, so the file is read as UTF-8; a cp1252 byte further
    # on is decoded as cp1252 instead of becoming U+FFFD.
    head = b"<!DOCTYPE NETSCAPE-Bookmark-file-1><!-- " + "é".encode() * 40_000 + b" -->"
    data = head + '<DL><DT><A HREF="https://e.com/1">Crème</A>'.encode()
    data += b'<DT><A HREF="https://e.com/2">Caf\xe9 \x93x\x94</A>'
    assert [b.title for b in bookmarks(parse_bytes(data))] == ["Crème", "Café “x”"]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-8-sig"])
def test_bom_decides_encoding(encoding: str) -> None:
    data = '<DL><p><DT><A HREF="https://e.com/ü">Grüße</A></DL>'.encode(encoding)
    (mark,) = parse_bytes(data)
    assert isinstance(mark, ParsedBookmark)
    assert (mark.title, mark.url) == ("Grüße", "https://e.com/ü")


@pytest.mark.parametrize(
    ("add_date", "expected"),
    [
        pytest.param("1600000000", utc(2020, 9, 13, 12, 26, 40), id="seconds"),
        pytest.param("1600000000.5", datetime(2020, 9, 13, 12, 26, 40, 500000, UTC), id="float"),
        pytest.param("1600000000000", utc(2020, 9, 13, 12, 26, 40), id="milliseconds"),
        pytest.param("1600000000000001", datetime(2020, 9, 13, 12, 26, 40, 1, UTC), id="micros"),
        pytest.param("1600000000000000000", utc(2020, 9, 13, 12, 26, 40), id="nanoseconds"),
        pytest.param("0", None, id="zero"),
        pytest.param("-1", None, id="negative"),
        pytest.param("", None, id="blank"),
        pytest.param("nan", None, id="nan"),
        pytest.param("9" * 40, None, id="absurd"),
    ],
)
def test_add_date_units(add_date: str, expected: datetime | None) -> None:
    data = f'<DL><DT><A HREF="https://e.com/" ADD_DATE="{add_date}">t</A></DL>'.encode()
    (mark,) = parse_bytes(data)
    assert isinstance(mark, ParsedBookmark) and mark.added_at == expected


def test_folder_without_dl_and_missing_close_dl() -> None:
    data = (
        b"<DL><p><DT><H3>Empty</H3><DT><A HREF='https://e.com/1'>one</A>"
        b"<DT><H3>Open</H3><DL><p><DT><A HREF='https://e.com/2'>two</A>"  # no </DL>
    )
    marks = bookmarks(parse_bytes(data))
    assert [b.folder_path for b in marks] == [(), ("Open",)]


def test_stray_close_dl_is_ignored() -> None:
    data = b"</DL></DL><DL><DT><A HREF='https://e.com/'>x</A></DL></DL>"
    assert [b.title for b in bookmarks(parse_bytes(data))] == ["x"]


def test_script_and_marked_sections_do_not_swallow_bookmarks() -> None:
    data = (
        b"<DL><script>var x = '<DT>';<DT><A HREF='https://e.com/1'>one</A>"
        b"<![bogus section]><![if x]>hi<![endif]>"
        b"<DT><A HREF='https://e.com/2'>two</A></DL>"
    )
    assert [b.title for b in bookmarks(parse_bytes(data))] == ["one", "two"]


def test_huge_unterminated_tag_is_dropped_not_buffered() -> None:
    data = b"<DL><DT><A HREF='https://e.com/1'>one</A><DT><A HREF='" + b"x" * (9 << 20)
    entries = parse_bytes(data)
    assert [b.title for b in bookmarks(entries)] == ["one"]
    assert [s.reason for s in skipped(entries)] == ["malformed"]


GARBAGE = {
    "stray-lt": b"<" * (1 << 17),
    "many-attributes": b"<a " + b"x=1 " * (1 << 17) + b">",
    "unclosed-attributes": b"<a " + b"<a " * (1 << 17),
    "unterminated-comment": b"<!--" + b"x" * (3 << 20),
    "ampersands": b"&" * (3 << 20),
    "nested-dl": b"<DL>" * (1 << 15),
}


@pytest.mark.parametrize("name", list(GARBAGE))
def test_pathological_markup_is_bounded(name: str) -> None:
    # Each of these once made html.parser take minutes or hundreds of MB.
    data = b"<DL><DT><A HREF='https://e.com/1'>one</A>" + GARBAGE[name]
    data += b"<DT><A HREF='https://e.com/2'>two</A>"
    tracemalloc.start()
    started = time.perf_counter()
    try:
        entries = parse_bytes(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 20
    assert peak < 50 * 1024 * 1024
    assert bookmarks(entries)[0].title == "one"


# --------------------------------------------------------------------------- damage


def test_truncated_netscape_keeps_earlier_bookmarks() -> None:
    data = (FIXTURES / "chrome.html").read_bytes()
    cut = data.index(b"https://www.postgresql.org") - 20  # inside the <A> start tag
    marks = bookmarks(parse_bytes(data[:cut]))
    assert [b.title for b in marks] == [
        "Welcome to Python.org",
        "GitHub",
        "Highest scored 'python' questions - Stack Overflow",
    ]


@pytest.mark.parametrize("name", ["chrome.html", "firefox.html", "pinboard.json", "bookmarks.csv"])
def test_every_truncation_point_is_safe(name: str) -> None:
    data = (FIXTURES / name).read_bytes()
    full = [b.url for b in bookmarks(parse_bytes(data))]
    for cut in range(1, len(data), 7):
        try:
            urls = [b.url for b in bookmarks(parse_bytes(data[:cut]))]
        except BookmarkFormatError:
            continue  # too little left to tell the format
        # A prefix yields a prefix (the last one may be cut short or still be pending).
        assert len(urls) <= len(full)
        assert all(full[i] == u or full[i].startswith(u) for i, u in enumerate(urls))


def test_one_bad_entry_among_good_netscape() -> None:
    data = (
        b"<DL><DT><A HREF='https://e.com/1'>one</A>"
        b"<DT><A HREF='http://exa mple.com/'>bad host</A>"
        b"<DT><A HREF='https://e.com/3'>three</A></DL>"
    )
    entries = parse_bytes(data)
    assert [type(e).__name__ for e in entries] == [
        "ParsedBookmark",
        "SkippedEntry",
        "ParsedBookmark",
    ]
    assert skipped(entries)[0] == SkippedEntry(
        "invalid", "http://exa mple.com/", "invalid URL not imported"
    )


def test_large_data_url_is_reported_short() -> None:
    data = b"<DL><DT><A HREF='data:image/png;base64," + b"A" * 500_000 + b"'>img</A></DL>"
    (entry,) = parse_bytes(data)
    assert isinstance(entry, SkippedEntry) and entry.reason == "data"
    assert len(entry.url) == 2048


def test_two_megabyte_single_line() -> None:
    one = '<DT><A HREF="https://example.com/p/{i}" ADD_DATE="1600000000">Page {i}</A>'
    line = "<DL><p>" + "".join(one.format(i=i) for i in range(30_000)) + "</DL>"
    data = line.encode()
    assert len(data) > 2_000_000 and b"\n" not in data
    marks = bookmarks(parse_bytes(data))
    assert len(marks) == 30_000
    assert marks[-1].title == "Page 29999"


# --------------------------------------------------------------------------- Pinboard JSON


def test_pinboard_json() -> None:
    entries = parse_fixture("pinboard.json")
    marks = bookmarks(entries)
    assert [s.reason for s in skipped(entries)] == ["javascript"]
    assert marks[0] == ParsedBookmark(
        url="https://pinboard.in/howto/",
        title="Pinboard - how to",
        tags=("pinboard", "API", "howto"),
        description="Everything about the API.",
        added_at=utc(2023, 1, 5, 12, 34, 56),
        read=True,  # toread "no"
        extra={"shared": True},
    )
    assert marks[1].read is False and marks[1].extra == {"shared": False}
    assert marks[1].tags == ()
    assert marks[2].title == "Café “quoted”"
    assert marks[2].description == "Line one\nLine two"
    assert marks[2].added_at == utc(2023, 3, 1, 8)  # +02:00 converted to UTC


def test_pinboard_truncated_reports_one_malformed() -> None:
    data = (FIXTURES / "pinboard.json").read_bytes()
    cut = data.index(b"https:\\/\\/example.org") + 13
    entries = parse_bytes(data[:cut])
    assert len(bookmarks(entries)) == 2
    assert [s.reason for s in skipped(entries)] == ["javascript", "malformed"]
    assert skipped(entries)[1].url == "https://exa"


def test_pinboard_bad_element_among_good() -> None:
    data = (
        b'[{"href":"https://e.com/1","description":"one"},'
        b'{"href":"https://e.com/2","description":"two", oops},'
        b'{"href":"https://e.com/3","description":"three","time":"not a date"},'
        b'"a string", 42,'
        b'{"href":["not","a","string"]},'
        b'{"description":"no href"}]'
    )
    entries = parse_bytes(data)
    assert [b.title for b in bookmarks(entries)] == ["one", "three"]
    assert bookmarks(entries)[1].added_at is None
    assert [(s.reason, s.url) for s in skipped(entries)] == [
        ("malformed", "https://e.com/2"),
        ("malformed", ""),
        ("malformed", ""),
        ("malformed", ""),
        ("empty", ""),
    ]


def test_pinboard_elements_spanning_blocks() -> None:
    items = [
        f'{{"href":"https://e.com/{i}","description":"{"x" * (i * 37 % 5000)}","tags":"a b"}}'
        for i in range(400)
    ]
    data = ("[\n" + ",\n".join(items) + "\n]").encode()
    assert len(data) > 3 * 65536
    marks = bookmarks(parse_bytes(data))
    assert [b.url for b in marks] == [f"https://e.com/{i}" for i in range(400)]


def test_pinboard_not_an_array() -> None:
    with pytest.raises(BookmarkFormatError, match="must be a JSON array"):
        parse_bytes(b'{"href": "x"}', fmt="pinboard_json")


# --------------------------------------------------------------------------- CSV


def test_csv_raindrop_shape() -> None:
    entries = parse_fixture("bookmarks.csv", fmt="csv")  # the generic CSV reader
    marks = bookmarks(entries)
    assert [s.reason for s in skipped(entries)] == ["empty", "javascript"]
    assert marks[0] == ParsedBookmark(
        url="https://raindrop.io/",
        title="Raindrop.io, the bookmark manager",
        folder_path=("Tools", "Bookmarking"),
        tags=("bookmarks", "tools"),
        description="My note",
        added_at=utc(2023, 4, 1, 9, 30),
        extra={"favorite": True},
    )
    assert marks[1].added_at == utc(2023, 4, 1, 9, 30)  # unix seconds
    assert marks[1].description == "The official home"  # excerpt when note is empty
    assert marks[2].title == "Bad date row" and marks[2].added_at is None
    assert marks[3].title == "Multi line title"
    assert marks[3].tags == ("a", "b", "c")
    assert marks[3].added_at == utc(2023, 4, 2)


def test_csv_pocket_shape() -> None:
    marks = bookmarks(parse_fixture("pocket.csv", fmt="csv"))
    assert [(b.url, b.tags, b.archived) for b in marks] == [
        ("https://example.com/pocket", ("reading", "Tech"), False),
        ("https://example.com/archived", (), True),
    ]


@pytest.mark.parametrize("column", ["URL", "Href", "link"])
def test_csv_url_column_names(column: str) -> None:
    data = f"Name;{column};Tags\nA page;https://e.com/;x y\n".encode()
    (mark,) = parse_bytes(data)
    assert isinstance(mark, ParsedBookmark)
    assert (mark.title, mark.url, mark.tags) == ("A page", "https://e.com/", ("x", "y"))


def test_csv_without_url_column_names_the_columns() -> None:
    with pytest.raises(BookmarkFormatError, match=r"no url column.*'title', 'address'"):
        parse_bytes(b"title,address\nx,https://e.com/\n", filename="x.csv")


def test_csv_short_rows_and_blank_lines() -> None:
    data = b"url,title,tags\nhttps://e.com/1\n\n,,\nhttps://e.com/2,two,a|b\n"
    marks = bookmarks(parse_bytes(data))
    assert [(b.url, b.title, b.tags) for b in marks] == [
        ("https://e.com/1", "", ()),
        ("https://e.com/2", "two", ("a", "b")),
    ]


# --------------------------------------------------------------------------- size


def write_big_export(path: Path, count: int) -> None:
    icon = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAABAAAAAQ"
    with path.open("w", encoding="utf-8") as out:
        out.write('<!DOCTYPE NETSCAPE-Bookmark-file-1>\n<META HTTP-EQUIV="Content-Type" ')
        out.write('CONTENT="text/html; charset=UTF-8">\n<H1>Bookmarks</H1>\n<DL><p>\n')
        for i in range(count):
            if i % 1000 == 0:
                out.write("    </DL><p>\n" if i else "")
                out.write(f"    <DT><H3>Folder {i // 1000}</H3>\n    <DL><p>\n")
            out.write(
                f'        <DT><A HREF="https://example.com/articles/{i}?page={i % 7}" '
                f'ADD_DATE="{1600000000 + i}" ICON="{icon}" TAGS="t{i % 13},common">'
                f"Bookmark {i} &amp; friends</A>\n"
            )
        out.write("    </DL><p>\n</DL><p>\n")


def count_parsed(path: Path) -> tuple[int, ParsedBookmark | None]:
    count, last = 0, None
    with path.open("rb") as fp:
        for entry in iter_bookmarks(fp):
            if isinstance(entry, ParsedBookmark):
                count, last = count + 1, entry
    return count, last


def test_bounded_memory_10k(tmp_path: Path) -> None:
    path = tmp_path / "big.html"
    write_big_export(path, 10_000)
    tracemalloc.start()
    try:
        count, last = count_parsed(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 10_000
    assert last is not None and last.folder_path == ("Folder 9",)
    assert peak < 10 * 1024 * 1024


@pytest.mark.slow
def test_100k_export_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "big.html"
    write_big_export(path, 100_000)
    assert path.stat().st_size > 14_000_000
    started = time.perf_counter()
    count, _ = count_parsed(path)
    elapsed = time.perf_counter() - started
    print(f"\n100k bookmarks: {elapsed:.2f}s, {count / elapsed:,.0f} bookmarks/s")
    tracemalloc.start()
    try:
        count, last = count_parsed(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 100_000
    assert last is not None and last.title == "Bookmark 99999 & friends"
    assert peak < 50 * 1024 * 1024


# --------------------------------------------------------------------------- properties


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=2000), st.sampled_from([None, *FORMATS]))
def test_random_text_never_crashes(text: str, fmt: str | None) -> None:
    consume(text.encode("utf-8", "surrogatepass"), fmt)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000), st.sampled_from([None, *FORMATS]))
def test_random_bytes_never_crash(data: bytes, fmt: str | None) -> None:
    consume(data, fmt)


_TOKENS = st.sampled_from(
    [
        "<DL>",
        "</DL>",
        "<DT>",
        "<DD>",
        "<H3>",
        "</H3>",
        "<A HREF='https://e.com/'>",
        "<a href=",
        "</A>",
        "<p>",
        "<!--",
        "-->",
        "<![",
        "]]>",
        "<script>",
        "&amp;",
        "&#",
        '"',
        "'",
        ">",
        "<",
        'TAGS="a,b"',
        'ADD_DATE="99999999999999999999"',
        "\x00",
        "\ufeff",
    ]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(_TOKENS, st.text(max_size=20)), max_size=120))
def test_tag_soup_never_crashes(parts: list[str]) -> None:
    consume(("<!DOCTYPE NETSCAPE-Bookmark-file-1>" + "".join(parts)).encode("utf-8", "replace"))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_exports_never_crash(data: st.DataObject) -> None:
    name = data.draw(
        st.sampled_from(["firefox.html", "chrome.html", "pinboard.json", "bookmarks.csv"])
    )
    consume(mutate(data, (FIXTURES / name).read_bytes()))


def test_netscape_toread_sets_the_read_state() -> None:
    data = (
        b"<!DOCTYPE NETSCAPE-Bookmark-file-1>\n<DL><p>\n"
        b'<DT><A HREF="https://a.example/" TOREAD="1">Later</A>\n'
        b'<DT><A HREF="https://b.example/" TOREAD="0">Done</A>\n'
        b'<DT><A HREF="https://c.example/">Plain</A>\n</DL><p>\n'
    )
    marks = bookmarks(list(iter_bookmarks(io.BytesIO(data))))
    assert [b.read for b in marks] == [False, True, None]
