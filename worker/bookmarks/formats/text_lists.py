"""Line-based exports: OneTab's text and plain lists of URLs.

* OneTab ("Export / Import URLs"): one tab per line, ``https://url | Title``; a blank line
  separates tab groups. Groups have no names in the export, so the group's number (1, 2, ...)
  is kept in ``extra["group"]`` rather than made a folder.
* A plain list: one URL per line; text after the URL (separated by whitespace) is its title;
  blank lines and lines starting with ``#`` are not entries.

Lines are read with a length limit, so a file without line breaks is never held whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final, TextIO

from worker.bookmarks.parse import (
    MAX_CSV_LINE_CHARS,
    MAX_TEXT_CHARS,
    Entry,
    ParsedBookmark,
    _one_line,
    _skip_for,
    _skipped,
)

MAX_LINE_CHARS: Final = MAX_CSV_LINE_CHARS
_ONETAB_SEPARATOR: Final = " | "


def _lines(text: TextIO) -> Iterator[tuple[int, str | None]]:
    """(line number, line without its line break); None for a line over MAX_LINE_CHARS,
    whose rest is read and dropped."""
    number = 0
    while line := text.readline(MAX_LINE_CHARS):
        number += 1
        if len(line) >= MAX_LINE_CHARS and not line.endswith(("\n", "\r")):
            while (rest := text.readline(MAX_LINE_CHARS)) and not rest.endswith(("\n", "\r")):
                pass
            yield number, None
            continue
        yield number, line.rstrip("\r\n")


def _too_long(number: int) -> Entry:
    return _skipped("malformed", "", f"line {number} is longer than {MAX_LINE_CHARS} characters")


def iter_onetab(text: TextIO) -> Iterator[Entry]:
    group = 1
    in_group = False  # whether the current group has a tab yet
    for number, line in _lines(text):
        if line is None:
            yield _too_long(number)
            continue
        if not line.strip():
            if in_group:
                group, in_group = group + 1, False
            continue
        in_group = True
        head, _, title = line.partition(_ONETAB_SEPARATOR)
        # OneTab writes URLs without spaces: what follows one is not part of it (a line cut
        # short, or a title without its separator).
        url = next(iter(head.split()), "")
        if (skipped := _skip_for(url)) is not None:
            yield skipped
            continue
        yield ParsedBookmark(
            url=url, title=_one_line(title[:MAX_TEXT_CHARS]), extra={"group": group}
        )


def iter_url_list(text: TextIO) -> Iterator[Entry]:
    for number, line in _lines(text):
        if line is None:
            yield _too_long(number)
            continue
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        url, *rest = stripped.split(maxsplit=1)
        title = rest[0] if rest else ""
        if (skipped := _skip_for(url)) is not None:
            yield skipped
            continue
        yield ParsedBookmark(url=url, title=_one_line(title[:MAX_TEXT_CHARS]))
