"""`Router`: embedder + exemplar store + scoring + heuristic -> one `RouteDecision` per text.

Routing never raises: when the embedder or the store fails (or the store is empty), the heuristic decides and the
decision says `fallback=True`; every fallback is counted (`fallbacks`, `on_fallback`), and every failure is logged.
What the router is too busy to decide in time (`busy`) is decided by the static overflow (`router.overflow`), or
by the heuristic where it has none (counted as a fallback, not logged: the decision's reason says so, at the rate
of the overload).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from router.classifier import DifficultyClassifier
from router.config import RouterConfig
from router.decision_cache import DecisionCache
from router.embed import Embedder, RecheckEmbedder, build_embedder, near_boundary
from router.errors import InvalidRequest, StoreError
from router.exemplars import load_default_exemplars
from router.overflow import OverflowBuilder, OverflowIndex
from router.scoring import (
    ClassifierRouter,
    Decider,
    KnnRouter,
    Scores,
    StoreIndex,
    label_difficulty,
)
from router.store import ExemplarStore
from router.types import BUSY_CAUSE, Exemplar, RouteDecision, RouteInput, normalize_text
from router.versions import version_kind

if TYPE_CHECKING:
    from router.embed.static import StaticEmbedder

logger = logging.getLogger(__name__)

FallbackCause = Literal["embedder", "store", "store_unavailable", "no_exemplars", "classifier", "busy"]
"""Why kNN could not decide: the embedder raised, the store query raised, no store is open, it is empty, the
classifier failed, or the router was too busy to decide in time (`RouterConfig.max_queue_wait_s`)."""


class Router:
    """Decides the tier for batches of texts. Call `route_inputs` from one thread at a time; `add_exemplars` and
    `release_store` may run alongside it (the store, its opening and the tokenizer take their own locks)."""

    def __init__(
        self,
        cfg: RouterConfig,
        tier_names: Sequence[str],
        *,
        embedder: Embedder,
        store: ExemplarStore | None = None,
        open_store: Callable[[], ExemplarStore] | None = None,
        on_fallback: Callable[[FallbackCause], None] | None = None,
        store_retry_s: float = 10.0,
    ) -> None:
        """`store=None` starts without exemplars; `open_store`, if given, is retried every `store_retry_s` to get one
        (a store it opens is seeded with the default exemplars when empty)."""
        self.cfg = cfg
        self.decider = Decider(cfg, tier_names)
        self.tier_names = self.decider.tier_names
        self.embedder = embedder
        self.fallbacks: Counter[FallbackCause] = Counter()
        """Fallbacks to the heuristic so far, by cause."""
        self._store = store
        self._open_store = open_store
        self._next_store_attempt = 0.0
        self._store_retry_s = store_retry_s
        self._opening = threading.Lock()  # held to open or release the store: a release waits for an open
        self._on_fallback = on_fallback
        self._label_cache: dict[str, float] = {}
        self._recent: OrderedDict[str, np.ndarray] = OrderedDict()
        """Vectors of the latest routed texts, kept only for a shadow router that reads them (`embed_recent`)."""
        self._keep_recent_vectors = cfg.shadow.needs_vectors
        self.classifier: DifficultyClassifier | None = None
        """The trained classifier for `router: classifier` (loaded by `build` from `classifier_path`)."""
        self.decisions = DecisionCache(cfg.decision_cache_size, cfg.decision_cache_ttl_s)
        """Recent kNN and classifier decisions by text; emptied whenever the exemplar store changes."""
        self.overflow: OverflowBuilder | None = None
        """The static overflow (`router.overflow`), which decides what the router is too busy for."""

    @classmethod
    def build(
        cls,
        cfg: RouterConfig,
        tier_names: Sequence[str],
        data_dir: str | Path,
        *,
        embedder: Embedder | None = None,
        on_fallback: Callable[[FallbackCause], None] | None = None,
        store_retry_s: float = 10.0,
        overflow: Callable[[], StaticEmbedder] | None = None,
    ) -> Router:
        """Load the embedder, open the store (seeding the default exemplars into an empty one).

        A bad embedder config raises; a store that cannot be opened is logged and retried while the heuristic
        routes, so a Qdrant outage at start does not take routing down. The static overflow
        (`router.overflow`) starts building in the background with the static embedder `overflow` makes, or,
        when no `embedder` is given and the config resolves to `static`, the one distilled from its model.
        """
        if embedder is None and overflow is None and cfg.resolved_overflow == "static" and (
                cfg.max_queue_wait_s or cfg.resolved_static_first):
            overflow = partial(build_embedder, cfg.embedder.model_copy(update={"backend": "static"}),
                               Path(data_dir).expanduser())
        embedder = embedder or build_embedder(cfg.embedder, Path(data_dir).expanduser())
        router = cls(
            cfg,
            tier_names,
            embedder=embedder,
            store=None,
            open_store=lambda: ExemplarStore.open(cfg.store, dim=embedder.dim, data_dir=data_dir,
                                                  search=embedder.neighbor_search(),
                                                  vector_space=cfg.embedder.vector_space),
            on_fallback=on_fallback,
            store_retry_s=store_retry_s,
        )
        if cfg.classifier_path:
            path = Path(cfg.classifier_path).expanduser()
            path = path if path.is_absolute() else Path(data_dir).expanduser() / path
            # A classifier trained on another embedder's vectors is refused here, at start, not per request.
            router.classifier = DifficultyClassifier.load(path, embedder_name=embedder.name, dim=embedder.dim)
        router._current_store()
        if overflow is not None:
            router.overflow = OverflowBuilder(overflow, cfg.knn, router._label,
                                              exact=embedder if cfg.resolved_static_first else None)
            router.overflow_index()  # starts the first build
        return router

    @property
    def store(self) -> ExemplarStore | None:
        return self._store

    # -- routing --------------------------------------------------------------------------------------------

    def cached(self, item: RouteInput) -> RouteDecision | None:
        """The decision made moments ago for the same text, router and threshold, if still cached."""
        kind = item.router or self.cfg.default_router
        return self.decisions.get(item, kind) if kind in CACHED_KINDS else None

    def busy(self, item: RouteInput, expected_wait_s: float) -> RouteDecision:
        """The decision for a request the router would take `expected_wait_s` to decide: the static overflow's,
        or the heuristic's while it has none."""
        note = f"~{expected_wait_s:.2f} s of decisions were queued"
        index = self.overflow_index() if (item.router or self.cfg.default_router) == "knn" else None
        if index is not None and (decision := index.decide(item, self.decider, note)) is not None:
            return decision
        self._count_fallback("busy")
        decision = self.decider.fallback(item, BUSY_CAUSE)  # the reason's first part is a metric label
        return replace(decision, reason=f"{decision.reason}; {note}")

    def overflow_index(self) -> OverflowIndex | None:
        """The static overflow's index of the exemplars served now (None: none configured, or not ready)."""
        return None if self.overflow is None else self.overflow.current(self._store, self.decisions.generation)

    def route_inputs(self, inputs: Sequence[RouteInput]) -> list[RouteDecision]:
        """Decide a tier for each input: one scoring pass per router kind (one embedding pass and one kNN
        query for all kNN-routed inputs), then one comparison per boundary."""
        start = time.perf_counter()
        generation = self.decisions.generation  # read before the store is: a change meanwhile voids the batch's
        rows_by_kind: dict[str, list[int]] = {}
        for i, item in enumerate(inputs):
            rows_by_kind.setdefault(item.router or self.cfg.default_router, []).append(i)
        decisions: list[RouteDecision | None] = [None] * len(inputs)
        embed_ms = 0.0
        for kind, rows in rows_by_kind.items():
            items = [inputs[i] for i in rows]
            scores, cause, kind_embed_ms = self._score(kind, items)
            embed_ms += kind_embed_ms
            for row, (i, item) in enumerate(zip(rows, items, strict=True)):
                if cause is not None or np.isnan(scores.values[row]):
                    self._count_fallback(cause or "no_exemplars")
                    decisions[i] = self.decider.fallback(item, cause or "no_exemplars")
                    continue
                neighbors = scores.neighbors[row] if scores.neighbors else ()
                decisions[i] = self.decider.decide(item, kind, float(scores.values[row]), scores.reasons[row],
                                                   neighbors=neighbors)
                if kind in CACHED_KINDS:
                    self.decisions.put(item, kind, decisions[i], generation=generation)
        elapsed_ms = (time.perf_counter() - start) * 1000
        return [_timed(d, elapsed_ms, embed_ms, len(inputs)) for d in decisions if d is not None]

    def _score(self, kind: str, items: Sequence[RouteInput]) -> tuple[Scores, FallbackCause | None, float]:
        """Scores of one router kind for `items`, or the cause that kept it from scoring; and embedding ms."""
        texts = [item.text for item in items]
        if kind == "cheapest":
            return self.decider.cheapest.score(texts), None, 0.0
        if kind == "heuristic":
            return self.decider.heuristic.score(texts), None, 0.0
        if kind == "classifier":
            try:
                if self.classifier is None:
                    raise LookupError("router.classifier_path is not set")
                return ClassifierRouter(self.embedder.embed, self.classifier).score(texts), None, 0.0
            except Exception as exc:
                logger.warning("classifier routing failed (%s); heuristic fallback", exc)
                return _NO_SCORES, "classifier", 0.0
        return self._knn(texts, [self.decider.thresholds_for(item) for item in items])

    def embed_recent(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors of `texts`: those the live router embedded lately are reused (a shadow router decides on
        the same vectors without embedding again), the others embedded now."""
        found = [self._recent.get(normalize_text(t)) for t in texts]  # .get: the routing thread writes meanwhile
        missing = [i for i, vector in enumerate(found) if vector is None]
        if missing:
            for i, vector in zip(missing, self.embedder.embed([texts[i] for i in missing])):
                found[i] = vector
        return np.asarray(found, dtype=np.float32)

    def refresh_store(self) -> int | None:
        """Serve the version another writer made active meanwhile; returns it (None: unchanged or no store)."""
        store = self._current_store()
        if store is None:
            return None
        try:
            switched = store.refresh()
        except Exception:
            logger.exception("could not check the exemplar store's active version; serving the one held")
            return None
        if switched is not None:
            self.decisions.clear()  # decided on the exemplars another version held
        return switched

    def _keep_recent(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        for text, vector in zip(texts, vectors):
            self._recent[normalize_text(text)] = vector
        while len(self._recent) > _RECENT_VECTORS:
            self._recent.popitem(last=False)

    def release_store(self, seconds: float) -> None:
        """Close the exemplar store and keep it closed for `seconds` (the heuristic routes meanwhile).

        Embedded Qdrant allows one process per folder: this lets `tierserve exemplars import` write to it
        while the stack serves. The store reopens by itself afterwards.
        """
        with self._opening:  # a batch running meanwhile must not reopen it
            self._next_store_attempt = time.monotonic() + seconds
            if self._store is not None:
                self._store.close()
                self._store = None
        self.decisions.clear()  # the CLI is about to change the exemplars

    # -- exemplars ------------------------------------------------------------------------------------------

    def add_exemplars(
        self,
        exemplars: Sequence[Exemplar],
        *,
        store: ExemplarStore | None = None,
        chunk_size: int = 256,
        progress: Callable[[int], None] | None = None,
        version: int | None = None,
    ) -> int:
        """Embed and upsert exemplars (idempotent) as one store version: into `version` if given, else a new
        one committed once every chunk is written (so no request is routed on half an import). Labels must be
        tier names or seed labels.

        Unlike routing this raises: it is an admin action and the caller must know it failed.
        """
        for ex in exemplars:
            try:
                self._difficulty(ex.tier)  # reject unknown labels before writing anything
            except ValueError as exc:
                raise InvalidRequest(str(exc), param="tier") from None
        store = store or self._current_store()
        if store is None:
            raise StoreError("the exemplar store is unavailable; see the router's log for the cause.")
        if not exemplars:
            return 0
        target = version if version is not None else store.begin(version_kind(ex.provenance for ex in exemplars))
        written = 0
        for start in range(0, len(exemplars), chunk_size):
            chunk = exemplars[start : start + chunk_size]
            written += store.upsert(chunk, self.embedder.embed([ex.text for ex in chunk]), version=target)
            self.decisions.clear()
            if progress is not None:
                progress(len(chunk))
        if version is None:
            store.commit(target)
        return written

    def seed_defaults(self, store: ExemplarStore) -> int:
        """Load the shipped exemplars into an empty store (when `seed_default_exemplars`); returns how many."""
        if not self.cfg.seed_default_exemplars or store.count() > 0:
            return 0
        exemplars = load_default_exemplars()
        written = self.add_exemplars(exemplars, store=store)
        logger.info("seeded %d default exemplars into %s", written, store.location)
        return written

    def close(self) -> None:
        """Release the store (embedded Qdrant holds a folder lock until then)."""
        if self._store is not None:
            self._store.close()
            self._store = None
        self._open_store = None

    # -- internals ------------------------------------------------------------------------------------------

    def _knn(
        self, texts: list[str], thresholds: Sequence[tuple[float, ...]]
    ) -> tuple[Scores, FallbackCause | None, float]:
        """kNN scores for `texts`. With a `RecheckEmbedder` the fast vectors decide, except for texts whose
        score lands within its margin of one of their `thresholds`: those are embedded and scored again with
        the exact model."""
        store = self._current_store()
        if store is None:
            return _NO_SCORES, "store_unavailable", 0.0
        knn = KnnRouter(self.embedder.embed, StoreIndex(store, self._label), self.cfg.knn)
        recheck = self.embedder if isinstance(self.embedder, RecheckEmbedder) else None
        first, cause, embed_ms = self._knn_pass(knn, store, texts, recheck.embed_fast if recheck else knn.embed)
        if cause is not None or recheck is None:
            return first, cause, embed_ms
        rows = np.flatnonzero(near_boundary(first.values, thresholds, recheck.margin))
        if rows.size == 0:
            return first, None, embed_ms
        again, cause, again_ms = self._knn_pass(knn, store, [texts[i] for i in rows], recheck.embed_recheck)
        if cause is not None:
            return again, cause, embed_ms + again_ms
        values, reasons, neighbors = first.values.copy(), list(first.reasons), list(first.neighbors)
        values[rows] = again.values
        for j, row in enumerate(rows):
            reasons[row], neighbors[row] = again.reasons[j], again.neighbors[j]
        return Scores(values, tuple(reasons), tuple(neighbors)), None, embed_ms + again_ms

    def _knn_pass(
        self, knn: KnnRouter, store: ExemplarStore, texts: list[str], embed: Callable[[list[str]], np.ndarray]
    ) -> tuple[Scores, FallbackCause | None, float]:
        t0 = time.perf_counter()
        try:
            vectors = embed(texts)
        except Exception:
            logger.exception("embedder failed on %d texts; routing them with the heuristic", len(texts))
            return _NO_SCORES, "embedder", 0.0
        embed_ms = (time.perf_counter() - t0) * 1000
        if self._keep_recent_vectors:  # kept only for a shadow candidate that reads them
            self._keep_recent(texts, vectors)
        try:
            return knn.score_vectors(vectors), None, embed_ms
        except Exception:
            logger.exception("exemplar store query failed; routing %d texts with the heuristic", len(texts))
            if store.closed:  # reopen it later; a server client reconnects on its own
                self._store = None
            return _NO_SCORES, "store", embed_ms

    def _current_store(self) -> ExemplarStore | None:
        if self._store is None and self._open_store is not None and time.monotonic() >= self._next_store_attempt:
            with self._opening:
                if self._store is None and time.monotonic() >= self._next_store_attempt:  # not released meanwhile
                    self._next_store_attempt = time.monotonic() + self._store_retry_s
                    try:
                        store = self._open_store()
                        self.seed_defaults(store)
                        self._store = store
                        self.decisions.clear()  # it may hold other exemplars than the store decided on before
                    except Exception:
                        logger.exception("cannot open the exemplar store; the heuristic routes until it opens")
        return self._store

    def _label(self, label: str) -> float:  # an unknown label is ignored (NaN), not an error
        return self._difficulty(label, strict=False)

    def _difficulty(self, label: str, *, strict: bool = True) -> float:
        value = self._label_cache.get(label)
        if value is None:
            try:
                value = label_difficulty(label, self.tier_names)
            except ValueError:
                if strict:
                    raise
                logger.warning("ignoring exemplars labelled %r: not a tier or seed label", label)
                value = float("nan")
            self._label_cache[label] = value
        return value

    def _count_fallback(self, cause: FallbackCause) -> None:
        self.fallbacks[cause] += 1
        if self._on_fallback is not None:
            self._on_fallback(cause)


_NO_SCORES = Scores(np.empty(0), ())
_RECENT_VECTORS = 4096
CACHED_KINDS = frozenset({"knn", "classifier"})
"""Routers whose decisions the cache keeps: the ones that embed (the others cost less than a lookup)."""


def _timed(decision: RouteDecision, overhead_ms: float, embed_ms: float, batch_size: int) -> RouteDecision:
    return replace(decision, overhead_ms=overhead_ms, embed_ms=embed_ms if decision.router == "knn" else 0.0,
                   batch_size=batch_size)
