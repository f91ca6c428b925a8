"""Parsers for the exports of the read-it-later and bookmarking tools people leave.

Each takes the decoded text of an export and yields ``ParsedBookmark`` / ``SkippedEntry`` as
parse.py's own parsers do, and builds on parse.py's helpers (its streaming JSON reader, its
CSV row loop, its date, tag and URL checks), so damage is handled the same way in every
format. ``worker.bookmarks.parse.detect_format`` decides which one reads a file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Final, TextIO

from worker.bookmarks.formats import json_exports, pocket_html, text_lists, tool_csv
from worker.bookmarks.parse import Entry

PARSERS: Final[dict[str, Callable[[TextIO], Iterator[Entry]]]] = {
    "pocket_html": pocket_html.iter_pocket_html,
    "pocket_csv": tool_csv.iter_pocket_csv,
    "instapaper_csv": tool_csv.iter_instapaper_csv,
    "raindrop_csv": tool_csv.iter_raindrop_csv,
    "readwise_csv": tool_csv.iter_readwise_csv,
    "omnivore_json": json_exports.iter_omnivore,
    "wallabag_json": json_exports.iter_wallabag,
    "linkwarden_json": json_exports.iter_linkwarden,
    "karakeep_json": json_exports.iter_karakeep,
    "onetab": text_lists.iter_onetab,
    "url_list": text_lists.iter_url_list,
}
