"""The CSV exports of Pocket, Instapaper, Raindrop and Readwise Reader.

Each is read by header name, not position (the tools have added columns over the years), with
parse.py's CSV row loop: a row that cannot be read is reported and the next one is read.

* Pocket (``part_000000.csv``, 2024 on): ``title,url,time_added,tags,status``; epoch seconds,
  tags joined by ``|``, status ``unread`` or ``archive``.
* Instapaper: ``URL,Title,Selection,Folder`` and, since late 2025, ``Timestamp`` (epoch
  seconds) and ``Tags`` (a JSON array). Folder is ``Unread``, ``Archive``, ``Starred`` or the
  name of one of the user's folders.
* Raindrop: ``id,title,note,excerpt,url,folder,tags,created,cover,highlights,favorite``;
  nested collections written ``Parent / Child`` (``/`` alone in older files), tags joined by
  commas, ISO 8601 dates; ``Unsorted`` is Raindrop's inbox, not a folder.
* Readwise Reader: ``Title,URL,ID,Document tags,Saved date,Reading progress,Location,Seen``;
  tags written as a Python list (``['a', 'b']``), dates ``2022-12-20 19:47:00.442000+00:00``,
  progress a fraction, Location ``new``/``later``/``shortlist``/``archive``/``feed``. Feed
  items came from subscriptions, not from the user saving them, and are skipped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final, TextIO

from worker.bookmarks.parse import (
    MAX_TEXT_CHARS,
    Entry,
    ParsedBookmark,
    _bool_flag,
    _csv_entries,
    _dedupe_tags,
    _one_line,
    _parse_date,
    _parse_epoch,
    _skip_for,
    _skipped,
)
from worker.errors import BookmarkFormatError


@dataclass(frozen=True, slots=True)
class ToolColumns:
    """A tool's CSV header: column name (lower case) -> index."""

    url: int
    index: dict[str, int]

    @classmethod
    def reader(cls, tool: str, url_column: str) -> Callable[[Sequence[str]], ToolColumns]:
        def read(header: Sequence[str]) -> ToolColumns:
            names = [cell.strip().strip("\ufeff").strip().lower() for cell in header]
            index = {name: i for i, name in reversed(list(enumerate(names)))}
            if url_column not in index:
                found = ", ".join(repr(cell.strip()) for cell in header[:20])
                raise BookmarkFormatError(
                    f"this is not a {tool} CSV export: its header has no {url_column!r} "
                    f"column (found {found})"
                )
            return cls(index[url_column], index)

        return read

    def get(self, row: Sequence[str], name: str) -> str:
        i = self.index.get(name)
        return row[i].strip() if i is not None and i < len(row) else ""

    def text(self, row: Sequence[str], name: str) -> str:
        return self.get(row, name)[:MAX_TEXT_CHARS]


def _entries(
    text: TextIO, tool: str, url_column: str, make: Callable[[Sequence[str], ToolColumns], Entry]
) -> Iterator[Entry]:
    return _csv_entries(text, ToolColumns.reader(tool, url_column), make)


# --------------------------------------------------------------------------- Pocket


def iter_pocket_csv(text: TextIO) -> Iterator[Entry]:
    return _entries(text, "Pocket", "url", _pocket_row)


def _pocket_row(row: Sequence[str], c: ToolColumns) -> Entry:
    url = c.get(row, "url")
    if (skipped := _skip_for(url)) is not None:
        return skipped
    status = c.get(row, "status").lower()
    return ParsedBookmark(
        url=url,
        title=_one_line(c.text(row, "title")),
        tags=_dedupe_tags(c.text(row, "tags").split("|")),
        added_at=_parse_epoch(c.get(row, "time_added") or None),
        read=False if status == "unread" else None,
        archived=(status == "archive") if status else None,
    )


# --------------------------------------------------------------------------- Instapaper

# Instapaper's own folders; any other name is a folder the user made.
_INSTAPAPER_UNREAD: Final = "unread"
_INSTAPAPER_ARCHIVE: Final = "archive"
_INSTAPAPER_STARRED: Final = "starred"


def iter_instapaper_csv(text: TextIO) -> Iterator[Entry]:
    return _entries(text, "Instapaper", "url", _instapaper_row)


def _instapaper_row(row: Sequence[str], c: ToolColumns) -> Entry:
    url = c.get(row, "url")
    if (skipped := _skip_for(url)) is not None:
        return skipped
    folder = _one_line(c.text(row, "folder"))
    kind = folder.lower()
    extra: dict[str, object] = {"favorite": True} if kind == _INSTAPAPER_STARRED else {}
    own_folder = kind not in (_INSTAPAPER_UNREAD, _INSTAPAPER_ARCHIVE, _INSTAPAPER_STARRED)
    return ParsedBookmark(
        url=url,
        title=_one_line(c.text(row, "title")),
        folder_path=(folder,) if folder and own_folder else (),
        tags=_json_list_tags(c.text(row, "tags")),
        description=c.text(row, "selection"),  # the text selected on the page when saving
        added_at=_parse_epoch(c.get(row, "timestamp") or None),
        read=False if kind == _INSTAPAPER_UNREAD else None,
        archived={_INSTAPAPER_UNREAD: False, _INSTAPAPER_ARCHIVE: True}.get(kind),
        extra=extra,
    )


def _json_list_tags(raw: str) -> tuple[str, ...]:
    """Instapaper writes tags as a JSON array; a cell that is not one is split on commas."""
    if not raw:
        return ()
    try:
        value = json.loads(raw)
    except ValueError:
        return _dedupe_tags(raw.split(","))
    if isinstance(value, list):
        return _dedupe_tags(tag for tag in value if isinstance(tag, str))
    return _dedupe_tags(raw.split(","))


# --------------------------------------------------------------------------- Raindrop

_RAINDROP_INBOX: Final = "unsorted"


def iter_raindrop_csv(text: TextIO) -> Iterator[Entry]:
    return _entries(text, "Raindrop", "url", _raindrop_row)


def _raindrop_row(row: Sequence[str], c: ToolColumns) -> Entry:
    url = c.get(row, "url")
    if (skipped := _skip_for(url)) is not None:
        return skipped
    extra: dict[str, object] = {}
    if (favorite := _bool_flag(c.get(row, "favorite") or None)) is not None:
        extra["favorite"] = favorite
    if highlights := c.text(row, "highlights"):
        extra["highlights"] = highlights
    return ParsedBookmark(
        url=url,
        title=_one_line(c.text(row, "title")),
        folder_path=_raindrop_folder(c.text(row, "folder")),
        tags=_dedupe_tags(c.text(row, "tags").split(",")),
        description=c.text(row, "excerpt"),
        note=c.text(row, "note"),
        added_at=_parse_date(c.get(row, "created") or None),
        extra=extra,
    )


def _raindrop_folder(folder: str) -> tuple[str, ...]:
    # " / " separates nested collections; a bare "/" may belong to a name ("Apps/Services"),
    # unless the file has no " / " at all, as older exports wrote "a/b".
    parts = folder.split(" / ") if " / " in folder else folder.split("/")
    path = tuple(name for part in parts if (name := _one_line(part)))
    return () if _is_inbox(path) else path


def _is_inbox(path: tuple[str, ...]) -> bool:
    return len(path) == 1 and path[0].lower() == _RAINDROP_INBOX


# --------------------------------------------------------------------------- Readwise Reader

_QUOTED: Final = re.compile(r"'((?:[^'\\]|\\.)*)'|\"((?:[^\"\\]|\\.)*)\"")


def iter_readwise_csv(text: TextIO) -> Iterator[Entry]:
    return _entries(text, "Readwise Reader", "url", _readwise_row)


def _readwise_row(row: Sequence[str], c: ToolColumns) -> Entry:
    url = c.get(row, "url")
    if (skipped := _skip_for(url)) is not None:
        return skipped
    location = c.get(row, "location").lower()
    if location == "feed":
        return _skipped("feed", url, "a Readwise feed item (from a subscription, never saved)")
    extra: dict[str, object] = {}
    if location:
        extra["location"] = location
    if (seen := _bool_flag(c.get(row, "seen") or None)) is not None:
        extra["seen"] = seen
    progress = _fraction(c.get(row, "reading progress"))
    return ParsedBookmark(
        url=url,
        title=_one_line(c.text(row, "title")),
        tags=_python_list_tags(c.text(row, "document tags")),
        added_at=_parse_date(c.get(row, "saved date") or None),
        read=None if progress is None else progress >= 1.0,
        archived=(location == "archive") if location else None,
        extra=extra,
    )


def _python_list_tags(raw: str) -> tuple[str, ...]:
    """``['a', "b's"]`` as Readwise writes it; without quotes, the text between commas."""
    inner = raw.strip().removeprefix("[").removesuffix("]")
    quoted = [single or double for single, double in _QUOTED.findall(inner)]
    return _dedupe_tags(quoted if quoted else inner.split(","))


def _fraction(raw: str) -> float | None:
    """Reading progress: a fraction (0.35), or a percentage (35%, or a number above 1)."""
    if not raw:
        return None
    try:
        value = float(raw.rstrip("%"))
    except ValueError:
        return None
    if value != value or value < 0:  # NaN or negative: no progress known
        return None
    return value / 100 if raw.endswith("%") or value > 1 else value
