"""The router's decision cache: hits for the same text, a hard bound, expiry, and invalidation on store changes."""

from __future__ import annotations

import pytest

from router.decision_cache import DecisionCache
from router.types import RouteDecision, RouteInput


def decision(tier: str = "small", *, fallback: bool = False) -> RouteDecision:
    return RouteDecision(tier=tier, tier_index=0 if tier == "small" else 1, router="knn", score=0.2,
                         thresholds=(0.5,), reason="knn", fallback=fallback, overhead_ms=12.0, embed_ms=9.0,
                         batch_size=4)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_same_text_hits_and_is_marked_cached():
    cache = DecisionCache(8, 60)
    item = RouteInput("Extract the invoice number.")
    assert cache.get(item, "knn") is None
    cache.put(item, "knn", decision("large"), generation=cache.generation)
    hit = cache.get(RouteInput("Extract the invoice number."), "knn")
    assert hit is not None and hit.tier == "large" and hit.cached
    assert (hit.overhead_ms, hit.embed_ms, hit.batch_size) == (0.0, 0.0, 1)  # this request spent nothing
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.entries) == (1, 1, 1)
    assert stats.hit_rate == pytest.approx(0.5)


def test_text_router_and_threshold_are_all_part_of_the_key():
    cache = DecisionCache(8, 60)
    item = RouteInput("Prove it.")
    cache.put(item, "knn", decision(), generation=0)
    assert cache.get(RouteInput("prove it."), "knn") is None  # case may embed differently
    assert cache.get(item, "classifier") is None
    assert cache.get(RouteInput("Prove it.", threshold=0.7), "knn") is None
    assert cache.get(item, "knn") is not None


def test_bounded_least_recently_used_first_out():
    cache = DecisionCache(3, 60)
    items = [RouteInput(f"text {i}") for i in range(4)]
    for item in items[:3]:
        cache.put(item, "knn", decision(), generation=0)
    assert cache.get(items[0], "knn") is not None  # now the most recently used
    cache.put(items[3], "knn", decision(), generation=0)
    assert cache.stats().entries == 3
    assert cache.get(items[1], "knn") is None  # the least recently used went
    assert all(cache.get(items[i], "knn") is not None for i in (0, 2, 3))


def test_entries_expire_after_ttl():
    clock = Clock()
    cache = DecisionCache(8, 30, clock=clock)
    item = RouteInput("Translate this.")
    cache.put(item, "knn", decision(), generation=0)
    clock.now = 29.0
    assert cache.get(item, "knn") is not None
    clock.now = 31.0
    assert cache.get(item, "knn") is None
    assert cache.stats().entries == 0


def test_clear_invalidates_and_voids_decisions_made_before_it():
    cache = DecisionCache(8, 60)
    item, other = RouteInput("a"), RouteInput("b")
    before = cache.generation
    cache.put(item, "knn", decision(), generation=before)
    cache.clear()  # the exemplars changed
    assert cache.get(item, "knn") is None
    cache.put(other, "knn", decision(), generation=before)  # a batch decided on the old exemplars finishes late
    assert cache.get(other, "knn") is None
    cache.put(other, "knn", decision(), generation=cache.generation)
    assert cache.get(other, "knn") is not None
    assert cache.stats().invalidations == 1


def test_fallbacks_are_not_cached_and_size_zero_disables():
    cache = DecisionCache(8, 60)
    item = RouteInput("a")
    cache.put(item, "knn", decision(fallback=True), generation=0)
    assert cache.get(item, "knn") is None
    off = DecisionCache(0, 60)
    off.put(item, "knn", decision(), generation=0)
    assert off.get(item, "knn") is None and off.stats().misses == 0


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError, match="max_entries"):
        DecisionCache(-1, 60)
    with pytest.raises(ValueError, match="ttl_s"):
        DecisionCache(8, 0)
