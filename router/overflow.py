"""The static overflow: kNN on a static embedder's vectors for the requests the router is too busy to embed.

On a CPU router the transformer's forward pass caps the decisions per second (MiniLM ONNX: about 100 on 2 cores),
so at a traffic peak most `auto` requests used to wait past `router.max_queue_wait_s` and get the heuristic's
decision. Instead, `router.overflow: static` (the default for MiniLM) decides those by kNN over the same
exemplars (the store's active version) with the static embedder distilled and fitted from the router's own model
(`router.embed.static`): about 0.1 ms to embed, and one matrix product over the exemplars' static vectors. Its
routing quality against the model's own and against the heuristic's is in benchmarks/embedder_quality.md.

The router keeps one `OverflowIndex`, made in a background thread at the lowest CPU priority (`OverflowBuilder`):
the static embedder once (about 30 s for MiniLM on 2 cores at the first start, read from `<data_dir>/static`
after), then the active exemplars embedded again whenever they change (a new version, an import, a learned
flush), at most every `MIN_REBUILD_S`. Until the first index is ready, and while the store is unavailable, the
heuristic decides as before. The ingress takes a copy of the index from the router and answers its own busy
decisions with it (`serving.ingress.plan`). Its decisions say `router: knn` with `overflow: true`, and are
labelled `knn-static` in the response's headers and the metrics.

The static first pass (`router.static_first`) decides with the same index before the router is asked: a request
whose static score lands farther than `OverflowIndex.margin` from every boundary is decided there (`fast: true`,
labelled `knn-fast`); the router's own embedder decides the rest. The margin is measured with each build
(`static_margin`): the static and the router's own kNN scores of a sample of the exemplars, each scored without
itself, differ by less than the margin for `MARGIN_QUANTILE` of them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from router.config import KnnConfig
from router.embed.base import Embedder
from router.embed.static import StaticEmbedder
from router.knn import VectorMatrix
from router.scoring import Decider, KnnRouter, Nearest, Scores, knn_difficulty
from router.types import FAST_LABEL, OVERFLOW_LABEL, Neighbor, RouteDecision, RouteInput

if TYPE_CHECKING:
    from router.store import ExemplarStore

logger = logging.getLogger(__name__)

EMBED_CHUNK = 256
"""Exemplars embedded per call while indexing: a decision on the request path waits for at most one chunk."""
MIN_REBUILD_S = 10.0
"""Least time between two builds of the index (exemplars learned every second must not re-embed every second)."""
MARGIN_QUANTILE = 1.0
"""Share of the sampled exemplars whose static score is within the margin of the router's own (see the module):
1.0, the largest difference among them. Chosen by cross-validation on the shared routing sets' train splits
(benchmarks/embedder_quality.md), the static embedder fitted on one half of them and the first pass scored on the
other, as a router's static embedder is fitted on its exemplars and decides texts it never saw: the only quantile
tried whose first pass stayed within 1 point of CPT(50%) of MiniLM's on every set (0.995 lost 1.1 on GSM8K;
0.95 lost 3.9 on MBPP's test split)."""
PREVIOUS = "|previous"
"""Ends the key the router reports for an index of its previous exemplars (`RouterDeployment.overflow_index`)."""
MARGIN_SAMPLE = 256
"""Exemplars the margin is measured on (the router's embedder embeds them once more, in the builder's thread)."""
RECALIBRATE_S = 600.0
"""Least time between two measurements of the margin (a build in between keeps the last one)."""


@dataclass(frozen=True)
class OverflowIndex:
    """The active exemplars' static vectors and tier labels, with the embedder that made them; picklable, so the
    router hands a copy to the ingress."""

    key: str
    """What it was made from: `<store>|<active version>|<the router's exemplar generation>|<builder token>`."""
    embedder: StaticEmbedder | None
    """None only in transit, where the receiver holds the same embedder (`RouterDeployment.overflow_index`)."""
    matrix: VectorMatrix
    difficulty: dict[str, float]
    """Each tier label's difficulty (NaN: a label that is no tier, ignored as kNN ignores it)."""
    knn: KnnConfig
    margin: float | None = None
    """The static first pass's margin (None: no first pass, `router.static_first` off or not measured yet)."""
    previous: bool = False
    """Made from the exemplars before their last change: it serves busy decisions until the new index is ready
    (`OverflowBuilder.current`), but the first pass waits for that one."""

    def __len__(self) -> int:
        return len(self.matrix)

    def nearest(self, vectors: np.ndarray, k: int) -> Nearest:
        return Nearest.of(self.matrix.query(vectors, k), k, lambda tier: self.difficulty.get(tier, np.nan))

    @property
    def decides_first(self) -> bool:
        """The first pass may decide on this index: it has a margin, and it is of the exemplars served now."""
        return self.margin is not None and not self.previous

    def score(self, item: RouteInput) -> Scores:
        """kNN's score of `item` on the static vectors (one static embedding; `first` and `decide` take it)."""
        return KnnRouter(self.embedder.embed, self, self.knn).score([item.text])

    def decide(self, item: RouteInput, decider: Decider, note: str, scores: Scores | None = None
               ) -> RouteDecision | None:
        """kNN's decision for `item` on the static vectors (None: no labelled neighbour), its reason ending in
        `note` (why the overflow decided). `scores`: `score(item)`, where the caller has it already."""
        scores = scores or self.score(item)
        return _decision(scores, item, decider, f"{OVERFLOW_LABEL}: {scores.reasons[0]}; {note}", overflow=True)

    def first(self, item: RouteInput, decider: Decider, scores: Scores | None = None) -> RouteDecision | None:
        """The static first pass: kNN's decision on the static vectors where its score is farther than `margin`
        from every boundary of `item` (None: near one, no margin, an index of the previous exemplars, or no
        labelled neighbour: the router decides). `scores`: `score(item)`, where the caller has it already."""
        if not self.decides_first:
            return None
        scores = scores or self.score(item)
        if any(abs(scores.values[0] - t) < self.margin for t in decider.thresholds_for(item)):  # False for NaN
            return None
        reason = f"{FAST_LABEL}: {scores.reasons[0]}; farther than {self.margin:.3f} from every boundary"
        return _decision(scores, item, decider, reason, fast=True)


def _decision(scores: Scores, item: RouteInput, decider: Decider, reason: str, **flag: bool) -> RouteDecision | None:
    score = float(scores.values[0])
    if np.isnan(score):
        return None
    neighbors = scores.neighbors[0] if scores.neighbors else ()
    return replace(decider.decide(item, "knn", score, reason, neighbors=neighbors), **flag)


def static_margin(static_scores: np.ndarray, exact_scores: np.ndarray, quantile: float = MARGIN_QUANTILE) -> float:
    """The static first pass's margin: the `quantile` of |static score - the router's own| over scored texts
    (both scored without the text itself among the exemplars); inf when no text has both (nothing is fast)."""
    errors = np.abs(np.asarray(static_scores, dtype=float) - np.asarray(exact_scores, dtype=float))
    errors = errors[~np.isnan(errors)]
    return float(np.quantile(errors, quantile)) if len(errors) else float("inf")


def scores_without_self(found: list[list[Neighbor]], ids: list[str], knn: KnnConfig,
                        difficulty: Callable[[str], float]) -> np.ndarray:
    """kNN scores of exemplars from their own searches (`knn.k` + 1 found each), each exemplar left out."""
    own = [[n for n in row if n.id != point_id][: knn.k] for row, point_id in zip(found, ids)]
    return knn_difficulty(Nearest.of(own, knn.k, difficulty), knn)


class OverflowBuilder:
    """Keeps the router's `OverflowIndex` in step with its exemplars, building it in a background thread."""

    def __init__(self, make_embedder: Callable[[], StaticEmbedder], knn: KnnConfig,
                 difficulty: Callable[[str], float], *, min_rebuild_s: float = MIN_REBUILD_S,
                 exact: Embedder | None = None) -> None:
        """`make_embedder`: loads (or distils and fits, once) the static embedder; called in the thread.
        `exact`: the router's own embedder, whose scores the first pass's margin is measured against (None: no
        first pass)."""
        self._make_embedder = make_embedder
        self._knn = knn
        self._difficulty = difficulty
        self._min_rebuild_s = min_rebuild_s
        self._exact = exact
        self._calibrated_at = -float("inf")
        self._embedder: StaticEmbedder | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._built_at = -float("inf")
        """When the last build ended, made an index or not (monotonic; -inf: none tried yet)."""
        self._failed = False
        self._token = uuid.uuid4().hex[:8]
        """This builder's own mark in its keys: a restarted router's copy is never taken for the one before."""
        self.index: OverflowIndex | None = None
        """The latest index made (None until the first is ready)."""

    def current(self, store: ExemplarStore | None, generation: int) -> OverflowIndex | None:
        """The index of the exemplars `store` serves now (None: not made yet, or no store), starting a build in
        the background when they changed since the last one."""
        if store is None or store.closed or self._failed:
            return None
        where = f"{store.location}/{store.collection}"
        key = f"{where}|{store.active}|{generation}|{self._token}"
        index = self.index
        if index is not None and index.key == key:
            return index
        with self._lock:
            due = time.monotonic() - self._built_at >= self._min_rebuild_s  # -inf before the first try
            if due and (self._thread is None or not self._thread.is_alive()):
                self._thread = threading.Thread(target=self._build, args=(store, key), daemon=True,
                                                name="tierserve-overflow")
                self._thread.start()
        # An index of the previous exemplars of the same store serves busy decisions until the new one is ready:
        # it differs by the changes since it was made, and decides better than the heuristic.
        return replace(index, previous=True) if index is not None and index.key.startswith(f"{where}|") else None

    def wait(self, timeout: float | None = None) -> OverflowIndex | None:
        """Wait for a build in progress; the index (for tests and warm-ups)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self.index

    def _build(self, store: ExemplarStore, key: str) -> None:
        _lowest_priority()
        started = time.perf_counter()
        try:
            if self._embedder is None:
                self._embedder = self._make_embedder()
            ids, texts, tiers = [], [], []
            for stored in store.iter(batch=1024):
                ids.append(stored.id)
                texts.append(stored.exemplar.text)
                tiers.append(stored.exemplar.tier)
            vectors = np.empty((len(ids), self._embedder.dim), dtype=np.float32)
            for start in range(0, len(ids), EMBED_CHUNK):  # the tokenizer's lock is shared with busy decisions
                vectors[start:start + EMBED_CHUNK] = self._embedder.embed(texts[start:start + EMBED_CHUNK])
            matrix = VectorMatrix(self._embedder.dim)
            matrix.put(ids, vectors, tiers)  # one array, put once
            difficulty = {tier: self._difficulty(tier) for tier in set(tiers)}
            margin = self._margin(store, ids, texts, vectors, matrix)
        except Exception:
            if self._embedder is None:  # no static embedder for this model: the heuristic keeps deciding
                self._failed = True
                logger.exception("could not make the static overflow's embedder; busy decisions stay heuristic")
            else:
                logger.warning("could not index the exemplars for the static overflow; retrying later",
                               exc_info=True)
            self._built_at = time.monotonic()
            return
        self.index = OverflowIndex(key, self._embedder, matrix, difficulty, self._knn, margin)
        self._built_at = time.monotonic()
        logger.info("static overflow: %d exemplars indexed in %.1f s (%s; first-pass margin %s)", len(ids),
                    time.perf_counter() - started, key, "none" if margin is None else f"{margin:.4f}")

    def _margin(self, store: ExemplarStore, ids: list[str], texts: list[str], vectors: np.ndarray,
                matrix: VectorMatrix) -> float | None:
        """The first pass's margin, measured on a sample of the exemplars (`static_margin`), or the last one
        measured within `RECALIBRATE_S`; None without a first pass or with too few exemplars to leave one out."""
        held = self.index.margin if self.index is not None else None
        if self._exact is None or len(ids) <= self._knn.k:
            return None
        if held is not None and time.monotonic() - self._calibrated_at < RECALIBRATE_S:
            return held
        rows = np.random.default_rng(0).permutation(len(ids))[:MARGIN_SAMPLE]
        sample = [ids[i] for i in rows]
        exact = store.query(self._exact.embed([texts[i] for i in rows]), self._knn.k + 1)
        static = matrix.query(vectors[rows], self._knn.k + 1)
        self._calibrated_at = time.monotonic()
        return static_margin(scores_without_self(static, sample, self._knn, self._difficulty),
                             scores_without_self(exact, sample, self._knn, self._difficulty))


def _lowest_priority() -> None:
    """This thread only (Linux nices threads one by one) at the lowest CPU priority: engines and requests first."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (OSError, AttributeError):
        pass
