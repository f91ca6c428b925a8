"""Folders that name their parent by id (Karakeep lists, Linkwarden collections).

An export may list a child before its parent, or (Karakeep) every bookmark before any list,
so a path is only known once each ancestor has been seen: ``path`` says None until then and
the parser holds those bookmarks back; ``best_path`` gives what is known at the end.
"""

from __future__ import annotations

from worker.bookmarks.parse import MAX_FOLDER_DEPTH


def folder_id(value: object) -> str | None:
    """An id as the exports write it (a number or a string), or None."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        return None
    text = str(value).strip()
    return text or None


class FolderTree:
    def __init__(self) -> None:
        self._folders: dict[str, tuple[str, str | None]] = {}  # id -> (name, parent id)

    def add(self, id_: str, name: str, parent: str | None) -> None:
        self._folders[id_] = (name, parent)

    def __contains__(self, id_: str) -> bool:
        return id_ in self._folders

    def path(self, id_: str) -> tuple[str, ...] | None:
        """The names from the root down to ``id_``; None while an ancestor is unknown."""
        names, complete = self._walk(id_)
        return names if complete else None

    def path_below(self, parent: str | None, name: str) -> tuple[str, ...] | None:
        """The path of a folder not added yet, named ``name``, inside ``parent``."""
        if parent is None:
            return (name,)
        above = self.path(parent)
        return None if above is None else (*above, name)

    def best_path(self, id_: str) -> tuple[str, ...]:
        """The path as far up as it is known: unknown ancestors are left out."""
        return self._walk(id_)[0]

    def _walk(self, id_: str) -> tuple[tuple[str, ...], bool]:
        names: list[str] = []
        seen: set[str] = set()
        current: str | None = id_
        while current is not None:
            if current in seen or len(names) >= MAX_FOLDER_DEPTH:
                break  # a cycle, or absurd depth: keep what was found
            seen.add(current)
            found = self._folders.get(current)
            if found is None:
                return tuple(reversed(names)), False
            names.append(found[0])
            current = found[1]
        return tuple(reversed(names)), True
