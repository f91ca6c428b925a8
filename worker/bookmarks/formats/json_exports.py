"""The JSON exports of Omnivore, wallabag, Linkwarden and Karakeep, read element by element.

* Omnivore (the ``metadata_<from>_to_<to>.json`` files of its export zip): an array of
  ``{id, slug, title, description, author, url, state, readingProgress, thumbnail, labels,
  savedAt, updatedAt, publishedAt}``; state ``Active``/``Archived`` (``SUCCEEDED``/
  ``ARCHIVED`` in older files), readingProgress 0-100, labels a list of names, ISO dates.
* wallabag (Export > JSON): an array of entries ``{id, title, url, given_url, is_archived,
  is_starred, tags, created_at, updated_at, archived_at, starred_at, deleted_at, content,
  annotations, ...}``; flags 0/1, tags a list of labels, dates ``2016-09-08T11:55:58+0200``.
  Archiving is wallabag's "mark as read". Annotations carry the user's notes on quotes.
* Linkwarden (Settings > Data > Export): the user object with ``collections``, each
  ``{id, name, description, color, parentId, ..., links: [{id, name, type, description, url,
  importDate, createdAt, updatedAt, tags: [{name, ...}], ...}]}``; sub-collections point at
  their parent by ``parentId``.
* Karakeep (formerly Hoarder; Settings > Import/Export > JSON): ``{bookmarks: [{id,
  createdAt (epoch seconds), title, tags: [names], lists: [list ids], content: {type: link,
  url, description, ...} | {type: text, text} | {type: asset, assetId}, description, summary,
  note, archived, favourited}], lists: [{id, name, type: manual|smart, parentId, ...}]}``.
  The lists come after the bookmarks, so bookmarks in lists are held until the lists are
  read (memory then grows with those bookmarks, as the importer's own map of them does).
  Smart lists are saved searches, not folders; a bookmark's folder is its first manual list,
  and the others are kept in ``extra["lists"]``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Final, TextIO

from worker.bookmarks.formats.folders import FolderTree, folder_id
from worker.bookmarks.formats.jsondoc import JsonDocument
from worker.bookmarks.parse import (
    MAX_TEXT_CHARS,
    Entry,
    ParsedBookmark,
    SkippedEntry,
    _bool_flag,
    _dedupe_tags,
    _json_entries,
    _json_entry,
    _JsonArrayReader,
    _one_line,
    _parse_date,
    _skip_for,
    _skipped,
    _text,
)


def _object(element: object, what: str) -> dict[str, object]:
    if not isinstance(element, dict):
        raise TypeError(f"expected {what} object, found {type(element).__name__}")
    return element


def _url(value: object) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TypeError(f"the url is a {type(value).__name__}, not a string")
    return value.strip()


def _names(value: object) -> tuple[str, ...]:
    """Tags written as a list of names, or of objects with a name."""
    if not isinstance(value, list):
        return ()
    return _dedupe_tags(
        _text(tag.get("name")) if isinstance(tag, dict) else _text(tag) for tag in value
    )


# --------------------------------------------------------------------------- Omnivore

_OMNIVORE_ARCHIVED: Final = frozenset({"archived"})
_OMNIVORE_ACTIVE: Final = frozenset({"active", "succeeded", "processing", "content_not_fetched"})


def iter_omnivore(text: TextIO) -> Iterator[Entry]:
    reader = _JsonArrayReader(text, what="an Omnivore export (metadata_*.json)")
    return _json_entries(reader.elements(), _omnivore_entry, "url")


def _omnivore_entry(element: object) -> Entry:
    item = _object(element, "an Omnivore item")
    url = _url(item.get("url"))
    if (skipped := _skip_for(url)) is not None:
        return skipped
    state = _text(item.get("state")).lower()
    if state == "deleted":
        return _skipped("deleted", url, "deleted in Omnivore")
    progress = item.get("readingProgress")
    extra: dict[str, object] = {}
    if author := _one_line(_text(item.get("author"))):
        extra["author"] = author
    return ParsedBookmark(
        url=url,
        title=_one_line(_text(item.get("title"))),
        tags=_names(item.get("labels")),
        description=_text(item.get("description")).strip(),
        added_at=_parse_date(_text(item.get("savedAt")) or None),
        modified_at=_parse_date(_text(item.get("updatedAt")) or None),
        read=_percent_read(progress),
        archived=_omnivore_archived(state),
        extra=extra,
    )


def _omnivore_archived(state: str) -> bool | None:
    if state in _OMNIVORE_ARCHIVED:
        return True
    return False if state in _OMNIVORE_ACTIVE else None


def _percent_read(progress: object) -> bool | None:
    if isinstance(progress, bool) or not isinstance(progress, int | float):
        return None
    return progress >= 100


# --------------------------------------------------------------------------- wallabag


def iter_wallabag(text: TextIO) -> Iterator[Entry]:
    reader = _JsonArrayReader(text, what="a wallabag export")
    return _json_entries(reader.elements(), _wallabag_entry, "url")


def _wallabag_entry(element: object) -> Entry:
    entry = _object(element, "a wallabag entry")
    url = _url(entry.get("url")) or _url(entry.get("given_url"))
    if (skipped := _skip_for(url)) is not None:
        return skipped
    if entry.get("deleted_at"):
        return _skipped("deleted", url, "deleted in wallabag")
    archived = _bool_flag(entry.get("is_archived"))
    extra: dict[str, object] = {}
    if (starred := _bool_flag(entry.get("is_starred"))) is not None:
        extra["favorite"] = starred
    return ParsedBookmark(
        url=url,
        title=_one_line(_text(entry.get("title"))),
        tags=_names(entry.get("tags")),
        note=_annotations(entry.get("annotations")),
        added_at=_parse_date(_text(entry.get("created_at")) or None),
        modified_at=_parse_date(_text(entry.get("updated_at")) or None),
        read=archived,  # wallabag's archive is "mark as read"
        archived=archived,
        extra=extra,
    )


def _annotations(value: object) -> str:
    """The user's notes, each after the quote it is about: ``"quote": note``."""
    if not isinstance(value, list):
        return ""
    notes = []
    for annotation in value:
        if not isinstance(annotation, dict):
            continue
        note = _text(annotation.get("text")).strip()
        if not note:
            continue  # a highlight without a note
        quote = _one_line(_text(annotation.get("quote")))
        notes.append(f"\u201c{quote}\u201d: {note}" if quote else note)
    return "\n".join(notes)[:MAX_TEXT_CHARS]


# --------------------------------------------------------------------------- Linkwarden


def iter_linkwarden(text: TextIO) -> Iterator[Entry]:
    doc = JsonDocument(text, what="a Linkwarden export")
    doc.open_object()
    tree = FolderTree()
    waiting: list[tuple[ParsedBookmark, str | None, str]] = []  # (entry, parent id, name)
    for key in doc.members():
        if key == "collections":
            if doc.open_array():
                for _ in doc.objects():
                    yield from _linkwarden_collection(doc, tree, waiting)
        else:
            yield from doc.skip()
    for entry, parent, name in waiting:  # parents never seen: keep the part that is known
        above = tree.best_path(parent) if parent is not None else ()
        yield replace(entry, folder_path=(*above, name))


def _linkwarden_collection(
    doc: JsonDocument, tree: FolderTree, waiting: list[tuple[ParsedBookmark, str | None, str]]
) -> Iterator[Entry]:
    """One collection's links, in the collection's folder; a link whose folder is not known
    yet (the collection's name comes after its links, or its parent is further on) is held."""
    id_: str | None = None
    parent: str | None = None
    name = ""
    held: list[ParsedBookmark] = []
    for key in doc.members():
        if key == "links":
            path = tree.path_below(parent, name) if name else None
            for element in doc.items() if doc.open_array() else ():
                entry = (
                    element
                    if isinstance(element, SkippedEntry)
                    else _json_entry(element, _linkwarden_link, "url")
                )
                if not isinstance(entry, ParsedBookmark):
                    yield entry
                elif path is None:
                    held.append(entry)
                else:
                    yield replace(entry, folder_path=path)
        elif key in ("id", "parentId", "name"):
            value = doc.value()
            if key == "id":
                id_ = folder_id(value)
            elif key == "parentId":
                parent = folder_id(value)
            else:
                name = _one_line(_text(value))
        else:
            yield from doc.skip()
    if id_ is not None and name:
        tree.add(id_, name, parent)
    path = tree.path_below(parent, name) if name else ()
    for entry in held:
        if path is None:
            waiting.append((entry, parent, name))
        else:
            yield replace(entry, folder_path=path)


def _linkwarden_link(element: object) -> Entry:
    link = _object(element, "a Linkwarden link")
    url = _url(link.get("url"))
    if (skipped := _skip_for(url)) is not None:
        return skipped
    return ParsedBookmark(
        url=url,
        title=_one_line(_text(link.get("name"))),
        tags=_names(link.get("tags")),
        description=_text(link.get("description")).strip(),
        # importDate is the date the link was first saved elsewhere, when it was imported.
        added_at=_parse_date(_text(link.get("importDate") or link.get("createdAt")) or None),
        modified_at=_parse_date(_text(link.get("updatedAt")) or None),
    )


# --------------------------------------------------------------------------- Karakeep


def iter_karakeep(text: TextIO) -> Iterator[Entry]:
    doc = JsonDocument(text, what="a Karakeep export")
    doc.open_object()
    lists: _KarakeepLists | None = None
    waiting: list[tuple[ParsedBookmark, tuple[str, ...]]] = []
    for key in doc.members():
        if key == "bookmarks":
            for element in doc.items() if doc.open_array() else ():
                if isinstance(element, SkippedEntry):
                    yield element
                    continue
                entry = _json_entry(element, _karakeep_entry, "url")
                list_ids = _list_ids(element)
                if not isinstance(entry, ParsedBookmark) or not list_ids:
                    yield entry
                elif lists is None:
                    waiting.append((entry, list_ids))
                else:
                    yield lists.place(entry, list_ids)
        elif key == "lists":
            value = doc.value()
            if isinstance(value, SkippedEntry):
                yield value
            lists = _KarakeepLists(value)
        else:
            yield from doc.skip()
    final = lists or _KarakeepLists(None)
    for entry, list_ids in waiting:
        yield final.place(entry, list_ids)


def _karakeep_entry(element: object) -> Entry:
    bookmark = _object(element, "a Karakeep bookmark")
    content = bookmark.get("content")
    kind = _text(content.get("type")) if isinstance(content, dict) else ""
    if not isinstance(content, dict) or kind != "link":
        what = f"a Karakeep {kind} bookmark" if kind else "a Karakeep bookmark without content"
        return _skipped("not_a_link", "", f"{what}, not a link")
    url = _url(content.get("url"))
    if (skipped := _skip_for(url)) is not None:
        return skipped
    extra: dict[str, object] = {}
    if (favourite := _bool_flag(bookmark.get("favourited"))) is not None:
        extra["favorite"] = favourite
    description = _text(bookmark.get("description")) or _text(content.get("description"))
    return ParsedBookmark(
        url=url,
        title=_one_line(_text(bookmark.get("title"))),
        tags=_names(bookmark.get("tags")),
        description=description.strip(),
        note=_text(bookmark.get("note")).strip(),
        added_at=_parse_date(_text(bookmark.get("createdAt")) or None),
        archived=_bool_flag(bookmark.get("archived")),
        extra=extra,
    )


def _list_ids(element: object) -> tuple[str, ...]:
    lists = element.get("lists") if isinstance(element, dict) else None
    if not isinstance(lists, list):
        return ()
    return tuple(id_ for value in lists if (id_ := folder_id(value)) is not None)


class _KarakeepLists:
    """The manual lists of an export, as folders."""

    def __init__(self, value: object) -> None:
        self._tree = FolderTree()
        for item in value if isinstance(value, list) else ():
            if not isinstance(item, dict) or _text(item.get("type")) == "smart":
                continue
            id_, name = folder_id(item.get("id")), _one_line(_text(item.get("name")))
            if id_ is not None and name:
                self._tree.add(id_, name, folder_id(item.get("parentId")))

    def place(self, entry: ParsedBookmark, list_ids: Iterable[str]) -> ParsedBookmark:
        paths = [self._tree.best_path(id_) for id_ in list_ids if id_ in self._tree]
        if not paths:
            return entry
        extra = dict(entry.extra)
        if len(paths) > 1:
            extra["lists"] = [" / ".join(path) for path in paths]
        return replace(entry, folder_path=paths[0], extra=extra)
