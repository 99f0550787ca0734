"""The in-process TTL cache: expiry, size bound, tag invalidation, stale fills refused."""

from __future__ import annotations

from flask_llmauth.cache import TTLCache


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_entries_expire_after_their_ttl() -> None:
    clock = Clock()
    cache: TTLCache[str] = TTLCache(10, clock=clock)
    cache.set("a", "A", 5)
    cache.set("never", "N", 0)  # a TTL of 0 stores nothing
    assert cache.get("a") == "A" and cache.get("never") is None
    clock.now += 4.9
    assert cache.get("a") == "A"
    clock.now += 0.1
    assert cache.get("a") is None and len(cache) == 0


def test_tags_drop_every_entry_carrying_them_and_only_those() -> None:
    cache: TTLCache[str] = TTLCache(10, clock=Clock())
    cache.set("k1", "one", 60, ("key:1", "team:t", "user:u"))
    cache.set("k2", "two", 60, ("key:2", "team:t"))
    cache.set("k3", "three", 60, ("key:3", "user:u"))
    assert cache.invalidate("team:t") == 2
    assert (cache.get("k1"), cache.get("k2"), cache.get("k3")) == (None, None, "three")
    assert cache.invalidate("team:t") == 0
    # k1 is gone, so its other tags no longer reach it; k3 still carries user:u
    assert cache.invalidate("user:u") == 1 and len(cache) == 0
    assert cache._tags == {}  # no empty tag sets are left behind


def test_replacing_an_entry_moves_its_tags() -> None:
    cache: TTLCache[str] = TTLCache(10, clock=Clock())
    cache.set("k", "old", 60, ("team:a",))
    cache.set("k", "new", 60, ("team:b",))
    assert cache.invalidate("team:a") == 0 and cache.get("k") == "new"
    assert cache.invalidate("team:b") == 1 and cache.get("k") is None


def test_a_fill_that_started_before_an_invalidation_is_not_stored() -> None:
    cache: TTLCache[str] = TTLCache(10, clock=Clock())
    generation = cache.generation
    cache.invalidate("key:1")  # e.g. the key changed while it was being read
    cache.set("k", "stale", 60, ("key:1",), generation=generation)
    assert cache.get("k") is None
    cache.set("k", "fresh", 60, ("key:1",), generation=cache.generation)
    assert cache.get("k") == "fresh"


def test_the_oldest_entries_make_room_at_the_size_bound() -> None:
    cache: TTLCache[int] = TTLCache(3, clock=Clock())
    for n in range(5):
        cache.set(n, n, 60, (f"key:{n}",))
    assert len(cache) == 3 and [cache.get(n) for n in range(5)] == [None, None, 2, 3, 4]
    assert set(cache._tags) == {"key:2", "key:3", "key:4"}


def test_a_tag_shared_by_entries_reaches_those_left_after_one_is_dropped() -> None:
    clock = Clock()
    cache: TTLCache[str] = TTLCache(10, clock=clock)
    cache.set("k1", "one", 60, ("key:1", "user:u"))
    cache.set("k2", "two", 60, ("key:2", "user:u"))
    cache.set("k3", "three", 60, ("key:3", "user:u"))
    assert cache.invalidate("key:1") == 1  # user:u still names k2 and k3
    cache.set("k2", "two again", 60, ("key:2", "user:u"))  # a refill keeps its tags
    assert cache.invalidate("key:3") == 1
    assert cache.invalidate("user:u") == 1 and cache.get("k2") is None
    cache.set("k4", "four", 60, ("user:v", "user:v"))  # a repeated tag counts once
    assert cache.invalidate("user:v") == 1 and len(cache) == 0
    assert cache._tags == {}


def test_the_size_bound_evicts_the_oldest_in_batches_and_keeps_the_tags_exact() -> None:
    cache: TTLCache[int] = TTLCache(128, clock=Clock())
    for n in range(300):
        cache.set(n, n, 60, (f"key:{n}", f"user:{n % 7}"))
        assert len(cache) <= 128
    kept = [n for n in range(300) if cache.get(n) is not None]
    assert kept == list(range(300 - len(kept), 300)) and len(kept) >= 128 - 128 // 64
    assert set(cache._tags) == {f"key:{n}" for n in kept} | {f"user:{n % 7}" for n in kept}
    assert sum(cache.invalidate(f"user:{u}") for u in range(7)) == len(kept)
    assert len(cache) == 0 and cache._tags == {}
