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
from router.embed.static import StaticEmbedder
from router.knn import VectorMatrix
from router.scoring import Decider, KnnRouter, Nearest
from router.types import OVERFLOW_LABEL, RouteDecision, RouteInput

if TYPE_CHECKING:
    from router.store import ExemplarStore

logger = logging.getLogger(__name__)

EMBED_CHUNK = 256
"""Exemplars embedded per call while indexing: a decision on the request path waits for at most one chunk."""
MIN_REBUILD_S = 10.0
"""Least time between two builds of the index (exemplars learned every second must not re-embed every second)."""


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

    def __len__(self) -> int:
        return len(self.matrix)

    def nearest(self, vectors: np.ndarray, k: int) -> Nearest:
        return Nearest.of(self.matrix.query(vectors, k), k, lambda tier: self.difficulty.get(tier, np.nan))

    def decide(self, item: RouteInput, decider: Decider, note: str) -> RouteDecision | None:
        """kNN's decision for `item` on the static vectors (None: no labelled neighbour), its reason ending in
        `note` (why the overflow decided)."""
        scores = KnnRouter(self.embedder.embed, self, self.knn).score([item.text])
        score = float(scores.values[0])
        if np.isnan(score):
            return None
        neighbors = scores.neighbors[0] if scores.neighbors else ()
        decision = decider.decide(item, "knn", score, f"{OVERFLOW_LABEL}: {scores.reasons[0]}; {note}",
                                  neighbors=neighbors)
        return replace(decision, overflow=True)


class OverflowBuilder:
    """Keeps the router's `OverflowIndex` in step with its exemplars, building it in a background thread."""

    def __init__(self, make_embedder: Callable[[], StaticEmbedder], knn: KnnConfig,
                 difficulty: Callable[[str], float], *, min_rebuild_s: float = MIN_REBUILD_S) -> None:
        """`make_embedder`: loads (or distils and fits, once) the static embedder; called in the thread."""
        self._make_embedder = make_embedder
        self._knn = knn
        self._difficulty = difficulty
        self._min_rebuild_s = min_rebuild_s
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
        # An index of the previous exemplars of the same store serves until the new one is ready: it differs by
        # the changes since it was made, and decides better than the heuristic.
        return index if index is not None and index.key.startswith(f"{where}|") else None

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
            matrix = VectorMatrix(self._embedder.dim)
            for start in range(0, len(ids), EMBED_CHUNK):  # the tokenizer's lock is shared with busy decisions
                end = start + EMBED_CHUNK
                matrix.put(ids[start:end], self._embedder.embed(texts[start:end]), tiers[start:end])
            difficulty = {tier: self._difficulty(tier) for tier in set(tiers)}
        except Exception:
            if self._embedder is None:  # no static embedder for this model: the heuristic keeps deciding
                self._failed = True
                logger.exception("could not make the static overflow's embedder; busy decisions stay heuristic")
            else:
                logger.warning("could not index the exemplars for the static overflow; retrying later",
                               exc_info=True)
            self._built_at = time.monotonic()
            return
        self.index = OverflowIndex(key, self._embedder, matrix, difficulty, self._knn)
        self._built_at = time.monotonic()
        logger.info("static overflow: %d exemplars indexed in %.1f s (%s)", len(ids),
                    time.perf_counter() - started, key)


def _lowest_priority() -> None:
    """This thread only (Linux nices threads one by one) at the lowest CPU priority: engines and requests first."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (OSError, AttributeError):
        pass
