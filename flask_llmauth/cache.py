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
from typing import Any, Generic, TypeVar

log = logging.getLogger("flask_llmauth")
V = TypeVar("V")


class TTLCache(Generic[V]):
    """A bounded mapping whose entries expire; reads take no lock."""

    def __init__(self, max_size: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_size = max_size
        self._clock = clock
        self._data: dict[Hashable, tuple[float, V, tuple[str, ...]]] = {}
        self._tags: dict[str, set[Hashable]] = {}
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
        tags = tuple(tags)
        data, index = self._data, self._tags
        with self._lock:
            if generation is not None and generation != self.generation:
                return
            if key in data:
                self._drop(key)
            while len(data) >= self.max_size:
                self._drop(next(iter(data)))
            data[key] = (self._clock() + ttl, value, tags)
            for tag in tags:
                members = index.get(tag)
                if members is None:
                    index[tag] = {key}
                else:
                    members.add(key)

    def discard(self, key: Hashable) -> None:
        with self._lock:
            self._drop(key)

    def invalidate(self, tag: str) -> int:
        """Drop every entry carrying ``tag``; return how many were dropped."""
        with self._lock:
            self.generation += 1
            keys = self._tags.pop(tag, ())
            for key in list(keys):
                self._drop(key)
            return len(keys)

    def clear(self) -> None:
        with self._lock:
            self.generation += 1
            self._data.clear()
            self._tags.clear()

    def _drop(self, key: Hashable) -> None:
        entry = self._data.pop(key, None)
        if entry is None:
            return
        for tag in entry[2]:
            members = self._tags.get(tag)
            if members is not None:
                members.discard(key)
                if not members:
                    del self._tags[tag]


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
