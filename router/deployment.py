"""`RouterDeployment`: the router as a Ray Serve deployment (`serve.deployment(...)` is applied in build_app).

Concurrent `route()` calls are gathered by an `AdaptiveBatcher` so one embedding pass and one kNN query serve a
whole batch; the batch runs in a worker thread so the replica's event loop keeps accepting requests. (Not
`@serve.batch`: see router/batching.py for why.) The class needs no Ray to run, so tests and the benchmark use it
in-process too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from router.batching import AdaptiveBatcher
from router.config import RouterConfig
from router.core import FallbackCause, Router
from router.decision_cache import CacheStats
from router.embed import Embedder
from router.errors import StoreError
from router.exemplars import load_default_exemplars
from router.learn import Feedback, Learner, LearnResult, RequestOutcome
from router.learn.shadow import ShadowRunner
from router.overflow import PREVIOUS, OverflowIndex
from router.types import (
    Exemplar,
    QueueReport,
    RouteDecision,
    RouteInput,
    StoredExemplar,
)
from router.versions import StoreVersion

if TYPE_CHECKING:
    from router.embed.static import StaticEmbedder

logger = logging.getLogger(__name__)


CHARS_PER_TOKEN = 8
"""Characters past which a text certainly fills the embedder's max_length (English runs ~4 per token)."""
PER_TEXT_CHARS = 16
"""A decision's own work besides its text (tokenizing, the kNN query, scoring), in characters' worth."""


def decision_work(item: RouteInput, *, max_chars: int) -> float:
    """What deciding `item` costs relative to others: its text's length, up to where the embedder truncates.

    Measured at c=32 on 64-random-token prompts (junk text that tokenizes long): counting requests instead, with
    the cost fitted on shorter texts, the decision p99 was over 1 s (2.3 s bucket-interpolated); counting
    characters, 0.95 s bucket-interpolated (0.54 s at most per request measured from the headers), the rest of
    the tail being this 2-core machine's CPU contention."""
    return min(len(item.text), max_chars) + PER_TEXT_CHARS


@dataclass(frozen=True)
class RouterStats:
    """One router replica's counters since it started."""

    cache: CacheStats
    """The decision cache: hits, misses (`hit_rate`), entries, invalidations."""
    fallbacks: dict[str, int]
    """Heuristic fallbacks by cause (`busy`: too busy to decide in time)."""


class RouterDeployment:
    """One router replica. With embedded Qdrant (no `router.store.url`) run exactly one replica."""

    def __init__(
        self,
        router_config: RouterConfig,
        tier_names: list[str],
        data_dir: str,
        *,
        embedder: Embedder | None = None,
        on_fallback: Callable[[FallbackCause], None] | None = None,
        retention_s: float | None = None,
        overflow: Callable[[], StaticEmbedder] | None = None,
    ) -> None:
        """`retention_s`: the query log's retention (`query_log.retention_s`): learned exemplars expire after it.
        `overflow`: the static embedder of `router.overflow` (see `Router.build`)."""
        self._router = Router.build(
            router_config, tier_names, Path(data_dir), embedder=embedder, on_fallback=on_fallback,
            overflow=overflow,
        )
        self._cfg = router_config
        self._learner = Learner(router_config.learn, tier_names, retention_s=retention_s)
        self._shadow = (ShadowRunner(router_config.shadow, self._router, data_dir)
                        if router_config.shadow.enabled else None)
        self._maintenance: asyncio.Task | None = None
        self._batcher = AdaptiveBatcher(
            self._decide,
            max_size=router_config.batch_max_size,
            wait_s=router_config.batch_wait_timeout_s,
            # After an overload, requests whose ingress already routed them by the heuristic are not embedded:
            # measured, without this the backlog kept the router busy into the next load (a 2.1 s p99 at c=1).
            expired=lambda item: item.deadline is not None and time.time() > item.deadline,
            work=partial(decision_work, max_chars=CHARS_PER_TOKEN * router_config.embedder.max_length),
        )
        self._max_queue_wait_s = router_config.max_queue_wait_s
        self._admin_lock = asyncio.Lock()
        self._prime()

    def _prime(self) -> None:
        """Embed shipped exemplar texts before serving: one run to warm up, then a batch of 1 and one of 8, timed
        into the busy estimate, so it knows what a batch costs before the first burst (without, it let the
        whole first burst queue). Only the embedding is timed, the larger part of a decision; the served
        batches' own timings take over as they come."""
        texts = [ex.text for ex in load_default_exemplars()[:8]]
        embed = self._router.embedder.embed
        try:
            embed(texts[:1])
            timings = []
            for n in (1, len(texts)):
                started = time.monotonic()
                embed(texts[:n])
                timings.append(([RouteInput(t) for t in texts[:n]], time.monotonic() - started))
        except Exception:  # requests will show the embedder's failure (heuristic fallback, logged) themselves
            logger.warning("could not time the embedder before serving; the busy estimate starts unknown",
                           exc_info=True)
            return
        self._batcher.prime(timings)

    def _decide(self, items: list[RouteInput]) -> list[RouteDecision]:
        """One batch (in the batcher's worker thread): the live decisions, with the shadow's beside them."""
        decisions = self._router.route_inputs(items)
        return decisions if self._shadow is None else self._shadow.attach(items, decisions)

    async def route(self, request: RouteInput) -> RouteDecision:
        """The decision for one request; `overhead_ms` covers the wait for its batch and the batch itself.
        One the router would likely take over `max_queue_wait_s` to decide gets the heuristic's at once.
        A request that asks for the shadow's decision (`request.shadow`) gets it with the live one, cache hits
        included; a candidate that searches (`version`, `classifier`) skips it while the router has a queue
        (`router.shadow.max_queue_wait_s`), so a shadow never slows a busy router down."""
        self._start_maintenance()
        start = time.perf_counter()
        if request.shadow and self._shadow is None:
            request = replace(request, shadow=False)
        if (cached := self._router.cached(request)) is not None:  # no queue, no embedding
            if request.shadow:  # the candidate decides repeats too, so the comparison covers them
                cached = await self._shadow_of(request, cached)
            else:
                # Still a suspension point: callers looping on cached texts in this process (the router in the
                # ingress) must not starve the loop, whose maintenance task writes what was learned.
                await asyncio.sleep(0)
            return replace(cached, overhead_ms=(time.perf_counter() - start) * 1000)
        expected_s = self._batcher.expected_wait_s(request)
        if request.shadow and not self._shadow.instant and expected_s > self._cfg.shadow.max_queue_wait_s:
            request = replace(request, shadow=False)  # a candidate that searches waits for a quieter moment
        limit = self._max_queue_wait_s
        if limit is not None and expected_s > limit:
            decision = self._router.busy(request, expected_s)
        else:
            decision = await self._batcher.submit(request)
        queue = QueueReport(self._batcher.expected_wait_s(request), self._batcher.item_s(request))
        return replace(decision, overhead_ms=(time.perf_counter() - start) * 1000, queue=queue)

    async def _shadow_of(self, request: RouteInput, cached: RouteDecision) -> RouteDecision:
        """A cached decision with the candidate's beside it (in a worker thread when the candidate searches)."""
        if self._shadow.instant:
            await asyncio.sleep(0)
            return self._shadow.attach([request], [cached])[0]
        return (await asyncio.to_thread(self._shadow.attach, [request], [cached]))[0]

    async def overflow_index(self, have: str | None = None, embedder: str | None = None
                             ) -> tuple[str | None, OverflowIndex | None]:
        """The static overflow's index for the ingress: (its key, the index; None when the caller holds it, named
        by `have`; without its embedder when the caller holds that one, named by `embedder`, as the exemplars
        change more often than the embedder's 30 MB). The key ends in `PREVIOUS` while the index is of the
        exemplars before their last change (`OverflowIndex.previous`). (None, None): none ready, or no store."""
        index = self._router.overflow_index()
        if index is None:
            return None, None
        key = index.key + PREVIOUS if index.previous else index.key
        if index.key == have:
            return key, None
        return key, replace(index, embedder=None) if index.embedder.name == embedder else index

    async def add_exemplars(self, exemplars: Sequence[Exemplar]) -> int:
        """Embed and store exemplars at runtime (the admin endpoint); returns how many were written."""
        async with self._admin_lock:
            return await asyncio.to_thread(self._router.add_exemplars, list(exemplars))

    async def count(self) -> int:
        """Exemplars in the store; 0 while the store is unavailable."""
        store = self._router.store
        return 0 if store is None else await asyncio.to_thread(store.count)

    async def fallbacks(self) -> dict[str, int]:
        """Heuristic fallbacks so far, by cause."""
        return dict(self._router.fallbacks)

    async def stats(self) -> RouterStats:
        """The decision cache's hits and misses and the fallbacks by cause, since this replica started (a bench
        reads them before and after a run; `handle.stats.remote()` on the `router` deployment)."""
        return RouterStats(cache=self._router.decisions.stats(), fallbacks=dict(self._router.fallbacks))

    def check_health(self) -> None:
        """Healthy while it can route; a missing store only degrades routing to the heuristic, so it passes."""
        if self._router.store is None:
            logger.warning("router is healthy but degraded: exemplar store unavailable, heuristic routing")

    async def release_store(self, seconds: float) -> None:
        """Close the exemplar store for `seconds` (heuristic routing meanwhile); it reopens by itself."""
        async with self._admin_lock:
            await asyncio.to_thread(self._router.release_store, seconds)

    # -- learning, versions -----------------------------------------------------------------------------

    async def observe(self, outcome: RequestOutcome) -> LearnResult:
        """Learn from one answered request (the ingress calls it after answering; never on the request's path).
        Exemplars learned are written at the next flush (`router.learn.flush_interval_s`)."""
        self._start_maintenance()
        return self._learner.observe(outcome)

    async def feedback(self, feedback: Feedback) -> LearnResult:
        """A client's score of an answer (`POST /v1/feedback`); refuses an unknown or foreign response id."""
        self._start_maintenance()
        return self._learner.feedback(feedback)

    async def flush_learned(self) -> int:
        """Embed and store what was learned since the last flush; returns how many exemplars were written."""
        exemplars = self._learner.drain()
        if not exemplars:
            return 0
        async with self._admin_lock:
            written = await asyncio.to_thread(write_learned, self._router, exemplars,
                                              self._cfg.learn.version_every_s)
            self._router.decisions.clear()
            return written

    async def versions(self) -> list[StoreVersion]:
        """The exemplar store's versions, oldest first (`tierserve exemplars versions`)."""
        store = self._router.store
        return [] if store is None else await asyncio.to_thread(store.versions)

    async def active_version(self) -> int:
        """The version decisions are made from (0: no store, or an empty one)."""
        store = self._router.store
        return 0 if store is None else store.active

    async def exemplars(self, *, source: str | None = None, limit: int = 100) -> list[StoredExemplar]:
        """Up to `limit` exemplars of the active version, with their provenance (`GET /admin/exemplars`)."""
        store = self._router.store
        if store is None:
            raise StoreError("the exemplar store is unavailable; see the router's log for the cause.")
        return await asyncio.to_thread(store.list, limit=limit, source=source)

    async def rollback(self, version: int) -> StoreVersion:
        """Serve what `version` held, as a new version (no restart; decisions in flight finish on the old copy)."""
        async with self._admin_lock:
            store = self._router.store
            if store is None:
                raise StoreError("the exemplar store is unavailable; see the router's log for the cause.")
            record = await asyncio.to_thread(store.rollback, version)
            self._router.decisions.clear()  # decisions made on the other exemplars must not be served again
            return record

    async def expire_exemplars(self) -> int:
        """Drop the exemplars whose retention ran out (learned prompts live as long as the query log's); what was
        decided on them goes too: the decision cache empties and the static overflow indexes again (both follow
        the cache's generation). Returns how many went."""
        store = self._router.store
        if store is None:
            return 0
        gone = await asyncio.to_thread(store.expire)
        if gone:
            self._router.decisions.clear()
        return gone

    def _start_maintenance(self) -> None:
        if self._maintenance is None or self._maintenance.done():
            self._maintenance = asyncio.get_running_loop().create_task(self._maintain())

    async def _maintain(self) -> None:
        """Follow the store's active version, flush learned exemplars, drop expired ones: each on its period."""
        store_cfg, learn = self._cfg.store, self._cfg.learn
        tick = min(store_cfg.refresh_s, learn.flush_interval_s)
        due = {"refresh": 0.0, "flush": 0.0, "expire": 0.0}
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            try:
                if now >= due["refresh"]:
                    due["refresh"] = now + store_cfg.refresh_s
                    await asyncio.to_thread(self._router.refresh_store)
                if now >= due["flush"]:
                    due["flush"] = now + learn.flush_interval_s
                    await self.flush_learned()
                self._router.overflow_index()  # rebuilt in the background once the exemplars changed
                if now >= due["expire"]:
                    due["expire"] = now + EXPIRE_EVERY_S
                    await self.expire_exemplars()
            except Exception:  # the next tick tries again; routing never depends on this loop
                logger.exception("router maintenance failed")

    def close(self) -> None:
        """Stop batching and maintenance, and release the store's folder lock."""
        if self._maintenance is not None:
            self._maintenance.cancel()
        self._batcher.close()
        self._router.close()


EXPIRE_EVERY_S = 600.0
"""How often expired learned exemplars are deleted (retention is counted in days)."""


def write_learned(router: Router, exemplars: Sequence[Exemplar], version_every_s: float) -> int:
    """Write learned exemplars into the open `learn` version while it is younger than `version_every_s` and
    served, else into a new one: learning adds at most one version per period (the rollback grain)."""
    store = router.store
    if store is None:
        raise StoreError("the exemplar store is unavailable; learned exemplars wait for the next flush.")
    record = store.record(store.active)
    if record is not None and record.kind == "learn" and time.time() - record.created_at < version_every_s:
        return router.add_exemplars(exemplars, version=store.active)
    return router.add_exemplars(exemplars)
