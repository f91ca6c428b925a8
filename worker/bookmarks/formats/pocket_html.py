"""Pocket's HTML export (``ril_export.html``), read as a stream.

The file Pocket generated until 2025::

    <title>Pocket Export</title> ...
    <h1>Unread</h1>
    <ul>
      <li><a href="https://..." time_added="1688628695" tags="ifttt,news">Title</a></li>
    </ul>
    <h1>Read Archive</h1>
    <ul> ... </ul>

Bookmarks in the "Read Archive" section are archived; ``time_added`` is epoch seconds; tags
are joined by commas. The file is machine-written and flat, so a small tag scanner reads it:
each "<" is looked at once and each tag's ">" found once, which keeps damaged or hostile
input linear (html.parser has quadratic corners; see the Netscape parser's guards).
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final, TextIO

from worker.bookmarks.parse import (
    BLOCK_SIZE,
    MAX_PENDING_CHARS,
    MAX_TEXT_CHARS,
    Entry,
    ParsedBookmark,
    _dedupe_tags,
    _one_line,
    _parse_epoch,
    _skip_for,
    _skipped,
)

_ARCHIVE_SECTION: Final = "read archive"
_UNREAD_SECTION: Final = "unread"
_ATTRIBUTE: Final = r"""\b{}\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'>]+))"""
_HREF: Final = re.compile(_ATTRIBUTE.format("href"), re.I)
_TIME_ADDED: Final = re.compile(_ATTRIBUTE.format("time_added"), re.I)
_TAGS: Final = re.compile(_ATTRIBUTE.format("tags"), re.I)
_TAG_NAME: Final = re.compile(r"(/?)([a-zA-Z][a-zA-Z0-9]*)")


@dataclass(slots=True)
class _Anchor:
    href: str
    time_added: str
    tags: str
    title: list[str] = field(default_factory=list)


class _PocketScanner:
    """Turns the text, fed in blocks, into entries (``out``, drained by the caller)."""

    def __init__(self) -> None:
        self.out: list[Entry] = []
        self._section = ""
        self._heading: list[str] | None = None  # text of the <h1> being read
        self._anchor: _Anchor | None = None
        self._text_size = 0

    def feed(self, buf: str, *, final: bool) -> str:
        """Scan ``buf``; return the unterminated tag at its end, to be fed again with more."""
        pos = 0
        while True:
            lt = buf.find("<", pos)
            if lt < 0:
                self._text(buf[pos:])
                return ""
            self._text(buf[pos:lt])
            if buf.startswith("<!--", lt):
                end = buf.find("-->", lt + 4)
                if end < 0:
                    return "" if final else buf[lt:]  # an unclosed comment runs to the end
                pos = end + 3
                continue
            gt = buf.find(">", lt)
            if gt < 0:
                if not final:
                    return buf[lt:]
                name = _TAG_NAME.match(buf, lt + 1)
                if name is not None and name.group(0).lower() == "a":
                    url = html.unescape(_attr(_HREF, buf[lt:]))
                    self.out.append(_skipped("malformed", url, "the file ends inside this <a> tag"))
                else:
                    self._text(buf[lt:])  # a "<" that never closed was text
                return ""
            # The tag is what follows the last "<" before this ">"; earlier ones were text.
            start = buf.rfind("<", lt, gt)
            self._text(buf[lt:start])
            self._tag(buf[start + 1 : gt])
            pos = gt + 1

    def finish(self) -> None:
        self._emit()

    def _text(self, data: str) -> None:
        if not data:
            return
        sink = self._anchor.title if self._anchor is not None else self._heading
        if sink is not None and self._text_size < MAX_TEXT_CHARS:
            sink.append(data)
            self._text_size += len(data)

    def _tag(self, tag: str) -> None:
        match = _TAG_NAME.match(tag)
        if match is None:
            return  # a comment, a doctype or a stray "<>"
        closing, name = match.group(1) == "/", match.group(2).lower()
        if name == "a" and not closing:
            self._emit()
            self._anchor = _Anchor(_attr(_HREF, tag), _attr(_TIME_ADDED, tag), _attr(_TAGS, tag))
            self._text_size = 0
        elif name == "a" or name in {"li", "ul", "ol"}:
            self._emit()
        elif name == "h1" and not closing:
            self._emit()
            self._heading, self._text_size = [], 0
        elif name == "h1" and self._heading is not None:
            self._section = _one_line(html.unescape("".join(self._heading))).lower()
            self._heading = None

    def _emit(self) -> None:
        anchor, self._anchor = self._anchor, None
        if anchor is None:
            return
        url = html.unescape(anchor.href).strip()
        if (skipped := _skip_for(url)) is not None:
            self.out.append(skipped)
            return
        title = html.unescape("".join(anchor.title))
        self.out.append(
            ParsedBookmark(
                url=url,
                title=_one_line(title[:MAX_TEXT_CHARS]),
                tags=_dedupe_tags(html.unescape(anchor.tags).split(",")),
                added_at=_parse_epoch(anchor.time_added or None),
                read=False if self._section == _UNREAD_SECTION else None,
                archived=self._archived(),
            )
        )

    def _archived(self) -> bool | None:
        if self._section == _ARCHIVE_SECTION:
            return True
        return False if self._section == _UNREAD_SECTION else None


def _attr(pattern: re.Pattern[str], tag: str) -> str:
    match = pattern.search(tag)
    if match is None:
        return ""
    value = next((group for group in match.groups() if group is not None), "")
    return value[:MAX_TEXT_CHARS]


def iter_pocket_html(text: TextIO) -> Iterator[Entry]:
    scanner = _PocketScanner()
    carry = ""
    while chunk := text.read(BLOCK_SIZE):
        carry = scanner.feed(carry + chunk, final=False)
        if len(carry) > MAX_PENDING_CHARS:
            scanner.out.append(
                _skipped("malformed", "", f"dropped {len(carry)} characters of unterminated markup")
            )
            carry = ""
        yield from _drain(scanner)
    scanner.feed(carry, final=True)
    scanner.finish()
    yield from _drain(scanner)


def _drain(scanner: _PocketScanner) -> list[Entry]:
    entries, scanner.out = scanner.out, []
    return entries
