"""A small LRU of the router's recent decisions, keyed by a hash of the routed text: the same prompt is embedded once.

Identical prompts arrive together (retries, a client fanning one prompt out, templated traffic): their decision
depends only on the text, the router kind, the request's threshold and the exemplars, so a hit answers at once,
without queueing behind the batch being embedded. Bounded by `max_entries` (least recently used out first) and
by age (`ttl_s`: a Qdrant server may be changed by another replica, which this one cannot see). Cleared whenever
this router's exemplar store changes (`clear`); a batch decided on the store as it was before a change is not
cached (`generation`).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace

from router.types import RouteDecision, RouteInput

Key = tuple[str, float | None, bytes]


@dataclass(frozen=True)
class CacheStats:
    """What the cache did since the router started (`hits / (hits + misses)` is the hit rate)."""

    hits: int
    misses: int
    entries: int
    max_entries: int
    invalidations: int
    """Times the cache was emptied because the exemplars changed."""

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0


class DecisionCache:
    """Thread-safe LRU: lookups run on the replica's event loop, stores in the batch's worker thread."""

    def __init__(self, max_entries: int, ttl_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 0:
            raise ValueError(f"max_entries ({max_entries}) must be >= 0 (0 disables the cache).")
        if ttl_s <= 0:
            raise ValueError(f"ttl_s ({ttl_s}) must be > 0.")
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[Key, tuple[float, RouteDecision]] = OrderedDict()
        self._lock = threading.Lock()
        self._generation = 0
        self._hits = self._misses = self._invalidations = 0

    @property
    def generation(self) -> int:
        """Changes on every `clear`; pass the value read before deciding to `put`."""
        return self._generation

    def get(self, item: RouteInput, kind: str) -> RouteDecision | None:
        """The cached decision for `item` routed by `kind` (marked `cached`, no time spent), or None."""
        if self.max_entries == 0:
            return None
        key = _key(item, kind)
        with self._lock:
            found = self._entries.get(key)
            if found is not None and self._clock() - found[0] > self.ttl_s:
                del self._entries[key]
                found = None
            if found is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
        return replace(found[1], cached=True, overhead_ms=0.0, embed_ms=0.0, batch_size=1)

    def put(self, item: RouteInput, kind: str, decision: RouteDecision, *, generation: int) -> None:
        """Remember a decision made on the exemplars of `generation` (ignored if they changed since)."""
        if self.max_entries == 0 or decision.fallback or decision.overflow:  # passing: decide again next time
            return
        key = _key(item, kind)
        with self._lock:
            if generation != self._generation:
                return
            self._entries[key] = (self._clock(), decision)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forget every decision: the exemplars they were made on changed."""
        with self._lock:
            self._entries.clear()
            self._generation += 1
            self._invalidations += 1

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._misses, len(self._entries), self.max_entries, self._invalidations)


def _key(item: RouteInput, kind: str) -> Key:
    # The exact text: two texts that differ only in case or spacing may embed differently.
    return kind, item.threshold, hashlib.blake2b(item.text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
