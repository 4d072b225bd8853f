"""`Router`: embedder + exemplar store + scoring + heuristic -> one `RouteDecision` per text.

Routing never raises: when the embedder or the store fails (or the store is empty), the heuristic decides and
the decision says `fallback=True`; every fallback is logged and counted (`fallbacks`, `on_fallback`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

from router.classifier import DifficultyClassifier
from router.config import RouterConfig
from router.embedder import Embedder, RecheckEmbedder, build_embedder, near_boundary
from router.exemplars import load_default_exemplars
from router.heuristic import HeuristicScorer
from router.scoring import difficulty_from_neighbors, label_difficulty, tier_for_score, with_threshold
from router.store import ExemplarStore, StoreError
from router.types import Exemplar, Neighbor, RouteDecision, RouteInput, RouterKind
from serving.errors import InvalidRequest

logger = logging.getLogger(__name__)

FallbackCause = Literal["embedder", "store", "store_unavailable", "no_exemplars", "classifier"]
"""Why kNN could not decide: the embedder raised, the store query raised, no store is open, or it is empty."""


class Router:
    """Decides the tier for batches of texts.

    Call `route_inputs` from one thread at a time; `add_exemplars` may run alongside it (the store and the
    tokenizer take their own locks).
    """

    def __init__(
        self,
        cfg: RouterConfig,
        tier_names: Sequence[str],
        *,
        embedder: Embedder,
        store: ExemplarStore | None,
        open_store: Callable[[], ExemplarStore] | None = None,
        on_fallback: Callable[[FallbackCause], None] | None = None,
        store_retry_s: float = 10.0,
    ) -> None:
        """`store=None` starts without exemplars; `open_store`, if given, is retried every `store_retry_s` to get
        one, and a store it opens is seeded with the default exemplars when empty."""
        self.cfg = cfg
        self.tier_names = list(tier_names)
        self.thresholds = cfg.thresholds_for(len(self.tier_names))
        self.embedder = embedder
        self.fallbacks: Counter[FallbackCause] = Counter()
        """Fallbacks to the heuristic so far, by cause."""
        self._store = store
        self._open_store = open_store
        self._next_store_attempt = 0.0
        self._store_retry_s = store_retry_s
        self._on_fallback = on_fallback
        self._heuristic = HeuristicScorer(cfg.heuristic)
        self._label_cache: dict[str, float] = {}
        self.classifier: DifficultyClassifier | None = None
        """The trained classifier for `router: classifier` (loaded by `build` from `classifier_path`)."""

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
    ) -> Router:
        """Load the embedder, open the store (seeding the default exemplars into an empty one).

        A bad embedder config raises; a store that cannot be opened is logged and retried while the heuristic
        routes, so a Qdrant outage at start does not take routing down.
        """
        embedder = embedder or build_embedder(cfg.embedder, Path(data_dir).expanduser())
        router = cls(
            cfg,
            tier_names,
            embedder=embedder,
            store=None,
            open_store=lambda: ExemplarStore.open(cfg.store, dim=embedder.dim, data_dir=data_dir),
            on_fallback=on_fallback,
            store_retry_s=store_retry_s,
        )
        if cfg.classifier_path:
            path = Path(cfg.classifier_path).expanduser()
            path = path if path.is_absolute() else Path(data_dir).expanduser() / path
            # A classifier trained on another embedder's vectors is refused here, at start, not per request.
            router.classifier = DifficultyClassifier.load(path, embedder_name=embedder.name, dim=embedder.dim)
        router._current_store()
        return router

    @property
    def store(self) -> ExemplarStore | None:
        return self._store

    # -- routing --------------------------------------------------------------------------------------------

    def route(
        self, texts: Sequence[str], *, threshold: float | None = None, router: RouterKind | None = None
    ) -> list[RouteDecision]:
        """Decide a tier for each text with the same knobs (see `route_inputs` for per-text knobs)."""
        return self.route_inputs([RouteInput(text=t, threshold=threshold, router=router) for t in texts])

    def route_inputs(self, inputs: Sequence[RouteInput]) -> list[RouteDecision]:
        """Decide a tier for each input; one embedding pass and one kNN query for all kNN-routed inputs."""
        start = time.perf_counter()
        decisions: list[RouteDecision | None] = [None] * len(inputs)
        knn_rows: list[int] = []
        classifier_rows: list[int] = []
        for i, item in enumerate(inputs):
            kind = item.router or self.cfg.default_router
            if kind == "cheapest":
                decisions[i] = RouteDecision(
                    tier=self.tier_names[0],
                    tier_index=0,
                    router="cheapest",
                    score=0.0,
                    thresholds=self._thresholds(item),
                    reason="cheapest router: always the first tier",
                )
            elif kind == "heuristic":
                decisions[i] = self._heuristic_decision(item, fallback=False)
            elif kind == "classifier":
                classifier_rows.append(i)
            else:
                knn_rows.append(i)

        for i, decision in zip(classifier_rows, self._classified([inputs[i] for i in classifier_rows]), strict=True):
            decisions[i] = decision

        embed_ms = 0.0
        if knn_rows:
            texts = [inputs[i].text for i in knn_rows]
            outcome = self._knn(texts, [self._thresholds(inputs[i]) for i in knn_rows])
            embed_ms = outcome.embed_ms
            for row, i in enumerate(knn_rows):
                item = inputs[i]
                if outcome.cause is not None or np.isnan(outcome.scores[row]):
                    cause = outcome.cause or "no_exemplars"
                    self._count_fallback(cause)
                    decisions[i] = self._heuristic_decision(item, fallback=True, cause=cause)
                    continue
                score = float(outcome.scores[row])
                thresholds = self._thresholds(item)
                index = tier_for_score(score, thresholds)
                neighbors = tuple(outcome.neighbors[row])
                decisions[i] = RouteDecision(
                    tier=self.tier_names[index],
                    tier_index=index,
                    router="knn",
                    score=score,
                    thresholds=thresholds,
                    reason=_knn_reason(neighbors, self.cfg.knn.weighting),
                    neighbors=neighbors,
                )

        elapsed_ms = (time.perf_counter() - start) * 1000
        return [_timed(d, elapsed_ms, embed_ms, len(inputs)) for d in decisions if d is not None]

    def _classified(self, items: Sequence[RouteInput]) -> list[RouteDecision]:
        """Decisions of the trained classifier (heuristic fallback if it is missing or fails)."""
        if not items:
            return []
        texts = [item.text for item in items]
        try:
            if self.classifier is None:
                raise LookupError("router.classifier_path is not set")
            scores = self.classifier.predict_difficulty(self.embedder.embed(texts), texts=texts)
        except Exception as exc:
            logger.warning("classifier routing failed (%s); heuristic fallback", exc)
            for _ in items:
                self._count_fallback("classifier")
            return [self._heuristic_decision(item, fallback=True, cause="classifier") for item in items]
        decisions = []
        for item, score in zip(items, scores, strict=True):
            thresholds = self._thresholds(item)
            index = tier_for_score(float(score), thresholds)
            decisions.append(
                RouteDecision(
                    tier=self.tier_names[index],
                    tier_index=index,
                    router="classifier",
                    score=float(score),
                    thresholds=thresholds,
                    reason=f"classifier P(strong needed) {float(score):.3f}",
                )
            )
        return decisions

    def release_store(self, seconds: float) -> None:
        """Close the exemplar store and keep it closed for `seconds` (the heuristic routes meanwhile).

        Embedded Qdrant allows one process per folder: this lets `tierserve exemplars import` write to it
        while the stack serves. The store reopens by itself afterwards.
        """
        if self._store is not None:
            self._store.close()
            self._store = None
        self._next_store_attempt = time.monotonic() + seconds

    # -- exemplars ------------------------------------------------------------------------------------------

    def add_exemplars(
        self,
        exemplars: Sequence[Exemplar],
        *,
        store: ExemplarStore | None = None,
        chunk_size: int = 256,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Embed and upsert exemplars (idempotent). Labels must be tier names or seed labels.

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
        written = 0
        for start in range(0, len(exemplars), chunk_size):
            chunk = exemplars[start : start + chunk_size]
            written += store.upsert(chunk, self.embedder.embed([ex.text for ex in chunk]))
            if progress is not None:
                progress(len(chunk))
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

    def _knn(self, texts: list[str], thresholds: Sequence[tuple[float, ...]]) -> _KnnOutcome:
        """Scores and neighbours for `texts`. With a `RecheckEmbedder` the fast vectors decide, except for
        texts whose score lands within its margin of one of their `thresholds`: those are embedded and
        queried again with the exact model."""
        store = self._current_store()
        if store is None:
            return _KnnOutcome.failed("store_unavailable")
        recheck = self.embedder if isinstance(self.embedder, RecheckEmbedder) else None
        first = self._embed_and_query(store, texts, recheck.embed_fast if recheck else self.embedder.embed)
        if first.cause is not None or recheck is None:
            return first
        rows = np.flatnonzero(near_boundary(first.scores, thresholds, recheck.margin))
        if rows.size == 0:
            return first
        again = self._embed_and_query(store, [texts[i] for i in rows], recheck.embed_recheck)
        if again.cause is not None:
            return _KnnOutcome.failed(again.cause, first.embed_ms + again.embed_ms)
        scores, neighbors = first.scores.copy(), list(first.neighbors)
        scores[rows] = again.scores
        for row, found in zip(rows, again.neighbors, strict=True):
            neighbors[row] = found
        return _KnnOutcome(scores=scores, neighbors=neighbors, embed_ms=first.embed_ms + again.embed_ms)

    def _embed_and_query(
        self, store: ExemplarStore, texts: list[str], embed: Callable[[list[str]], np.ndarray]
    ) -> _KnnOutcome:
        t0 = time.perf_counter()
        try:
            vectors = embed(texts)
        except Exception:
            logger.exception("embedder failed on %d texts; routing them with the heuristic", len(texts))
            return _KnnOutcome.failed("embedder")
        embed_ms = (time.perf_counter() - t0) * 1000
        try:
            neighbors = store.query(vectors, self.cfg.knn.k)
        except Exception:
            logger.exception("exemplar store query failed; routing %d texts with the heuristic", len(texts))
            if store.closed:  # reopen it later; a server client reconnects on its own
                self._store = None
            return _KnnOutcome.failed("store", embed_ms)
        k = self.cfg.knn.k
        sims = np.full((len(texts), k), np.nan)
        labels = np.full((len(texts), k), np.nan)
        for row, found in enumerate(neighbors):
            for col, n in enumerate(found[:k]):
                sims[row, col] = n.similarity
                labels[row, col] = self._difficulty(n.tier, strict=False)
        scores = difficulty_from_neighbors(
            sims, labels, weighting=self.cfg.knn.weighting, temperature=self.cfg.knn.temperature
        )
        return _KnnOutcome(scores=scores, neighbors=neighbors, embed_ms=embed_ms)

    def _current_store(self) -> ExemplarStore | None:
        if self._store is None and self._open_store is not None and time.monotonic() >= self._next_store_attempt:
            self._next_store_attempt = time.monotonic() + self._store_retry_s
            try:
                store = self._open_store()
                self.seed_defaults(store)
                self._store = store
            except Exception:
                logger.exception("cannot open the exemplar store; the heuristic routes until it opens")
        return self._store

    def _heuristic_decision(self, item: RouteInput, *, fallback: bool, cause: str | None = None) -> RouteDecision:
        result = self._heuristic.score(item.text)
        thresholds = self._thresholds(item)
        index = tier_for_score(result.score, thresholds)
        reason = f"knn unavailable ({cause}); {result.reason}" if fallback else result.reason
        return RouteDecision(
            tier=self.tier_names[index],
            tier_index=index,
            router="heuristic",
            score=result.score,
            thresholds=thresholds,
            reason=reason,
            fallback=fallback,
        )

    def _thresholds(self, item: RouteInput) -> tuple[float, ...]:
        return self.thresholds if item.threshold is None else with_threshold(self.thresholds, item.threshold)

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


@dataclass(frozen=True)
class _KnnOutcome:
    scores: np.ndarray | None = None
    neighbors: list[list[Neighbor]] = field(default_factory=list)
    embed_ms: float = 0.0
    cause: FallbackCause | None = None
    """Set when kNN failed for the whole batch."""

    @classmethod
    def failed(cls, cause: FallbackCause, embed_ms: float = 0.0) -> _KnnOutcome:
        return cls(cause=cause, embed_ms=embed_ms)


def _knn_reason(neighbors: tuple[Neighbor, ...], weighting: str) -> str:
    votes = Counter(n.tier for n in neighbors)
    top = neighbors[0] if neighbors else None
    nearest = f"; nearest {top.tier} at {top.similarity:.2f}" if top else ""
    tally = ", ".join(f"{tier} {count}" for tier, count in votes.most_common())
    return f"knn ({weighting}) over {len(neighbors)} exemplars: {tally}{nearest}"


def _timed(decision: RouteDecision, overhead_ms: float, embed_ms: float, batch_size: int) -> RouteDecision:
    return replace(
        decision,
        overhead_ms=overhead_ms,
        embed_ms=embed_ms if decision.router == "knn" else 0.0,
        batch_size=batch_size,
    )
