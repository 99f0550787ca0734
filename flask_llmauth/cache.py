"""An in-process TTL cache with tag invalidation, and the cross-process invalidation log.

The cache serves the hot path: a hit is a dict lookup and a clock read. Entries carry tags
(``key:<id>``, ``team:<id>``, ``user:<id>``); a mutation drops every entry with its tag at
once in this process and appends the tag to the invalidation log, which every other
process polls (and, with Redis configured, receives by pub/sub) to do the same.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from itertools import islice
from typing import Any, Generic, TypeVar

log = logging.getLogger("flask_llmauth")
V = TypeVar("V")


class TTLCache(Generic[V]):
    """A bounded mapping whose entries expire; reads take no lock."""

    def __init__(self, max_size: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_size = max_size
        self._clock = clock
        self._data: dict[Hashable, tuple[float, V, tuple[str, ...]]] = {}
        #: tag -> the one key carrying it, or the set of keys when several do. Most tags
        #: (``key:<id>``) name one entry: no set per entry, so a cold key's fill leaves one
        #: object fewer for the cyclic garbage collector to traverse (a key is hashable,
        #: so it is never a ``set``).
        self._tags: dict[str, Hashable | set[Hashable]] = {}
        self._lock = threading.Lock()
        #: Bumped by every invalidation; a fill that started before one is not stored.
        self.generation = 0

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: Hashable) -> V | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            self.discard(key)
            return None
        return entry[1]

    def set(self, key: Hashable, value: V, ttl: float, tags: Iterable[str] = (),
            generation: int | None = None) -> None:
        """Store ``value``; with ``generation`` (read before loading the value), skip storing
        if an invalidation happened meanwhile, so a stale read is never cached."""
        if ttl <= 0:
            return
        if type(tags) is not tuple:
            tags = tuple(tags)
        data, index = self._data, self._tags
        with self._lock:
            if generation is not None and generation != self.generation:
                return
            if key in data:
                self._drop(key)
            if len(data) >= self.max_size:
                self._evict()
            data[key] = (self._clock() + ttl, value, tags)
            for tag in tags:
                members = index.get(tag)
                if members is None:
                    index[tag] = key
                elif type(members) is set:
                    members.add(key)
                elif members != key:  # a key (``type() is set`` narrows its own branch only)
                    index[tag] = {members, key}  # type: ignore[arg-type]

    def discard(self, key: Hashable) -> None:
        with self._lock:
            self._drop(key)

    def invalidate(self, tag: str) -> int:
        """Drop every entry carrying ``tag``; return how many were dropped."""
        with self._lock:
            self.generation += 1
            members = self._tags.pop(tag, None)
            if members is None:
                return 0
            keys: list[Hashable] = (list(members) if type(members) is set
                                    else [members])  # type: ignore[list-item]  # a key
            for key in keys:
                self._drop(key)
            return len(keys)

    def clear(self) -> None:
        with self._lock:
            self.generation += 1
            self._data.clear()
            self._tags.clear()

    def _evict(self) -> None:
        """Make room at the size bound: drop the oldest entries (insertion order), a
        sixty-fourth of the bound at a time. One batch walks the dict's front once: a
        dict skips the slots of deleted entries when iterated, so dropping one entry per
        insertion through ``next(iter(data))`` would walk ever more of them each time."""
        data = self._data
        excess = len(data) - self.max_size + 1
        for key in list(islice(data, max(excess, self.max_size // 64, 1))):
            self._drop(key)

    def _drop(self, key: Hashable) -> None:
        entry = self._data.pop(key, None)
        if entry is None:
            return
        index = self._tags
        for tag in entry[2]:
            members = index.get(tag)
            if members is None:
                continue
            if type(members) is set:
                members.discard(key)
                if len(members) == 1:
                    index[tag] = next(iter(members))
                elif not members:
                    del index[tag]
            elif members == key:
                del index[tag]


class Invalidator:
    """Fans a tag invalidation out to this process's caches and to every other process."""

    def __init__(self, caches: Iterable[TTLCache[Any]]) -> None:
        self.caches = list(caches)
        self._publishers: list[Callable[[str], None]] = []

    def add_publisher(self, publish: Callable[[str], None]) -> None:
        self._publishers.append(publish)

    def local(self, tag: str) -> None:
        for cache in self.caches:
            cache.invalidate(tag)

    def clear_local(self) -> None:
        """Empty every cache of this process."""
        for cache in self.caches:
            cache.clear()

    def __call__(self, *tags: str) -> None:
        """Invalidate here at once, then tell the other processes."""
        for tag in tags:
            self.local(tag)
        for publish in self._publishers:
            for tag in tags:
                try:
                    publish(tag)
                except Exception:  # a broken channel must not undo the local invalidation
                    log.exception("llmauth: could not publish cache invalidation")
