"""A small thread-safe least-recently-used map, for per-process memos of pure results (a
phrase's vector, a text's token count) that come back again and again."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRU(Generic[K, V]):
    """At most ``maxsize`` entries; a lookup that finds a key makes it the most recent, and
    the least recent goes first when a put overflows."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._data: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get_many(self, keys: Sequence[K]) -> list[V | None]:
        """The value of each key, None where it is not kept."""
        with self._lock:
            found = [self._data.get(k) for k in keys]
            for k, v in zip(keys, found, strict=True):
                if v is not None:
                    self._data.move_to_end(k)
        return found

    def put_many(self, items: Iterable[tuple[K, V]]) -> None:
        with self._lock:
            self._data.update(items)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)

    def keys(self) -> list[K]:
        """Least recent first."""
        with self._lock:
            return list(self._data)
