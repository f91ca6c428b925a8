"""A faster tag loop for html.parser, for markup as regular as a bookmark export.

``HTMLParser.goahead`` spends most of a large import's parse time on bookkeeping that a
bookmark file does not need: line and column tracking for every token, a regex search per
token kind, CDATA modes. ``FastMarkupParser`` keeps HTMLParser's interface (``feed``,
``rawdata``, ``reset`` and the ``handle_*`` hooks) and replaces only the loop: one regex finds
the next tag, one more reads its attributes as HTMLParser reports them, and text
gets the same character-reference handling as ``convert_charrefs=True``. About twice as fast
on a browser export (bench/import_bookmarks.py).

What it does not do, on purpose: report positions (``getpos`` stays at the start), call
``handle_comment``/``handle_decl``/``handle_pi`` (they are skipped), or switch to CDATA mode
for ``<script>``/``<style>`` (a bookmark file has none; the Netscape parser turned that off
already). A start tag whose quotes never close is read up to the next ``>``, as a browser
would.
"""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser
from typing import Final

# A tag with balanced quotes in its attributes (possessive: no backtracking on long ICON
# data), a comment, a declaration/marked section, a processing instruction, a bogus end tag.
_MARKUP: Final = re.compile(
    r"""<(?:
        (?P<close>/)?(?P<tag>[A-Za-z][^\s/>\x00]*+)(?P<attrs>(?:[^>"']++|"[^"]*+"|'[^']*+')*+)>
      | !--.*?--!?>
      | ![^>]*+>
      | \?[^>]*+>
      | /[^>]*+>
    )""",
    re.S | re.X,
)
_OPENING: Final = re.compile(r"<(?P<close>/)?(?P<tag>[A-Za-z][^\s/>\x00]*)")
# A "&" this close to the end may be the start of a character reference cut by the block.
_REF_TAIL: Final = 34
_REF_END: Final = re.compile(r"[\s;]")
# name, then ="double" | ='single' | =bare, each optional.
_ATTRIBUTE: Final = re.compile(
    r"""([^\s/>="'][^\s/>=]*)(?:\s*=+\s*(?:"([^"]*)"|'([^']*)'|(?!["'])([^\s>]*)))?"""
)


class FastMarkupParser(HTMLParser):
    """HTMLParser with a leaner ``goahead`` (see the module docstring)."""

    def goahead(self, end: bool) -> None:
        rawdata = self.rawdata
        i, n = 0, len(rawdata)
        while i < n:
            j = rawdata.find("<", i)
            if j < 0:
                j = self._text_end(rawdata, i, n, end)
                if j <= i:
                    break
            if j > i:
                self._text(rawdata[i:j])
                i = j
                continue
            k = self._markup(rawdata, i, n)
            if k < 0:
                break  # incomplete: wait for more input (the caller bounds how long)
            i = k
        self.rawdata = rawdata[i:]

    # --- pieces --------------------------------------------------------------------------

    @staticmethod
    def _text_end(rawdata: str, i: int, n: int, end: bool) -> int:
        """Where text with no tag after it may end now: hold back a trailing "&..." that
        more input could complete, like HTMLParser with convert_charrefs."""
        if end:
            return n
        amp = rawdata.rfind("&", max(i, n - _REF_TAIL))
        if amp >= 0 and not _REF_END.search(rawdata, amp):
            return amp
        return n

    def _text(self, data: str) -> None:
        self.handle_data(html.unescape(data) if "&" in data else data)

    def _markup(self, rawdata: str, i: int, n: int) -> int:
        """Handle the markup at ``i``; return where the text after it starts, or -1 when it
        is incomplete."""
        close = rawdata.find(">", i + 1)
        if close < 0:
            return -1
        guard = self.parse_starttag_guard(i, close)
        if guard is not None:
            return guard
        match = _MARKUP.match(rawdata, i)
        if match is None:
            opening = _OPENING.match(rawdata, i)
            if opening is None:
                return close + 1  # "<!" or "<?" junk with a quote in it: skip it
            # A tag whose quotes do not balance: read it up to the first ">".
            self._tag(opening["tag"], opening["close"], rawdata[opening.end() : close])
            return close + 1
        tag = match["tag"]
        if tag is not None:
            self._tag(tag, match["close"], match["attrs"])
        return match.end()

    def parse_starttag_guard(self, i: int, close: int) -> int | None:
        """A subclass's chance to skip a tag unparsed (e.g. one with absurdly many tokens):
        return where to continue, or None to parse it."""
        return None

    def _tag(self, tag: str, close: str | None, attrs_text: str) -> None:
        name = tag.lower()
        if close:
            self.handle_endtag(name)
            return
        self.handle_starttag(name, _attributes(attrs_text))


def _attributes(text: str) -> list[tuple[str, str | None]]:
    """Attributes as HTMLParser reports them: names lower-cased, quotes removed, character
    references decoded, a name without "=" valued None."""
    attrs: list[tuple[str, str | None]] = []
    for match in _ATTRIBUTE.finditer(text):
        name, double, single, bare = match.groups()
        value = double if double is not None else single if single is not None else bare
        if value and "&" in value:
            value = html.unescape(value)
        attrs.append((name.lower(), value))
    return attrs
