"""Scoring, as RouteLLM has it: a difficulty score per text in [0, 1], then one comparison per boundary.

The pure part first (neighbours -> difficulty -> tier index; no I/O, vectorized for evaluation), then the routers
that score texts (`CheapestRouter`, `RandomRouter`, `HeuristicRouter`, `ClassifierRouter`, `KnnRouter`) and the
`Decider` that turns a score into a tier as a `RouteDecision` (pure, no model, no store).

Tiers are in cost order. A tier label's difficulty is its position scaled to [0, 1] (two tiers: 0 and 1; three:
0, 0.5, 1). The seed labels `small` / `medium` / `large` map to 0 / 0.5 / 1 when they are not tier names, so the
shipped three-class exemplars also drive a two-tier deployment (medium sits on the default boundary).

Every place that routes scores with these classes: the router deployment (`router.core.Router`), the ingress's
own heuristic / cheapest / judge / fallback decisions (a `Decider` there too), and `tierserve eval`. Only where
kNN finds its exemplars differs: Qdrant (`StoreIndex`) while serving, a matrix of train vectors (`MatrixIndex`)
in evaluation; embedded Qdrant answers from the same kind of matrix with the same top-k function
(`router.knn.nearest_neighbors`).
"""

from __future__ import annotations

import bisect
import hashlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

import numpy as np

from router.config import HeuristicConfig, KnnConfig, RouterConfig
from router.heuristic import HeuristicScorer
from router.knn import nearest_neighbors
from router.types import Neighbor, RouteDecision, RouteInput, RouterKind

if TYPE_CHECKING:  # the ingress imports this module; joblib and the classifier load only where one is used
    from router.classifier import DifficultyClassifier
    from router.store import ExemplarStore

SEED_LABELS: dict[str, float] = {"small": 0.0, "medium": 0.5, "large": 1.0}
"""Difficulty of the seed classes, used for labels that are not tier names."""

WEIGHTINGS = ("uniform", "similarity", "softmax")


def label_difficulty(tier_label: str, tier_names: Sequence[str]) -> float:
    """Difficulty of an exemplar label: tier position / (N - 1), or the seed label's value."""
    if tier_label in tier_names:
        n = len(tier_names)
        return tier_names.index(tier_label) / (n - 1) if n > 1 else 0.0
    if tier_label in SEED_LABELS:
        return SEED_LABELS[tier_label]
    raise ValueError(
        f"exemplar tier label {tier_label!r} is neither a tier ({list(tier_names)}) nor a seed label "
        f"({list(SEED_LABELS)}); map it with --label-map or fix the data."
    )


def difficulty_from_neighbors(
    similarities: np.ndarray,
    label_difficulty: np.ndarray,
    *,
    weighting: str,
    temperature: float,
) -> np.ndarray:
    """Weighted mean of the neighbours' label difficulties, one score per row.

    similarities: (n, k) cosine similarities; NaN marks a missing neighbour (fewer than k exemplars).
    label_difficulty: (n, k) difficulties in [0, 1] of those neighbours' labels (NaN also means missing).
    weighting: `uniform` (plain mean), `similarity` (weights max(sim, 0); a row with no positive similarity
    falls back to uniform) or `softmax` (weights exp(sim / temperature)).
    Returns (n,) scores in [0, 1]; NaN for a row without any neighbour.
    """
    sims = np.asarray(similarities, dtype=np.float64)
    labels = np.asarray(label_difficulty, dtype=np.float64)
    if sims.ndim != 2 or sims.shape != labels.shape:
        raise ValueError(
            f"similarities {sims.shape} and label_difficulty {labels.shape} must both have shape (n, k)."
        )
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting {weighting!r} is not one of {WEIGHTINGS}.")
    if temperature <= 0:
        raise ValueError(f"temperature ({temperature}) must be > 0.")

    valid = ~(np.isnan(sims) | np.isnan(labels))
    sims = np.where(valid, sims, -np.inf)
    if weighting == "uniform":
        weights = valid.astype(np.float64)
    elif weighting == "similarity":
        weights = np.where(valid, np.clip(sims, 0.0, None), 0.0)
        no_positive = weights.sum(axis=1) == 0
        weights[no_positive] = valid[no_positive]
    else:
        # Subtracting the row maximum keeps exp() finite for any temperature.
        row_max = np.max(sims, axis=1, keepdims=True)
        row_max = np.where(np.isfinite(row_max), row_max, 0.0)
        weights = np.exp((sims - row_max) / temperature)

    total = weights.sum(axis=1)
    weighted = np.where(valid, labels, 0.0) * weights
    with np.errstate(invalid="ignore", divide="ignore"):
        scores = weighted.sum(axis=1) / total
    scores[total == 0] = np.nan
    return np.clip(scores, 0.0, 1.0)


def tier_for_score(score: float, thresholds: Sequence[float]) -> int:
    """Index of the tier for `score`: the number of thresholds at or below it (ascending thresholds)."""
    return bisect.bisect_right(thresholds, score)


def tiers_for_scores(scores: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """Vectorized `tier_for_score`: (n,) scores -> (n,) tier indices."""
    return np.searchsorted(np.asarray(thresholds, dtype=np.float64), np.asarray(scores), side="right")


def with_threshold(thresholds: Sequence[float], threshold: float) -> tuple[float, ...]:
    """Apply a per-request threshold: it becomes the boundary into the most expensive tier.

    With more than two tiers the lower boundaries are capped at it, so the order stays ascending.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold ({threshold}) must be within [0, 1].")
    if not thresholds:
        return ()
    return tuple(min(t, threshold) for t in thresholds[:-1]) + (threshold,)


# -- the routers ------------------------------------------------------------------------------------------

Embed = Callable[[Sequence[str]], np.ndarray]
"""Texts -> (n, dim) unit vectors."""


@dataclass(frozen=True)
class Scores:
    """A router's scores for a batch of texts, and why."""

    values: np.ndarray
    """(n,) difficulty in [0, 1]: higher means a costlier tier is needed. NaN: this router could not score it."""
    reasons: tuple[str, ...]
    neighbors: tuple[tuple[Neighbor, ...], ...] = ()
    """The nearest exemplars per text, most similar first (kNN over a store only)."""


class Scorer(Protocol):
    """One router: scores texts. `tier_for_score` turns a score into a tier."""

    kind: str

    def score(self, texts: Sequence[str]) -> Scores: ...


@dataclass
class CheapestRouter:
    """Always the first tier: score 0 and no boundary applies."""

    kind: str = "cheapest"

    def score(self, texts: Sequence[str]) -> Scores:
        return Scores(np.zeros(len(texts)), ("cheapest router: always the first tier",) * len(texts))


@dataclass
class RandomRouter:
    """RouteLLM's random baseline: an independent uniform score per text, seeded by the text."""

    seed: int = 0
    kind: str = "random"

    def score(self, texts: Sequence[str]) -> Scores:
        values = np.empty(len(texts))
        for i, text in enumerate(texts):
            digest = hashlib.sha256(f"{self.seed}\x01{text}".encode()).digest()
            values[i] = int.from_bytes(digest[:8], "big") / 2**64
        return Scores(values, ("random",) * len(texts))


class HeuristicRouter:
    """Length and keyword rules (`router.heuristic`); also every fallback when another router cannot decide."""

    kind = "heuristic"

    def __init__(self, config: HeuristicConfig | None = None) -> None:
        self._scorer = HeuristicScorer(config or HeuristicConfig())

    def score(self, texts: Sequence[str]) -> Scores:
        results = [self._scorer.score(text) for text in texts]
        return Scores(np.array([r.score for r in results], dtype=float), tuple(r.reason for r in results))


@dataclass
class ClassifierRouter:
    """A trained `DifficultyClassifier` over the embedder's vectors (and its text features)."""

    embed: Embed
    classifier: DifficultyClassifier
    kind: str = "classifier"

    def score(self, texts: Sequence[str]) -> Scores:
        values = np.asarray(self.classifier.predict_difficulty(self.embed(texts), texts=texts), dtype=float)
        return Scores(values, tuple(f"classifier P(strong needed) {v:.3f}" for v in values))


class NeighborIndex(Protocol):
    """Where kNN finds exemplars: the k most similar per query vector, with each one's difficulty label."""

    def nearest(self, vectors: np.ndarray, k: int) -> Nearest: ...


@dataclass(frozen=True)
class Nearest:
    """The k nearest exemplars of each query: similarities and difficulty labels, (n, k), NaN-padded."""

    similarities: np.ndarray
    labels: np.ndarray
    neighbors: tuple[tuple[Neighbor, ...], ...] = ()

    @classmethod
    def of(cls, found: Sequence[Sequence[Neighbor]], k: int, label: Callable[[str], float]) -> Nearest:
        """The neighbours a search found per query, with `label` turning each one's tier into a difficulty."""
        sims = np.full((len(found), k), np.nan)
        labels = np.full((len(found), k), np.nan)
        for row, neighbors in enumerate(found):
            for col, n in enumerate(neighbors[:k]):
                sims[row, col] = n.similarity
                labels[row, col] = label(n.tier)
        return cls(sims, labels, tuple(tuple(n) for n in found))


@dataclass
class StoreIndex:
    """kNN over the exemplar store (Qdrant); labels are tier names, turned into difficulties by `label`."""

    store: ExemplarStore
    label: Callable[[str], float]
    version: int | None = None
    """Store version to search (None: the active one)."""

    def nearest(self, vectors: np.ndarray, k: int) -> Nearest:
        return Nearest.of(self.store.query(vectors, k, version=self.version), k, self.label)


@dataclass
class MatrixIndex:
    """Exemplars as a matrix of unit vectors and their difficulty labels (evaluation: the train split)."""

    vectors: np.ndarray
    labels: np.ndarray
    """Difficulty label per row in [0, 1]."""
    exclude_self: bool = False
    """Leave-one-out on train: each query row i skips exemplar row i (queries are the exemplars)."""

    def nearest(self, vectors: np.ndarray, k: int) -> Nearest:
        sims, idx = nearest_neighbors(vectors, self.vectors, k, exclude_self=self.exclude_self)
        return Nearest(sims, self.labels[idx])


@dataclass
class KnnRouter:
    """The k nearest labelled exemplars vote, weighted by similarity (`difficulty_from_neighbors`)."""

    embed: Embed
    index: NeighborIndex
    knn: KnnConfig = KnnConfig()
    kind: str = "knn"

    def score(self, texts: Sequence[str]) -> Scores:
        return self.score_vectors(self.embed(texts))

    def score_vectors(self, vectors: np.ndarray) -> Scores:
        found = self.index.nearest(vectors, self.knn.k)
        values = knn_difficulty(found, self.knn)
        if not found.neighbors:
            return Scores(values, (f"knn ({self.knn.weighting})",) * len(values))
        reasons = tuple(_knn_reason(n, self.knn.weighting) for n in found.neighbors)
        return Scores(values, reasons, found.neighbors)


def knn_difficulty(found: Nearest, knn: KnnConfig) -> np.ndarray:
    """kNN's score of each query: its nearest exemplars' difficulties, weighted as `knn` says."""
    return difficulty_from_neighbors(found.similarities, found.labels, weighting=knn.weighting,
                                     temperature=knn.temperature)


def _knn_reason(neighbors: tuple[Neighbor, ...], weighting: str) -> str:
    votes = Counter(n.tier for n in neighbors)
    top = neighbors[0] if neighbors else None
    nearest = f"; nearest {top.tier} at {top.similarity:.2f}" if top else ""
    tally = ", ".join(f"{tier} {count}" for tier, count in votes.most_common())
    return f"knn ({weighting}) over {len(neighbors)} exemplars: {tally}{nearest}"


class Decider:
    """The tier boundaries of one config, and the routers that need no model (heuristic, cheapest)."""

    def __init__(self, cfg: RouterConfig, tier_names: Sequence[str]) -> None:
        self.tier_names = list(tier_names)
        self.thresholds = cfg.thresholds_for(len(self.tier_names))
        """The configured boundaries between neighbouring tiers (cost order)."""
        self.heuristic = HeuristicRouter(cfg.heuristic)
        self.cheapest = CheapestRouter()

    def thresholds_for(self, item: RouteInput) -> tuple[float, ...]:
        """The boundaries for one request: the config's, with the request's own threshold applied."""
        return self.thresholds if item.threshold is None else with_threshold(self.thresholds, item.threshold)

    def decide(
        self, item: RouteInput, router: RouterKind, score: float, reason: str, *, fallback: bool = False,
        neighbors: tuple[Neighbor, ...] = (),
    ) -> RouteDecision:
        """The tier for `score`: one comparison per boundary (`cheapest` is the first tier whatever the score)."""
        thresholds = self.thresholds_for(item)
        index = 0 if router == "cheapest" else tier_for_score(score, thresholds)
        return RouteDecision(tier=self.tier_names[index], tier_index=index, router=router, score=score,
                             thresholds=thresholds, reason=reason, fallback=fallback, neighbors=neighbors)

    def local(self, item: RouteInput, router: RouterKind) -> RouteDecision:
        """The decision of a router that needs no model: `heuristic` or `cheapest`."""
        scorer: Scorer = self.cheapest if router == "cheapest" else self.heuristic
        scores = scorer.score([item.text])
        return self.decide(item, router, float(scores.values[0]), scores.reasons[0])

    def fallback(self, item: RouteInput, cause: str) -> RouteDecision:
        """The heuristic's decision when the requested router could not decide (`cause` says why)."""
        scores = self.heuristic.score([item.text])
        reason = f"knn unavailable ({cause}); {scores.reasons[0]}"
        decision = self.decide(item, "heuristic", float(scores.values[0]), reason, fallback=True)
        return replace(decision, fallback_cause=cause)
