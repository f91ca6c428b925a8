"""Streaming reads of JSON objects whose arrays hold the bookmarks (Karakeep, Linkwarden).

Built on parse.py's array reader: the same buffer, the same element decoding and the same
resynchronisation after a damaged element; this adds walking an object's members, so an
array nested in an object is read one element at a time instead of decoded whole.
"""

from __future__ import annotations

from collections.abc import Iterator

from worker.bookmarks.parse import SkippedEntry, _JsonArrayReader
from worker.errors import BookmarkFormatError

_SPACE = " \t\r\n"


class JsonDocument(_JsonArrayReader):
    def open_object(self) -> None:
        """Read the "{" of the top-level object."""
        self._skip(_SPACE + "\ufeff")
        if self._at_end() or self._buf[self._pos] != "{":
            raise BookmarkFormatError(f"{self._what} must be a JSON object")
        self._pos += 1

    def members(self) -> Iterator[str]:
        """The keys of the object whose "{" has been read, up to and including its "}".

        After each key the caller must read the member's value (``value``, ``open_array`` +
        ``items``/``objects``) before asking for the next key."""
        while True:
            self._skip(_SPACE + ",")
            if self._at_end():
                return
            if self._buf[self._pos] == "}":
                self._pos += 1
                return
            key = self._next_element()
            if not isinstance(key, str):
                raise BookmarkFormatError(
                    f"{self._what} is damaged: expected a key at character "
                    f"{self._consumed + self._pos}"
                )
            self._skip(_SPACE)
            if self._at_end():
                return
            if self._buf[self._pos] != ":":
                raise BookmarkFormatError(
                    f"{self._what} is damaged: expected ':' after {key[:80]!r}"
                )
            self._pos += 1
            yield key

    def value(self) -> object | SkippedEntry:
        """The next value, decoded whole."""
        self._skip(_SPACE)
        return self._next_element()

    def skip(self) -> Iterator[SkippedEntry]:
        """Read past the next value one element or member at a time (a member we do not use
        may be large: Linkwarden's pinned links carry page text); report damage found."""
        self._skip(_SPACE)
        if self._at_end():
            return
        opening = self._buf[self._pos]
        if opening == "[":
            self._pos += 1
            for element in self.items():
                if isinstance(element, SkippedEntry):
                    yield element
        elif opening == "{":
            self._pos += 1
            for _ in self.members():
                # One level down only: each member is decoded whole, so nesting costs no
                # recursion here (the decoder's own limit applies).
                if isinstance(value := self.value(), SkippedEntry):
                    yield value
        elif isinstance(value := self._next_element(), SkippedEntry):
            yield value

    def open_array(self) -> bool:
        """Read the "[" of the next value; False (and the value skipped) if it is no array."""
        return self._open("[")

    def objects(self) -> Iterator[None]:
        """For each object in the array whose "[" has been read, stop after its "{": the
        caller reads it with ``members``. Other elements are skipped."""
        while True:
            self._skip(_SPACE + ",")
            if self._at_end():
                return
            if self._buf[self._pos] == "]":
                self._pos += 1
                return
            if self._buf[self._pos] == "{":
                self._pos += 1
                yield None
            else:
                self._next_element()

    def _open(self, bracket: str) -> bool:
        self._skip(_SPACE)
        if self._at_end():
            return False
        if self._buf[self._pos] == bracket:
            self._pos += 1
            return True
        self._next_element()
        return False
