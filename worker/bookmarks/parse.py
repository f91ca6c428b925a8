"""Streaming parsers for bookmark exports: Netscape HTML, Pinboard JSON and CSV.

Every parser reads the file in blocks (``BLOCK_SIZE``) and yields one entry at a time, so a
100 MB export is parsed in bounded memory: no parser holds more than a block, one pending
element (capped by ``MAX_PENDING_CHARS``) and one bookmark's texts (capped by
``MAX_TEXT_CHARS``).

``iter_bookmarks`` yields a ``ParsedBookmark`` for each importable bookmark and a
``SkippedEntry`` for each one we do not import (a ``skip_reason`` key, or "malformed" for an
entry that could not be read). It raises only ``BookmarkFormatError``: when the format is not
one we take, or the file cannot be read at all. A truncated file yields everything before
the point of truncation.

Format notes:

* Netscape bookmark HTML (Chrome, Edge, Firefox, Safari, Pinboard and most services):
  ``<DT><H3>`` + ``<DL>`` are folders, ``<DT><A HREF ADD_DATE LAST_MODIFIED TAGS>`` are
  bookmarks, and a ``<DD>`` right after an ``<A>`` is its description. The DL/DT/DD/P tags
  are usually left unclosed; ``html.parser`` copes with that, with any letter case and with
  unquoted attributes. Folder names are kept as the browser wrote them ("Bookmarks bar",
  "Bookmarks Toolbar"); ``toolbar`` says whether the bookmark sits in the toolbar folder.
* Pinboard JSON (``/v1/posts/all?format=json`` or the settings backup): an array of objects
  ``{href, description (the title), extended, tags, time, toread, shared}``.
* CSV with a header naming a ``url``/``href``/``link`` column (hand-made exports, and any
  tool's CSV whose header we do not recognise).
* The exports of the read-it-later and bookmarking tools people leave (Pocket, Instapaper,
  Raindrop, Readwise Reader, Omnivore, wallabag, Linkwarden, Karakeep, OneTab) and plain lists
  of URLs: parsed in ``worker.bookmarks.formats``, detected here (``detect_format``).

Tags are split, stripped and deduplicated case-insensitively; the first spelling wins.
Dates become UTC-aware datetimes; epoch numbers may be seconds, milliseconds, microseconds
or nanoseconds (told apart by magnitude, since exporters disagree).
"""

from __future__ import annotations

import codecs
import csv
import html
import io
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from itertools import islice
from typing import BinaryIO, Final, Protocol, TextIO, TypeVar

from worker.bookmarks.canonical import skip_reason
from worker.bookmarks.markup import FastMarkupParser
from worker.errors import BookmarkFormatError, describe

__all__ = [
    "BLOCK_SIZE",
    "FORMATS",
    "FORMAT_LABELS",
    "Bookmarks",
    "Entry",
    "ParsedBookmark",
    "SkippedEntry",
    "detect_format",
    "iter_bookmarks",
]

# Every format we take, by the name ``--format`` and ``import_job.source_format`` use, with the
# words an error message uses for it.
FORMAT_LABELS: Final = {
    "netscape": "Netscape bookmark HTML (exported by Chrome, Edge, Firefox, Safari and most "
    "bookmark services)",
    "pinboard_json": "Pinboard JSON",
    "pocket_html": "Pocket HTML (ril_export.html)",
    "pocket_csv": "Pocket CSV",
    "instapaper_csv": "Instapaper CSV",
    "raindrop_csv": "Raindrop CSV",
    "readwise_csv": "Readwise Reader CSV",
    "omnivore_json": "Omnivore JSON (metadata_*.json from its export)",
    "wallabag_json": "wallabag JSON",
    "linkwarden_json": "Linkwarden JSON backup",
    "karakeep_json": "Karakeep JSON",
    "onetab": "OneTab text (url | title lines)",
    "url_list": "a plain list of URLs, one per line",
    "csv": "CSV with a url column",
}
FORMATS: Final = tuple(FORMAT_LABELS)
_FORMATS_WE_TAKE: Final = (
    "we take "
    + ", ".join(FORMAT_LABELS[f] for f in FORMATS[:-1])
    + f", or {FORMAT_LABELS[FORMATS[-1]]}"
)

BLOCK_SIZE: Final = 64 * 1024
HEAD_SIZE: Final = 4 * 1024  # where a META charset declaration must appear
# An unterminated tag or JSON element larger than this is dropped as malformed. Favicons
# (ICON="data:...") are the largest legitimate tags, a few KiB each.
MAX_PENDING_CHARS: Final = 2 * 1024 * 1024
MAX_TEXT_CHARS: Final = 64 * 1024  # longest title/description/folder name we keep
MAX_URL_IN_SKIP: Final = 2048  # a skipped data: URL may be megabytes; keep only its start
MAX_FOLDER_DEPTH: Final = 256
MAX_CSV_LINE_CHARS: Final = 1024 * 1024

# Errors that come from odd input and are reported per entry (or, when the file cannot be
# read at all, as a BookmarkFormatError). Anything else -- MemoryError, a task runner's
# time-limit exception -- propagates untouched.
_INPUT_ERRORS: Final = (
    ValueError,
    LookupError,
    TypeError,
    AttributeError,
    AssertionError,
    ArithmeticError,
    RecursionError,
    csv.Error,
    OSError,
)


@dataclass(frozen=True, slots=True)
class ParsedBookmark:
    """One importable bookmark as the export describes it (``url`` is not canonicalised)."""

    url: str
    title: str
    folder_path: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    description: str = ""
    added_at: datetime | None = None
    modified_at: datetime | None = None
    toolbar: bool = False
    note: str = ""  # what the user wrote about it, where the tool keeps that apart
    read: bool | None = None  # None: the export does not say
    archived: bool | None = None
    extra: dict[str, object] = field(default_factory=dict)
    # The parser has already asked ``skip_reason`` of this URL (the importer then does not ask
    # again: 4 % of a large import's parse). False is always safe.
    url_checked: bool = field(default=False, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class SkippedEntry:
    """An entry we do not import: ``reason`` is a ``skip_reason`` key or "malformed"."""

    reason: str
    url: str
    detail: str


Entry = ParsedBookmark | SkippedEntry


# --------------------------------------------------------------------------- detection


def detect_format(head: bytes) -> str:
    """Return the name (one of ``FORMATS``) of the format of an export, from its first bytes.

    The order: binary files are refused; JSON is told apart by its top-level keys or by the
    keys of the array's first object; HTML by the Netscape doctype, Pocket's signature, then
    any DL/DT list; a first line that is a URL makes a text list (OneTab when its lines hold
    " | "); a header line makes a CSV (the tools' own headers first, then any url column).
    Raises BookmarkFormatError with a message that lists the formats we take otherwise."""
    if not head.strip():
        raise BookmarkFormatError("the file is empty")
    encoding = _bom_encoding(head)
    if encoding is None:
        _reject_binary(head)
    text = head.decode(encoding or "utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    if not text:
        raise BookmarkFormatError("the file is empty")
    lowered = text.lower()
    if text.startswith("["):
        return _json_array_format(text)
    if text.startswith("{"):
        return _json_object_format(text, lowered)
    if "<!doctype netscape-bookmark-file" in lowered:
        return "netscape"
    has_list = re.search(r"<d[lt][\s>]", lowered) is not None
    # Pocket's ril_export.html: <h1>Unread</h1><ul><li><a href time_added tags>, no DL.
    if "<title>pocket export</title>" in lowered or ("time_added=" in lowered and not has_list):
        return "pocket_html"
    if has_list:
        return "netscape"
    if text.startswith("<"):
        raise BookmarkFormatError(
            f"this is HTML or XML but holds no bookmark list (no <DL>/<DT>); {_FORMATS_WE_TAKE}"
        )
    if (text_list := _text_list_format(text)) is not None:
        return text_list
    if _looks_like_csv_header(text):
        return _csv_format(text)
    raise BookmarkFormatError(f"this is not a bookmark export we recognise; {_FORMATS_WE_TAKE}")


# A JSON key: a quoted name followed by a colon, not inside an escaped string (wallabag's
# exported page HTML holds ``href=\"...\"``).
_JSON_KEY: Final = r'(?<!\\)"{}"\s*:'


def _has_key(text: str, *keys: str) -> bool:
    return all(re.search(_JSON_KEY.format(re.escape(key)), text) for key in keys)


def _json_array_format(text: str) -> str:
    """Pinboard, wallabag and Omnivore export arrays of objects; their keys tell them apart."""
    if re.match(r"\[\s*(\]|$)", text):
        return "pinboard_json"  # an empty array: nothing to import, whoever wrote it
    if _has_key(text, "href"):
        return "pinboard_json"
    if _has_key(text, "is_archived") or _has_key(text, "is_starred"):
        return "wallabag_json"
    if _has_key(text, "slug", "savedAt") or _has_key(text, "labels", "readingProgress"):
        return "omnivore_json"
    keys = sorted(set(re.findall(r'(?<!\\)"([^"\\]{1,40})"\s*:', text[:HEAD_SIZE])))[:12]
    found = f"objects with the keys {', '.join(keys)}" if keys else "no objects"
    raise BookmarkFormatError(
        f"this is a JSON array of {found}: not a bookmark export we recognise; {_FORMATS_WE_TAKE}"
    )


def _json_object_format(text: str, lowered: str) -> str:
    if re.search(_JSON_KEY.format("bookmarks") + r"\s*\[", text):
        return "karakeep_json"
    if re.search(_JSON_KEY.format("collections") + r"\s*\[", text):
        return "linkwarden_json"
    raise BookmarkFormatError(_json_object_message(lowered))


_URL_LINE: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://\S")
_TEXT_LIST_SAMPLE: Final = 20  # lines looked at to tell OneTab from a plain list


def _text_list_format(text: str) -> str | None:
    """The text list format ("onetab" or "url_list") when the first line that is neither
    blank nor a "#" comment is a URL, else None."""
    stripped = (line.strip() for line in text.splitlines()[:200])
    lines = [line for line in stripped if line and not line.startswith("#")]
    if not lines or not _URL_LINE.match(lines[0]):
        return None
    sample = lines[:_TEXT_LIST_SAMPLE]
    return "onetab" if any(" | " in line for line in sample) else "url_list"


# The columns each tool's CSV export has (lower case); a header holding all of them is that
# tool's. Checked in this order, so the most specific header wins.
_CSV_SIGNATURES: Final = (
    ("raindrop_csv", frozenset({"id", "title", "note", "excerpt", "url", "folder", "tags"})),
    ("readwise_csv", frozenset({"title", "url", "document tags", "saved date", "location"})),
    ("instapaper_csv", frozenset({"url", "title", "selection", "folder"})),
    ("pocket_csv", frozenset({"title", "url", "time_added", "status"})),
)


def _csv_format(text: str) -> str:
    first_line = text.split("\n", 1)[0]
    try:
        header = next(csv.reader([first_line], delimiter=_csv_delimiter(first_line)), [])
    except csv.Error:
        return "csv"
    columns = {cell.strip().strip("\ufeff").strip().lower() for cell in header}
    for fmt, signature in _CSV_SIGNATURES:
        if signature <= columns:
            return fmt
    return "csv"


_BOMS: Final = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)

_MAGIC: Final = (
    (b"SQLite format 3\x00", "a SQLite database (Firefox's places.sqlite?)"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"%PDF", "a PDF document"),
    (b"mozLz4", "a compressed Firefox backup (.jsonlz4)"),
)


def _bom_encoding(head: bytes) -> str | None:
    for bom, encoding in _BOMS:
        if head.startswith(bom):
            return encoding
    return None


def _reject_binary(head: bytes) -> None:
    """Binary files are refused up front, naming what they look like when we can tell."""
    for magic, what in _MAGIC:
        if head.startswith(magic):
            raise BookmarkFormatError(
                f"this is {what}, not a bookmark export; export your bookmarks to HTML "
                f"from the browser's bookmark manager ({_FORMATS_WE_TAKE})"
            )
    sample = head[:HEAD_SIZE]
    controls = sum(1 for byte in sample if byte < 32 and byte not in b"\t\n\r\f")
    if b"\x00" in sample or controls > len(sample) // 20:
        raise BookmarkFormatError(
            f"this looks like a binary file, not a bookmark export; {_FORMATS_WE_TAKE}"
        )


def _json_object_message(lowered: str) -> str:
    if '"roots"' in lowered and '"checksum"' in lowered:
        what = "Chrome's internal Bookmarks file"
    elif "root________" in lowered or '"guid"' in lowered:
        what = "a Firefox JSON backup"
    else:
        what = "a JSON object"
    return (
        f"this is {what}, not a bookmark export we recognise; export your bookmarks to HTML "
        f"from the browser's bookmark manager ({_FORMATS_WE_TAKE})"
    )


def _looks_like_csv_header(text: str) -> bool:
    first_line = text.split("\n", 1)[0].strip().lower()
    if not first_line:
        return False
    if any(sep in first_line for sep in ",;\t"):
        return True
    # A one-column CSV is only a list of URLs under a "url" header.
    return first_line.strip("\"' ") in _CSV_URL_COLUMNS


# --------------------------------------------------------------------------- entry point


class Bookmarks(Iterator[Entry]):
    """The entries of one export, read as they are iterated, and the format they are read as
    (detected, or the one the caller named)."""

    def __init__(self, fmt: str, entries: Iterator[Entry]) -> None:
        self.format = fmt
        self._entries = entries

    def __next__(self) -> Entry:
        return next(self._entries)


def iter_bookmarks(fp: BinaryIO, *, fmt: str | None = None, filename: str = "") -> Bookmarks:
    """Yield the entries of the export read from ``fp`` (a binary file), block by block.

    The format is detected from the first bytes unless ``fmt`` names one of ``FORMATS``.
    Detection happens now, so an unrecognised file fails at the call; parsing happens as
    the iterator is consumed. ``filename`` only makes error messages name the file."""
    label = f"{filename}: " if filename else ""
    try:
        head = _read_head(fp)
    except (OSError, ValueError) as exc:  # an I/O error, or a file already closed
        raise BookmarkFormatError(f"{label}the file cannot be read: {exc}") from exc
    try:
        if not head.strip():
            raise BookmarkFormatError("the file is empty")
        fmt = fmt or detect_format(head)
        if fmt not in FORMATS:
            raise BookmarkFormatError(
                f"unknown bookmark format {fmt!r} (the names are {', '.join(FORMATS)}); "
                f"{_FORMATS_WE_TAKE}"
            )
    except BookmarkFormatError as exc:
        raise BookmarkFormatError(f"{label}{exc}") from exc
    text = _open_text(head, fp, _choose_encoding(head, fmt))
    return Bookmarks(fmt, _guarded(_parser_for(fmt)(text), label))


def _parser_for(fmt: str) -> Callable[[TextIO], Iterator[Entry]]:
    own: dict[str, Callable[[TextIO], Iterator[Entry]]] = {
        "netscape": _iter_netscape,
        "pinboard_json": _iter_pinboard,
        "csv": _iter_csv,
    }
    if fmt in own:
        return own[fmt]
    # Imported here: the tools' parsers build on this module's helpers.
    from worker.bookmarks.formats import PARSERS

    return PARSERS[fmt]


def _guarded(entries: Iterator[Entry], label: str) -> Iterator[Entry]:
    """Turn an input error that escaped the per-entry handling into BookmarkFormatError,
    keeping everything yielded before it."""
    try:
        yield from entries
    except BookmarkFormatError as exc:
        raise BookmarkFormatError(f"{label}{exc}") from exc
    except _INPUT_ERRORS as exc:
        raise BookmarkFormatError(
            f"{label}the export stopped being readable: {describe(exc)}"
        ) from exc


def _read_head(fp: BinaryIO) -> bytes:
    # read() on a pipe or socket may return short; detection wants a full block when there is one.
    parts: list[bytes] = []
    size = 0
    while size < BLOCK_SIZE:
        block = fp.read(BLOCK_SIZE - size)
        if not block:
            break
        parts.append(block)
        size += len(block)
    return b"".join(parts)


class _ChainedReader(io.RawIOBase):
    """The already-read head followed by the rest of ``fp``, as one raw stream.

    Closing it does not close ``fp``: the caller owns that."""

    def __init__(self, head: bytes, fp: BinaryIO) -> None:
        super().__init__()
        self._head = memoryview(head)
        self._fp = fp

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self._head:
            count = min(len(buffer), len(self._head))
            buffer[:count] = self._head[:count]
            self._head = self._head[count:]
            return count
        data = self._fp.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _open_text(head: bytes, fp: BinaryIO, encoding: tuple[str, str]) -> TextIO:
    name, errors = encoding
    raw = io.BufferedReader(_ChainedReader(head, fp), buffer_size=BLOCK_SIZE)
    # newline="" keeps line ends as they are: the csv module needs that, HTML/JSON don't care.
    return io.TextIOWrapper(raw, encoding=name, errors=errors, newline="")


# --------------------------------------------------------------------------- charsets

_CP1252_FALLBACK: Final = "bookmarks-cp1252-fallback"
_META_CHARSET: Final = re.compile(rb"<meta[^>]*charset\s*=\s*[\"']?\s*([A-Za-z0-9_.:\-]+)", re.I)
# Labels that the HTML standard decodes as windows-1252 (a superset of them).
_CP1252_LABELS: Final = frozenset({"cp1252", "ascii", "iso8859-1"})


def _cp1252_fallback(exc: UnicodeError) -> tuple[str, int]:
    """Decode bytes that are not UTF-8 as windows-1252 instead of dropping them: exports
    that mix encodings are usually UTF-8 with a few cp1252 titles pasted in."""
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    bad = exc.object[exc.start : exc.end]
    # cp1252 leaves five bytes undefined; HTML maps them to the same code points (latin-1).
    return "".join(_cp1252_char(byte) for byte in bad), exc.end


def _cp1252_char(byte: int) -> str:
    try:
        return bytes([byte]).decode("cp1252")
    except UnicodeDecodeError:
        return chr(byte)


codecs.register_error(_CP1252_FALLBACK, _cp1252_fallback)


def _choose_encoding(head: bytes, fmt: str) -> tuple[str, str]:
    """(codec, error handler) for the file: BOM, then a META declaration (HTML only), then
    UTF-8 if the head decodes as UTF-8, else windows-1252."""
    bom = _bom_encoding(head)
    if bom is not None:
        return (bom, _CP1252_FALLBACK if bom == "utf-8-sig" else "replace")
    if fmt in ("netscape", "pocket_html"):
        declared = _declared_charset(head[:HEAD_SIZE])
        if declared is not None:
            return (declared, _CP1252_FALLBACK if declared == "utf-8" else "replace")
    if _is_utf8_prefix(head):
        return ("utf-8", _CP1252_FALLBACK)
    return ("cp1252", _CP1252_FALLBACK)


def _declared_charset(head: bytes) -> str | None:
    match = _META_CHARSET.search(head)
    if match is None:
        return None
    label = match.group(1).decode("ascii")
    try:
        name = codecs.lookup(label).name
        # The declaration was read as ASCII, so only an ASCII-compatible text codec can be
        # right (this also refuses "base64", "utf-16" and other non-text or wide codecs).
        ascii_compatible = b"<a href>".decode(name) == "<a href>"
    except (LookupError, ValueError):
        return None  # an unknown label: fall back to sniffing
    if not ascii_compatible:
        return None
    if name in _CP1252_LABELS:
        return "cp1252"
    return name


def _is_utf8_prefix(head: bytes) -> bool:
    # The head may end in the middle of a character, hence the incremental decoder.
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return True


# --------------------------------------------------------------------------- shared helpers


def _parse_epoch(value: str | None) -> datetime | None:
    """Epoch seconds, or milliseconds/microseconds/nanoseconds told apart by magnitude:
    seconds stay below 1e11 until the year 5138, and likewise for each smaller unit."""
    if value is None:
        return None
    text = value.strip()
    try:
        # Integers are converted exactly: a float loses microseconds at this magnitude.
        number: int | float = int(text) if text.isdigit() else float(text)
    except ValueError:
        return None
    if not number > 0:  # zero, negative or NaN: no date
        return None
    for limit, per_second in ((10**11, 1), (10**14, 10**3), (10**17, 10**6), (10**20, 10**9)):
        if number < limit:
            return _from_epoch_micros(number * 10**6 // per_second)
    return None


def _from_epoch_micros(micros: int | float) -> datetime | None:
    try:
        return _EPOCH + timedelta(microseconds=micros)
    except (OverflowError, ValueError):
        return None


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def _parse_iso(value: str | None) -> datetime | None:
    if not value or not value.strip():
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)  # exports without an offset are UTC in practice
    return parsed.astimezone(UTC)


def _parse_date(value: str | None) -> datetime | None:
    """Epoch number (any unit) or ISO 8601."""
    if value is None:
        return None
    return _parse_epoch(value) or _parse_iso(value)


def _split_tags(raw: str | None, separators: str = ",") -> tuple[str, ...]:
    """Split on the first of ``separators`` present (whitespace when ``separators`` is
    empty or none is present), strip, and dedupe case-insensitively keeping first spelling."""
    if not raw:
        return ()
    sep = next((s for s in separators if s in raw), None)
    parts = raw.split(sep) if sep else raw.split()
    return _dedupe_tags(parts)


def _dedupe_tags(parts: Iterable[str]) -> tuple[str, ...]:
    seen: set[str] = set()
    tags: list[str] = []
    for part in parts:
        tag = part.strip()
        key = tag.casefold()
        if tag and key not in seen:
            seen.add(key)
            tags.append(tag)
    return tuple(tags)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _skipped(reason: str, url: str, detail: str) -> SkippedEntry:
    return SkippedEntry(reason=reason, url=url[:MAX_URL_IN_SKIP], detail=detail)


def _skip_for(url: str) -> SkippedEntry | None:
    """The SkippedEntry saying why ``url`` is not imported, or None to import it."""
    reason = skip_reason(url)
    if reason is None:
        return None
    return _skipped(reason, url.strip(), f"{reason} URL not imported")


def _malformed(url: str, exc: BaseException) -> SkippedEntry:
    return _skipped("malformed", url, describe(exc))


def _bool_flag(value: object) -> bool | None:
    if isinstance(value, bool):
        return value
    if value is None:
        return None
    text = str(value).strip().lower()
    if text in {"1", "yes", "true", "y", "on"}:
        return True
    if text in {"0", "no", "false", "n", "off", ""}:
        return False
    return None


# --------------------------------------------------------------------------- Netscape HTML

_TOOLBAR_NAMES: Final = frozenset(
    {
        "bookmarks bar",
        "bookmarks toolbar",
        "favorites bar",
        "favourites bar",
        "favorites",  # Safari's Favorites bar
        "favourites",
    }
)
_A_ATTRS: Final = frozenset(
    {"href", "add_date", "last_modified", "tags", "toread", "private", "shortcuturl"}
)
_SAFARI_READING_LIST: Final = "com.apple.readinglist"
MAX_TAG_TOKENS: Final = 2000
_LONG_TAG_CHARS: Final = 4096
_TAG_TOKEN: Final = re.compile(r"[\s/]+")
_UNTERMINATED_A: Final = re.compile(r"<a\s", re.I)
_HREF_IN_TAG: Final = re.compile(r"""\shref\s*=\s*["']?([^"'\s>]*)""", re.I)


@dataclass(slots=True)
class _Folder:
    """An H3 seen and waiting for its DL."""

    name: list[str]  # text parts, joined when the folder's DL opens
    toolbar: bool
    reading_list: bool


@dataclass(frozen=True, slots=True)
class _Context:
    """What a bookmark inherits from the folders around it."""

    path: tuple[str, ...] = ()
    toolbar: bool = False
    reading_list: bool = False


_ROOT: Final = _Context()


@dataclass(slots=True)
class _PendingAnchor:
    attrs: dict[str, str]
    title: list[str] = field(default_factory=list)
    description: list[str] = field(default_factory=list)


class _NetscapeParser(FastMarkupParser):
    """Builds entries from the tag stream into ``out``; the caller drains it after every
    ``feed`` so that memory stays bounded.

    A bookmark is emitted when the next structural tag (A, DT, H3, DL, </DL>, H1, HR) or
    the end of input shows that its description, if any, is complete."""

    def __init__(self) -> None:
        self.out: list[Entry] = []
        self._stack: list[_Context] = []  # one per open DL, the context inside it
        self._overflow = 0  # DLs deeper than MAX_FOLDER_DEPTH, counted so pops still match
        self._folder: _Folder | None = None
        self._anchor: _PendingAnchor | None = None  # an A waiting for its DD or the next entry
        self._sink: list[str] | None = None  # where text goes now
        self._sink_size = 0
        super().__init__(convert_charrefs=True)

    # html.parser hooks ------------------------------------------------------------------

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._flush_anchor()
            self._folder = None
            kept = {k: v for k, v in attrs if k in _A_ATTRS and v is not None}
            self._anchor = _PendingAnchor(kept)  # ICON data is dropped here, never stored
            self._route(self._anchor.title)
        elif tag == "dd":
            self._start_description()
        elif tag == "h3":
            self._flush_anchor()
            self._folder = _new_folder(attrs)
            self._route(self._folder.name)
        elif tag == "dl":
            self._flush_anchor()
            self._push_folder()
        elif tag in {"dt", "h1", "hr"}:
            # An H3 followed by DT instead of DL is an empty folder: nothing to push.
            self._flush_anchor()
            self._folder = None

    def handle_endtag(self, tag: str) -> None:
        if tag in {"a", "h3", "h1", "dd"}:
            self._route(None)
        elif tag == "dl":
            self._flush_anchor()
            self._folder = None
            self._pop_folder()

    def handle_data(self, data: str) -> None:
        if self._sink is not None and self._sink_size < MAX_TEXT_CHARS:
            self._sink.append(data)
            self._sink_size += len(data)

    def set_cdata_mode(self, elem: str, **kwargs: object) -> None:
        # Bookmark files have no scripts; treating <script>/<style> as ordinary tags stops a
        # stray one from making HTMLParser buffer the rest of the file looking for its end.
        return

    def parse_starttag_guard(self, i: int, close: int) -> int | None:
        # A tag with absurdly many attribute-like tokens ("<a x=1 x=1 ..." for 2 MB) is
        # dropped unparsed; real bookmark tags have a dozen attributes.
        return close + 1 if _too_many_tokens(self.rawdata, i, close) else None

    # called by _iter_netscape -------------------------------------------------------------

    def finish(self) -> None:
        """End of input: keep trailing text, drop an unterminated tag, flush the last bookmark.

        ``HTMLParser.close()`` is not used: on an unterminated tag it rescans the rest of the
        buffer once per "<" in it, which is quadratic on garbage. What a complete file leaves
        pending is at most text held back for a possible character reference."""
        pending = self.rawdata
        HTMLParser.reset(self)
        text = pending.split("<", 1)[0]
        if text:
            self.handle_data(html.unescape(text))
        self._flush_anchor()
        if _UNTERMINATED_A.match(pending, len(text)):
            # A truncated file that ends inside a bookmark's tag: say so, with its URL.
            href = _HREF_IN_TAG.search(pending, len(text), len(text) + MAX_URL_IN_SKIP)
            url = html.unescape(href.group(1)) if href else ""
            self.out.append(_skipped("malformed", url, "the file ends inside this <A> tag"))

    def drop_buffer(self) -> int:
        """Forget unparsed input (an unterminated tag, or markup HTMLParser chokes on),
        keeping the folder state; returns how many characters were dropped."""
        dropped = len(self.rawdata)
        HTMLParser.reset(self)
        return dropped

    # state --------------------------------------------------------------------------------

    @property
    def _context(self) -> _Context:
        return self._stack[-1] if self._stack else _ROOT

    def _route(self, sink: list[str] | None) -> None:
        self._sink = sink
        self._sink_size = 0

    def _push_folder(self) -> None:
        folder, self._folder = self._folder, None
        self._route(None)
        if len(self._stack) >= MAX_FOLDER_DEPTH:
            self._overflow += 1
            return
        context = self._context
        if folder is not None:  # else an anonymous DL (the root list) adds no folder
            name = _one_line("".join(folder.name)[:MAX_TEXT_CHARS])
            # Safari marks no folder as the toolbar; its top-level name gives it away.
            named_bar = not context.path and name.lower() in _TOOLBAR_NAMES
            context = _Context(
                (*context.path, name),
                context.toolbar or folder.toolbar or named_bar,
                context.reading_list or folder.reading_list,
            )
        self._stack.append(context)

    def _pop_folder(self) -> None:
        # A missing </DL> leaves later folders nested one level too deep; an extra one is
        # ignored. Neither loses bookmarks.
        if self._overflow:
            self._overflow -= 1
        elif self._stack:
            self._stack.pop()

    def _start_description(self) -> None:
        # Only a DD that follows a bookmark describes it; a DD after an H3 describes the
        # folder (Firefox writes one for the toolbar) and is ignored.
        if self._anchor is not None and not self._anchor.description:
            self._route(self._anchor.description)
        else:
            self._route(None)

    def _flush_anchor(self) -> None:
        anchor, self._anchor = self._anchor, None
        self._route(None)
        if anchor is None:
            return
        try:
            self.out.append(self._entry(anchor))
        except _INPUT_ERRORS as exc:
            self.out.append(_malformed(anchor.attrs.get("href", ""), exc))

    def _entry(self, anchor: _PendingAnchor) -> Entry:
        attrs = anchor.attrs
        href = attrs.get("href")
        if href is None:
            return _skipped("empty", "", "<A> without HREF")
        if (skipped := _skip_for(href)) is not None:
            return skipped
        context = self._context
        toread = _bool_flag(attrs.get("toread"))
        return ParsedBookmark(
            url_checked=True,
            url=href.strip(),
            title=_one_line("".join(anchor.title)[:MAX_TEXT_CHARS]),
            folder_path=context.path,
            tags=_split_tags(attrs.get("tags"), ","),
            description="".join(anchor.description)[:MAX_TEXT_CHARS].strip(),
            added_at=_parse_epoch(attrs.get("add_date")),
            modified_at=_parse_epoch(attrs.get("last_modified")),
            toolbar=context.toolbar,
            # Pinboard/Delicious TOREAD=1 means unread; a Safari Reading List entry too.
            read=False if toread or context.reading_list else (None if toread is None else True),
            extra=_netscape_extra(attrs, context),
        )


def _too_many_tokens(text: str, start: int, end: int) -> bool:
    if end - start < _LONG_TAG_CHARS:
        return False  # the common case, decided without scanning
    tokens = _TAG_TOKEN.finditer(text, start, end)
    return next(islice(tokens, MAX_TAG_TOKENS, None), None) is not None


def _new_folder(attrs: list[tuple[str, str | None]]) -> _Folder:
    values = {k: (v or "") for k, v in attrs}
    toolbar = values.get("personal_toolbar_folder", "").lower() == "true"
    reading_list = values.get("id", "").lower() == _SAFARI_READING_LIST
    return _Folder([], toolbar, reading_list)


def _netscape_extra(attrs: dict[str, str], context: _Context) -> dict[str, object]:
    """Flags some exporters add: Safari's Reading List, Pinboard/Delicious TOREAD and
    PRIVATE, Firefox keywords."""
    extra: dict[str, object] = {}
    if context.reading_list:
        extra["reading_list"] = True
    if (toread := _bool_flag(attrs.get("toread"))) is not None:
        extra["toread"] = toread
    if (private := _bool_flag(attrs.get("private"))) is not None:
        extra["shared"] = not private
    if attrs.get("shortcuturl"):
        extra["keyword"] = attrs["shortcuturl"]
    return extra


def _iter_netscape(text: TextIO) -> Iterator[Entry]:
    parser = _NetscapeParser()
    carry = ""
    # An unterminated construct is rescanned on every feed, but only with str.find (see
    # parse_starttag), and MAX_PENDING_CHARS bounds how often.
    while chunk := text.read(BLOCK_SIZE):
        chunk, carry = _escape_stray_lt(carry + chunk)
        _feed(parser, chunk)
        yield from _drain(parser)
    parser.finish()
    yield from _drain(parser)


_STRAY_LT: Final = re.compile(r"<(?![A-Za-z!/?])")


def _escape_stray_lt(chunk: str) -> tuple[str, str]:
    """Escape each "<" that cannot start markup, returning (text, carry-over).

    HTMLParser handles such a "<" one character per loop turn (~10 µs each), so a file of
    them would take minutes; as "&lt;" it is ordinary text and decodes back to "<". A "<"
    at the end of the chunk waits for the next chunk to show what follows it."""
    carry = ""
    if chunk.endswith("<"):
        chunk, carry = chunk[:-1], "<"
    return _STRAY_LT.sub("&lt;", chunk), carry


def _feed(parser: _NetscapeParser, chunk: str) -> None:
    try:
        parser.feed(chunk)
    except _INPUT_ERRORS as exc:
        dropped = parser.drop_buffer()
        parser.out.append(
            _skipped("malformed", "", f"dropped {dropped} characters of markup: {exc}")
        )
        return
    if len(parser.rawdata) > MAX_PENDING_CHARS:
        dropped = parser.drop_buffer()
        parser.out.append(
            _skipped("malformed", "", f"dropped {dropped} characters of unterminated markup")
        )


def _drain(parser: _NetscapeParser) -> list[Entry]:
    entries, parser.out = parser.out, []
    return entries


# --------------------------------------------------------------------------- Pinboard JSON

_RESYNC: Final = re.compile(r"\}\s*,\s*(?=\{)")
# The closing quote is optional: in a truncated file the href may be cut short.
_HREF_IN_TEXT: Final = re.compile(r'"href"\s*:\s*"((?:[^"\\]|\\.)*)"?')
_NEAR_END: Final = 16  # a decode error this close to the buffer's end may just need more text


class _JsonArrayReader:
    """Pulls the elements of a top-level JSON array one at a time from a text stream.

    ``json.JSONDecoder.raw_decode`` decodes one element from a buffer that holds at most a
    few blocks plus the element; a bad element is skipped by resynchronising on the next
    ``},{`` (Pinboard's objects are flat, so that separator only appears between them; in the
    nested exports read by ``worker.bookmarks.formats.jsondoc`` it may land inside an element,
    whose pieces are then reported as malformed too)."""

    def __init__(self, text: TextIO, *, what: str = "a Pinboard JSON export") -> None:
        self._text = text
        self._what = what  # for the error when the file is not an array
        self._buf = ""
        self._pos = 0
        self._consumed = 0  # characters dropped from the buffer, for error positions
        self._eof = False
        self._decoder = json.JSONDecoder()

    def elements(self) -> Iterator[object | SkippedEntry]:
        self._skip(" \t\r\n\ufeff")
        if self._at_end() or self._buf[self._pos] != "[":
            raise BookmarkFormatError(f"{self._what} must be a JSON array")
        self._pos += 1
        yield from self.items()

    def items(self) -> Iterator[object | SkippedEntry]:
        """The elements of an array whose "[" has been read, up to and including its "]"."""
        while True:
            self._skip(" \t\r\n,")
            if self._at_end():
                return
            if self._buf[self._pos] == "]":
                self._pos += 1
                return
            yield self._next_element()

    def _next_element(self) -> object | SkippedEntry:
        while True:
            try:
                value: object
                value, end = self._decoder.raw_decode(self._buf, self._pos)
            except json.JSONDecodeError as exc:
                if self._may_be_incomplete(exc) and self._fill():
                    continue  # the element runs past the buffer: read on and retry
                return self._resync(f"{exc.msg} at character {self._consumed + exc.pos}")
            except (RecursionError, ValueError) as exc:  # absurdly deep nesting
                return self._resync(describe(exc))
            self._pos = end
            return value

    def _may_be_incomplete(self, exc: json.JSONDecodeError) -> bool:
        if self._eof or len(self._buf) - self._pos > MAX_PENDING_CHARS:
            return False
        return exc.pos >= len(self._buf) - _NEAR_END or exc.msg.startswith("Unterminated")

    def _resync(self, detail: str) -> SkippedEntry:
        """Skip to the start of the next object, reporting the skipped one as malformed."""
        start = self._pos
        url: str | None = None  # read from the bad element before its start is discarded
        search_from = start + 1
        while (match := _RESYNC.search(self._buf, search_from)) is None:
            if url is None:
                url = _href_in(self._buf, start, len(self._buf))
            # Keep a short tail: the separator may straddle two blocks.
            self._pos = max(self._pos, len(self._buf) - _NEAR_END)
            if not self._fill():
                self._pos = len(self._buf)
                return _skipped("malformed", url, detail)
            search_from = self._pos
        if url is None:
            url = _href_in(self._buf, start, match.start())
        self._pos = match.end()
        return _skipped("malformed", url, detail)

    def _skip(self, chars: str) -> None:
        while True:
            while self._pos < len(self._buf) and self._buf[self._pos] in chars:
                self._pos += 1
            if self._pos < len(self._buf) or not self._fill():
                return

    def _at_end(self) -> bool:
        return self._pos >= len(self._buf) and not self._fill()

    def _fill(self) -> bool:
        """Append a block to the buffer, dropping what has been consumed; False at EOF."""
        if self._eof:
            return False
        # Read at least as much as is pending, so retries on a large element cost O(n).
        block = self._text.read(max(BLOCK_SIZE, len(self._buf) - self._pos))
        if not block:
            self._eof = True
            return False
        self._consumed += self._pos
        self._buf = self._buf[self._pos :] + block
        self._pos = 0
        return True


def _href_in(buf: str, start: int, end: int) -> str:
    """The href of a malformed object, when it can still be read, for the skip report."""
    match = _HREF_IN_TEXT.search(buf, start, min(end, start + MAX_TEXT_CHARS))
    if match is None:
        return ""
    try:
        href = json.loads(f'"{match.group(1)}"')
    except ValueError:
        return match.group(1)
    return href if isinstance(href, str) else ""


def _iter_pinboard(text: TextIO) -> Iterator[Entry]:
    yield from _json_entries(_JsonArrayReader(text).elements(), _pinboard_entry, "href")


def _json_entries(
    elements: Iterable[object | SkippedEntry],
    make_entry: Callable[[object], Entry],
    url_key: str,
) -> Iterator[Entry]:
    """``make_entry`` for each decoded element; one that fails is reported as malformed, with
    its ``url_key`` value when it has one."""
    for element in elements:
        if isinstance(element, SkippedEntry):
            yield element
        else:
            yield _json_entry(element, make_entry, url_key)


def _json_entry(element: object, make_entry: Callable[[object], Entry], url_key: str) -> Entry:
    try:
        return make_entry(element)
    except _INPUT_ERRORS as exc:
        url = element.get(url_key) if isinstance(element, dict) else None
        return _malformed(url if isinstance(url, str) else "", exc)


def _pinboard_entry(element: object) -> Entry:
    if not isinstance(element, dict):
        return _skipped("malformed", "", f"expected an object, found {type(element).__name__}")
    href = element.get("href", "")
    if not isinstance(href, str):
        return _skipped("malformed", "", f"href is a {type(href).__name__}, not a string")
    if (skipped := _skip_for(href)) is not None:
        return skipped
    extra: dict[str, object] = {}
    if (shared := _bool_flag(element.get("shared"))) is not None:
        extra["shared"] = shared
    toread = _bool_flag(element.get("toread"))
    return ParsedBookmark(
        url_checked=True,
        url=href.strip(),
        title=_one_line(_text(element.get("description"))),
        tags=_pinboard_tags(element.get("tags")),
        description=_text(element.get("extended")).strip(),
        added_at=_parse_date(_text(element.get("time"))),
        read=None if toread is None else not toread,
        extra=extra,
    )


def _pinboard_tags(tags: object) -> tuple[str, ...]:
    # Pinboard writes a space-separated string; some converters write a list.
    if isinstance(tags, list):
        return _dedupe_tags(_text(tag) for tag in tags)
    return _split_tags(_text(tags), "")


def _text(value: object) -> str:
    """A JSON field as text, capped: null is empty, numbers are written out."""
    if value is None or isinstance(value, dict | list):
        return ""
    return str(value)[:MAX_TEXT_CHARS]


# --------------------------------------------------------------------------- CSV

_CSV_URL_COLUMNS: Final = ("url", "href", "link")
_CSV_COLUMNS: Final = {
    "title": ("title", "name"),
    "tags": ("tags", "tag"),
    "folder": ("folder", "folder_path"),
    "description": ("description", "note", "excerpt"),
    "added": ("created", "added", "time_added", "date", "created_at"),
    "status": ("status",),
    "favorite": ("favorite", "favourite", "starred"),
}
_ARCHIVED_STATUSES: Final = frozenset({"archive", "archived", "read"})


@dataclass(frozen=True, slots=True)
class _CsvColumns:
    url: int
    others: dict[str, tuple[int, ...]]  # field → column indexes, in preference order

    @classmethod
    def from_header(cls, header: Sequence[str]) -> _CsvColumns:
        names = [h.strip().strip("\ufeff").strip().lower() for h in header]
        url = next((names.index(n) for n in _CSV_URL_COLUMNS if n in names), None)
        if url is None:
            found = ", ".join(repr(h.strip()) for h in header[:20]) or "none"
            raise BookmarkFormatError(
                f"the CSV header has no url column (looked for url, href or link; found {found})"
            )
        others = {
            key: tuple(names.index(n) for n in candidates if n in names)
            for key, candidates in _CSV_COLUMNS.items()
        }
        return cls(url, others)

    def get(self, row: Sequence[str], key: str) -> str:
        """The first non-empty value among the columns for ``key``."""
        for index in self.others[key]:
            if index < len(row) and row[index].strip():
                return row[index].strip()
        return ""


def _iter_csv(text: TextIO) -> Iterator[Entry]:
    yield from _csv_entries(text, _CsvColumns.from_header, _csv_entry)


class _UrlColumn(Protocol):
    @property
    def url(self) -> int:
        """The index of the URL column, for reporting a row that cannot be read."""
        ...


_Header = TypeVar("_Header", bound=_UrlColumn)


def _csv_entries(
    text: TextIO,
    read_header: Callable[[Sequence[str]], _Header],
    make_entry: Callable[[Sequence[str], _Header], Entry],
) -> Iterator[Entry]:
    """The rows of a CSV export after its header, each made an entry by ``make_entry``; a
    row that cannot be read is reported as malformed and the next one is read."""
    # readline(limit) keeps one unterminated line from being read whole into memory.
    lines = iter(lambda: text.readline(MAX_CSV_LINE_CHARS), "")
    first = next(lines, "")
    reader = csv.reader(_chain([first], lines), delimiter=_csv_delimiter(first))
    columns = _csv_header(reader, read_header)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield _skipped("malformed", "", f"CSV line {reader.line_num}: {exc}")
            continue
        if not any(cell.strip() for cell in row):
            continue  # blank lines are not entries
        try:
            yield make_entry(row, columns)
        except _INPUT_ERRORS as exc:
            url = row[columns.url] if 0 <= columns.url < len(row) else ""
            yield _malformed(url, exc)


def _chain(first: list[str], rest: Iterator[str]) -> Iterator[str]:
    yield from first
    yield from rest


def _csv_delimiter(first_line: str) -> str:
    counts = {sep: first_line.count(sep) for sep in ",;\t"}
    best = max(counts, key=lambda sep: counts[sep])
    return best if counts[best] else ","


def _csv_header(
    reader: Iterator[list[str]], read_header: Callable[[Sequence[str]], _Header]
) -> _Header:
    try:
        for header in reader:
            if any(cell.strip() for cell in header):
                return read_header(header)
    except csv.Error as exc:
        raise BookmarkFormatError(f"the CSV header cannot be read: {exc}") from exc
    raise BookmarkFormatError("the CSV file has no header row")


def _csv_entry(row: Sequence[str], columns: _CsvColumns) -> Entry:
    url = row[columns.url].strip() if columns.url < len(row) else ""
    if (skipped := _skip_for(url)) is not None:
        return skipped
    extra: dict[str, object] = {}
    status = columns.get(row, "status").lower()  # Pocket: "unread" / "archive"
    if (favorite := _bool_flag(columns.get(row, "favorite") or None)) is not None:
        extra["favorite"] = favorite
    folder = columns.get(row, "folder")
    return ParsedBookmark(
        url_checked=True,
        url=url,
        title=_one_line(columns.get(row, "title")[:MAX_TEXT_CHARS]),
        folder_path=tuple(part.strip() for part in folder.split("/") if part.strip()),
        tags=_split_tags(columns.get(row, "tags"), "|,"),
        description=columns.get(row, "description")[:MAX_TEXT_CHARS],
        added_at=_parse_date(columns.get(row, "added") or None),
        archived=(status in _ARCHIVED_STATUSES) if status else None,
        extra=extra,
    )
