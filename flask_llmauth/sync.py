"""Cross-process cache invalidation through the database (no Redis required).

Every invalidation appends its tag to ``llmauth_cache_event``; each process polls the log
every ``LLMAUTH_CACHE_SYNC_INTERVAL`` seconds (default 1 s) from its background thread and
drops the matching entries. A revoked or changed key is therefore refused by every process
within about one poll interval, plus the local hit that the poll races with. The poll also
re-applies this process's own events after their transaction committed, which closes the
window where a concurrent request re-cached a row that was about to change.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from .cache import Invalidator
from .durations import utcnow
from .errors import ServiceUnavailable
from .store.db import NotMigrated, Store
from .store.tables import CacheEvent

log = logging.getLogger("flask_llmauth")
_KEEP = timedelta(minutes=10)
#: Ids below the newest seen are re-read this far back: a sequence value can commit after a
#: higher one, and applying an invalidation twice is harmless.
_LOOKBACK = 256


class InvalidationLog:
    def __init__(self, store: Store, invalidator: Invalidator) -> None:
        self.store = store
        self.invalidator = invalidator
        self.last_id: int | None = None
        self._seen: set[int] = set()
        self._polls = 0

    def publish(self, tag: str) -> None:
        with self.store.use():
            CacheEvent.create(tag=tag[:320])

    def start(self) -> None:
        """Remember where the log ends now, before anything is cached (best effort: with the
        database down the first successful poll sets the mark instead)."""
        try:
            self._baseline()
        except NotMigrated:
            pass  # the store logged what to do; the first poll that reaches the log sets the mark
        except ServiceUnavailable:
            log.warning("llmauth: invalidation log not reachable at start-up; the first poll "
                        "that reaches it clears the caches")

    def _baseline(self) -> None:
        with self.store.use():
            newest = CacheEvent.select(CacheEvent.id).order_by(CacheEvent.id.desc()).first()
        self.last_id = newest.id if newest else 0

    def poll(self) -> int:
        """Apply events logged since the last poll; return how many were applied."""
        if self.last_id is None:
            # No mark from start-up: events before this poll are unknown, so anything cached
            # meanwhile may be stale. Drop it all; it is reloaded on demand.
            self._baseline()
            self.invalidator.clear_local()
            return 0
        with self.store.use():
            events = list(CacheEvent.select(CacheEvent.id, CacheEvent.tag)
                          .where(CacheEvent.id > self.last_id - _LOOKBACK)
                          .order_by(CacheEvent.id))
            self._polls += 1
            if self._polls % 600 == 0:
                CacheEvent.delete().where(CacheEvent.created_at < utcnow() - _KEEP).execute()
        applied = 0
        for event in events:
            if event.id in self._seen:
                continue
            self.invalidator.local(event.tag)
            self._seen.add(event.id)
            self.last_id = max(self.last_id, event.id)
            applied += 1
        floor = self.last_id - _LOOKBACK
        self._seen = {i for i in self._seen if i > floor}
        return applied
