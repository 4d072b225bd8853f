"""Choosing router settings on the train split only: leave-one-out for kNN, k-fold for the classifier.

Every candidate is judged by APGR of its out-of-sample scores on train (the area metric is steadier than a
single CPT point on a few hundred prompts). The test split is never read here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from router.classifier import DifficultyClassifier, ModelKind
from router.config import KnnConfig
from router.eval import metrics
from router.knn import nearest_neighbors
from router.scoring import difficulty_from_neighbors

logger = logging.getLogger(__name__)

KNN_KS = (10, 20, 50, 100, 200, 256)
"""Up to the live router's limit (router.knn.k <= 256); on MMLU, APGR still rises slowly towards k=256."""
KNN_WEIGHTINGS = (("uniform", 1.0), ("similarity", 1.0), ("softmax", 0.05), ("softmax", 0.1))
CLASSIFIER_CS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


def train_apgr(scores: np.ndarray, strong: np.ndarray, weak: np.ndarray) -> float:
    """APGR of scores on labelled rows (quality baselines from the same rows)."""
    curve = metrics.threshold_sweep(scores, strong, weak)
    value = metrics.apgr(curve, float(np.mean(strong)) * 100, float(np.mean(weak)) * 100)
    return value if np.isfinite(value) else float("-inf")  # constant scores trace no curve


@dataclass(frozen=True)
class Tuned:
    """The chosen settings, their cross-validated APGR on train, and out-of-sample train scores."""

    params: dict
    cv_apgr: float
    oof_scores: np.ndarray
    """Scores of every train row from a model that did not see it (used for calibration)."""


def tune_knn(
    vectors: np.ndarray,
    labels: np.ndarray,
    strong: np.ndarray,
    weak: np.ndarray,
    *,
    ks: Sequence[int] = KNN_KS,
    weightings: Sequence[tuple[str, float]] = KNN_WEIGHTINGS,
    progress: bool = True,
) -> tuple[KnnConfig, Tuned]:
    """Pick k / weighting / temperature by leave-one-out APGR on train."""
    ks = [k for k in ks if k < len(vectors)] or [max(1, len(vectors) - 1)]
    sims, idx = nearest_neighbors(vectors, vectors, max(ks), exclude_self=True)
    neighbour_labels = labels[idx]
    best: tuple[float, dict, np.ndarray] | None = None
    grid = [(k, w, t) for k in ks for w, t in weightings]
    for k, weighting, temperature in tqdm(grid, desc="tuning knn (leave-one-out)", disable=not progress):
        scores = difficulty_from_neighbors(
            sims[:, :k], neighbour_labels[:, :k], weighting=weighting, temperature=temperature
        )
        value = train_apgr(scores, strong, weak)
        if best is None or value > best[0]:
            best = (value, {"k": k, "weighting": weighting, "temperature": temperature}, scores)
    value, params, scores = best
    logger.info("knn: chose %s (leave-one-out APGR on train %.3f)", params, value)
    return KnnConfig(**params), Tuned(params, value, scores)


def _folds(n: int, folds: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n) % folds


def cross_val_scores(
    vectors: np.ndarray, labels: np.ndarray, texts: Sequence[str] | None, *, folds: int, **fit_kw
) -> np.ndarray:
    """Out-of-fold classifier scores for every row (folds drawn with `fit_kw["seed"]`)."""
    fold = _folds(len(vectors), folds, fit_kw.get("seed", 0))
    out = np.empty(len(vectors))
    for f in range(folds):
        tr, te = fold != f, fold == f
        clf = DifficultyClassifier.fit(
            vectors[tr], labels[tr], texts=None if texts is None else [texts[i] for i in np.flatnonzero(tr)],
            **fit_kw,
        )
        out[te] = clf.predict_difficulty(
            vectors[te], texts=None if texts is None else [texts[i] for i in np.flatnonzero(te)]
        )
    return out


def tune_classifier(
    vectors: np.ndarray,
    labels: np.ndarray,
    strong: np.ndarray,
    weak: np.ndarray,
    texts: Sequence[str],
    *,
    embedder: str,
    cs: Sequence[float] = CLASSIFIER_CS,
    models: Sequence[ModelKind] = ("logreg",),
    text_features: Sequence[bool] = (False, True),
    folds: int = 5,
    seed: int = 0,
    progress: bool = True,
) -> tuple[dict, Tuned]:
    """Pick model kind / C / text features by k-fold APGR on train. Returns fit kwargs for `fit`."""
    best: tuple[float, dict, np.ndarray] | None = None
    grid = [(m, c, tf) for m in models for c in cs for tf in text_features]
    for model, c, use_text in tqdm(grid, desc=f"tuning classifier ({folds}-fold)", disable=not progress):
        kw = {"model": model, "c": c, "embedder": embedder, "seed": seed}
        scores = cross_val_scores(vectors, labels, texts if use_text else None, folds=folds, **kw)
        value = train_apgr(scores, strong, weak)
        logger.debug("classifier %s C=%s text=%s: cv APGR %.3f", model, c, use_text, value)
        if best is None or value > best[0]:
            best = (value, {**kw, "text_features": use_text}, scores)
    value, params, scores = best
    logger.info("classifier: chose %s (%d-fold APGR on train %.3f)", params, folds, value)
    return params, Tuned({k: v for k, v in params.items() if k != "embedder"}, value, scores)
