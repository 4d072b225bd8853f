"""Pure scoring: neighbours -> difficulty in [0, 1] -> tier index. No I/O; vectorized for evaluation.

Tiers are in cost order. A tier label's difficulty is its position scaled to [0, 1] (two tiers: 0 and 1; three:
0, 0.5, 1). The seed labels `small` / `medium` / `large` map to 0 / 0.5 / 1 when they are not tier names, so the
shipped three-class exemplars also drive a two-tier deployment (medium sits on the default boundary).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

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
