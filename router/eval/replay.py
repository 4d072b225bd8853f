"""Replay: a labelled set's train split streamed, in order, through the router's online learning, then the
learned pre-router judged on test against the calibrated plain cascade.

The stream uses the serving code: `router.learn.Learner` (labels from the cascade's decision, sampling, caps,
exploration), the exemplar store (`router.store`, a version per flush) and the kNN scorer the router runs. It
reads only the weak model's confidence (the cascade's decision); correctness columns are read afterwards, to
score operating points. Every train row is scored by the store as it was *before* that row was learned, so
the stream's own scores are out of sample (prequential); the operating point (pre-route threshold, cascade
threshold) is chosen on them and applied to test.

Policy: a request whose kNN score is at or above `tau` goes straight to the large tier; the rest cascade
(small answers; below the cascade threshold the large one answers too: a wasted small attempt).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from router.config import KnnConfig
from router.eval.calibrate import confidence_threshold_for_rate
from router.learn import LearnConfig, Learner, RequestOutcome
from router.learn.recalibrate import Recalibrator
from router.learn.rules import explore
from router.scoring import KnnRouter, StoreIndex, label_difficulty
from router.store import ExemplarStore
from router.types import RouteDecision

TIERS = ("small", "large")
TAUS = tuple(np.round(np.arange(0.30, 1.001, 0.05), 2))
"""Pre-route thresholds swept (a kNN score is the weighted share of neighbours labelled `large`)."""


@dataclass(frozen=True)
class Point:
    """One operating point on a set of rows: shares of requests, and cost in units of one large call."""

    tau: float | None
    threshold: float
    pre_routed: float
    """Share sent straight to the large tier."""
    wasted: float
    """Share whose small answer was escalated (a small attempt paid for and thrown away)."""
    cost: float
    """Mean cost per request, a large call = 1 (small call = the cost ratio)."""
    quality: float
    """Mean correctness of the answers served (%)."""


def operate(scores: np.ndarray | None, tau: float | None, threshold: float, conf: np.ndarray, strong: np.ndarray,
            weak: np.ndarray, ratio: float) -> Point:
    """What the policy does on these rows (labels used to score, never to decide)."""
    pre = np.zeros(len(conf), dtype=bool) if scores is None or tau is None else scores >= tau
    escalated = ~pre & (conf < threshold)
    cost = np.where(pre, 1.0, ratio + escalated * 1.0)
    quality = np.where(pre | escalated, strong, weak)
    return Point(tau, float(threshold), float(pre.mean()), float(escalated.mean()), float(cost.mean()),
                 float(quality.mean() * 100))


def matched(scores: np.ndarray, tau: float, conf: np.ndarray, strong: np.ndarray, weak: np.ndarray, ratio: float,
            quality: float) -> Point | None:
    """At pre-route threshold `tau`, the cheapest cascade threshold whose quality is at least `quality`."""
    best = None
    for t in np.unique(np.r_[conf, 1.0 + 1e-9]):
        point = operate(scores, tau, float(t), conf, strong, weak, ratio)
        if point.quality >= quality - 1e-9 and (best is None or point.cost < best.cost):
            best = point
    return best


@dataclass
class Stream:
    """What streaming the train split left: the store, and every row's out-of-sample score."""

    store: ExemplarStore
    scores: np.ndarray
    learned: dict[str, int] = field(default_factory=dict)
    """Verdicts of the learner, counted."""
    threshold_path: list[float] = field(default_factory=list)


def stream(texts: Sequence[str], vectors: np.ndarray, conf: np.ndarray, *, threshold: float, tau: float,
           learn: LearnConfig, knn: KnnConfig, flush_every: int = 100, store_dir: str | None = None) -> Stream:
    """Stream rows in order: score on the store as it is, route (pre-route at `tau`, exploring a share), let
    the cascade decide at `threshold` on the confidence, learn, flush every `flush_every` rows."""
    directory = store_dir or tempfile.mkdtemp(prefix="tierserve-replay-")
    store = ExemplarStore(collection="replay", dim=vectors.shape[1], path=directory)
    learner = Learner(learn, TIERS)
    index = StoreIndex(store, lambda label: label_difficulty(label, TIERS))
    knn_router = KnnRouter(lambda t: vectors_of(t), index, knn)
    row_of = {text: i for i, text in enumerate(texts)}

    def vectors_of(batch: Sequence[str]) -> np.ndarray:
        return vectors[[row_of[t] for t in batch]]

    scores = np.zeros(len(texts))
    counts: dict[str, int] = {}
    pending: list[int] = []
    for i, text in enumerate(texts):
        value = knn_router.score_vectors(vectors[i : i + 1]).values[0] if store.active else 0.0
        scores[i] = 0.0 if np.isnan(value) else value
        to_large = scores[i] >= tau
        decision = RouteDecision(TIERS[int(to_large)], int(to_large), "knn", scores[i], (tau,), "replay")
        tried_small = not to_large or explore(decision, f"row-{i}", learn.explore_rate, cascading=True)
        if tried_small:
            chain = ("small", "large") if conf[i] < threshold else ("small",)
            outcome = RequestOutcome(f"row-{i}", text, chain, confidence=float(conf[i]), threshold=threshold,
                                     api_key_id=None, timestamp=float(i))
        else:
            outcome = RequestOutcome(f"row-{i}", text, ("large",), timestamp=float(i))
        verdict = learner.observe(outcome).verdict
        counts[verdict] = counts.get(verdict, 0) + 1
        pending.append(i)
        if len(pending) >= flush_every or i == len(texts) - 1:
            exemplars = learner.drain()
            if exemplars:
                store.upsert(exemplars, vectors_of([ex.text for ex in exemplars]))
            pending = []
    return Stream(store, scores, counts)


def recalibration_check(conf: np.ndarray, target: float, initial: float, *, after: int = 2000,
                        every: int = 100) -> dict:
    """Stream confidences through the online recalibrator: the escalation rate of the decisions made once
    `after` were logged, in windows of 500 and in all."""
    recal = Recalibrator(target, initial, every=every)
    escalated = np.zeros(len(conf), dtype=bool)
    for i, c in enumerate(conf):
        escalated[i] = c < recal.threshold
        recal.observe(c)
    late = escalated[after:]
    windows = [float(late[s : s + 500].mean()) for s in range(0, len(late) - 499, 500)]
    return {"target": target, "decisions": int(len(conf)), "after": after, "rate_after": float(late.mean()),
            "window_rates": windows, "final_threshold": recal.threshold}


def calibrated_threshold(train_conf: np.ndarray, target_rate: float) -> float:
    return confidence_threshold_for_rate(train_conf, target_rate).threshold
