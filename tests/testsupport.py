"""Helpers that several test modules share (pytest puts this folder on ``sys.path``: the
folder of the rootdir's conftest, which has no ``__init__``)."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from hypothesis import strategies as st

from worker.bookmarks.parse import ParsedBookmark, SkippedEntry, iter_bookmarks
from worker.config import get_settings
from worker.errors import BookmarkFormatError


@contextmanager
def restored_environ(keys: Iterable[str]) -> Iterator[None]:
    """Put the environment variables ``keys`` back as they were (unset ones unset) and drop
    the cached Settings when the block ends, however it ends."""
    saved = {key: os.environ.get(key) for key in keys}
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        get_settings.cache_clear()


def consume(data: bytes, fmt: str | None = None) -> None:
    """Parse to the end: only entries, or BookmarkFormatError, may come out."""
    try:
        for entry in iter_bookmarks(io.BytesIO(data), fmt=fmt):
            assert isinstance(entry, ParsedBookmark | SkippedEntry)
    except BookmarkFormatError:
        pass


def mutate(data: st.DataObject, raw: bytes) -> bytes:
    """``raw`` after 1-12 random deletions, insertions, byte replacements or truncations
    (drawn from ``data``): the damage a broken download or a hand edit does to an export."""
    out = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 12))):
        pos = data.draw(st.integers(0, len(out) - 1))
        action = data.draw(st.sampled_from(["delete", "insert", "replace", "truncate"]))
        if action == "delete":
            del out[pos : pos + data.draw(st.integers(1, 40))]
        elif action == "insert":
            out[pos:pos] = data.draw(st.binary(min_size=1, max_size=20))
        elif action == "replace":
            out[pos] = data.draw(st.integers(0, 255))
        else:
            del out[pos:]
        if not out:
            break
    return bytes(out)
