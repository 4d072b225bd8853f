"""Threshold calibration: the router threshold that gives a target share of strong-model calls, or a target
fraction of the weak→strong quality gap, from labelled scores or from the scores in the query log.

A prompt goes to the strong model when `score >= threshold` (the live router's rule). Thresholds sit halfway
between two neighbouring observed scores, so the share on the calibration data is exact (barring ties) and
small shifts in the score distribution move it little. A cascade escalates an answer when `confidence <
threshold`; its thresholds are cut the same way from the other end. The `tierserve calibrate` CLI writes
them into the config file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np


@dataclass(frozen=True)
class Calibration:
    threshold: float
    """Route to the strong model when score >= threshold; within [0, 1]."""
    strong_share: float
    """Share of the calibration prompts at or above the threshold."""
    pgr: float | None = None
    """Fraction of the quality gap recovered on the calibration prompts (labelled data only)."""


def _cut(ordered: np.ndarray, k: int, *, rule: Literal[">=", "<"]) -> float:
    """Threshold that selects the first k of `ordered` under `rule`: midway between the k-th and k+1-th.

    `">="`: scores sorted descending, selected when score >= threshold (the router's strong calls).
    `"<"`: confidences sorted ascending, selected when confidence < threshold (the cascade's escalations).
    Selecting none or all, the threshold sits at the lowest value or just above the highest, within [0, 1].
    """
    n = len(ordered)
    if 0 < k < n:
        return float((ordered[k - 1] + ordered[k]) / 2.0)
    lowest, highest = (ordered[-1], ordered[0]) if rule == ">=" else (ordered[0], ordered[-1])
    # `>=` selects all at the lowest value and none just above the highest; `<` the other way round.
    if (k >= n) == (rule == ">="):
        return float(max(0.0, lowest))
    return float(min(1.0, np.nextafter(highest, np.inf)))


def threshold_for_share(scores: Sequence[float], target_share: float) -> Calibration:
    """Threshold that sends `target_share` (0..1) of these prompts to the strong model."""
    if not 0.0 <= target_share <= 1.0:
        raise ValueError(f"target strong share must be within [0, 1], got {target_share}")
    s = np.sort(np.asarray(scores, dtype=float))[::-1]
    if len(s) == 0:
        raise ValueError("no scores to calibrate on")
    t = _cut(s, _nearest_cut(s, int(round(target_share * len(s)))), rule=">=")
    return Calibration(t, float(np.mean(s >= t)))


def _nearest_cut(sorted_desc: np.ndarray, k: int) -> int:
    """The number of top scores a threshold can select that is closest to k: with ties, a threshold selects
    a whole tied group or none of it."""
    cuttable = np.flatnonzero(np.r_[True, sorted_desc[1:] < sorted_desc[:-1], True])
    return int(cuttable[np.argmin(np.abs(cuttable - k))])


TOLERANCE = 0.02
"""How far (as a share) the achieved rate may fall from its target before calibration warns."""


def discreteness_warning(achieved: float, target: float, scores: Sequence[float]) -> str | None:
    """A message when ties in the scores keep the achieved share more than TOLERANCE from the target."""
    if abs(achieved - target) <= TOLERANCE:
        return None
    values, counts = np.unique(np.asarray(scores, dtype=float), return_counts=True)
    return (f"the scores are too discrete to hit {target:.1%}: the nearest threshold gives {achieved:.1%} "
            f"({len(values)} distinct values; the largest tie holds {counts.max() / counts.sum():.1%} of them). "
            "Use finer scores (kNN: weighting similarity or softmax, or a larger k) or accept this share")


def threshold_for_pgr(
    scores: Sequence[float], strong: Sequence[float], weak: Sequence[float], target_pgr: float
) -> Calibration:
    """Lowest strong share whose threshold recovers at least `target_pgr` of the gap on these prompts."""
    if not 0.0 <= target_pgr <= 1.0:
        raise ValueError(f"target PGR must be within [0, 1], got {target_pgr}")
    scores, strong, weak = (np.asarray(a, dtype=float) for a in (scores, strong, weak))
    gap = strong.mean() - weak.mean()
    if gap <= 0:
        raise ValueError(f"the strong model is not better on these prompts (gap {gap:.4f}); PGR is undefined")
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    # quality after sending the top k to the strong model, k = 0..n
    gains = np.r_[0.0, np.cumsum((strong - weak)[order])]
    pgr = gains / len(scores) / gap
    # only cut where the score changes, so a threshold really selects the top k
    cuttable = np.r_[True, s[1:] < s[:-1], True]
    ks = [k for k in range(len(s) + 1) if cuttable[k] and pgr[k] >= target_pgr - 1e-12]
    k = ks[0] if ks else len(s)
    t = _cut(s, k, rule=">=")
    chosen = np.mean(scores >= t)
    return Calibration(t, float(chosen), float(pgr[int(round(chosen * len(s)))]))


@dataclass(frozen=True)
class CascadeCalibration:
    threshold: float
    """Escalate an answer when its confidence < threshold; within [0, 1]."""
    escalation_rate: float
    """Share of the calibration answers below the threshold."""
    pgr: float | None = None
    """Fraction of the quality gap recovered on the calibration rows (labelled data only)."""


def confidence_threshold_for_rate(confidence: Sequence[float], target_rate: float) -> CascadeCalibration:
    """Cascade threshold that escalates `target_rate` (0..1) of these answers (the least confident)."""
    if not 0.0 <= target_rate <= 1.0:
        raise ValueError(f"target escalation rate must be within [0, 1], got {target_rate}")
    c = np.sort(np.asarray(confidence, dtype=float))
    if len(c) == 0:
        raise ValueError("no confidences to calibrate on")
    # ascending confidences are descending scores 1 - c: reuse the tie-aware cut
    k = _nearest_cut(1.0 - c, int(round(target_rate * len(c))))
    t = _cut(c, k, rule="<")
    return CascadeCalibration(t, float(np.mean(c < t)))


def confidence_threshold_for_pgr(confidence: Sequence[float], strong: Sequence[float], weak: Sequence[float],
                                 target_pgr: float) -> CascadeCalibration:
    """Lowest escalation rate whose threshold recovers at least `target_pgr` of the gap on these rows."""
    c = np.asarray(confidence, dtype=float)
    cal = threshold_for_pgr(1.0 - c, strong, weak, target_pgr)
    k = int(round(cal.strong_share * len(c)))
    t = _cut(np.sort(c), k, rule="<")
    escalated = c < t
    strong, weak = np.asarray(strong, dtype=float), np.asarray(weak, dtype=float)
    pgr = (np.where(escalated, strong, weak).mean() - weak.mean()) / (strong.mean() - weak.mean())
    return CascadeCalibration(t, float(escalated.mean()), float(pgr))


Z95_TWO_SIDED = 1.959963984540054
Z95_ONE_SIDED = 1.6448536269514722


@dataclass(frozen=True)
class QualityBound:
    """The cascade threshold that keeps quality within `max_loss` points of the strong model's, at 95%."""

    threshold: float
    escalation_rate: float
    """Share of the calibration answers it escalates: what the bound costs."""
    loss: float
    """Quality lost against the strong model on the calibration rows (points; negative: better)."""
    loss_upper: float
    """One-sided 95% upper bound of that loss (points)."""
    max_loss: float
    met: bool
    """False when even escalating every answer cannot show the bound (then the threshold escalates all)."""


def confidence_threshold_for_quality_loss(confidence: Sequence[float], strong: Sequence[float],
                                          weak: Sequence[float], max_loss: float) -> QualityBound:
    """The lowest escalation rate whose quality is within `max_loss` points of the strong model's with 95%
    confidence. A kept answer loses (strong − weak) on its row; the loss's upper bound is its mean plus 1.645
    standard errors of the paired per-row differences (the normal approximation to their bootstrap)."""
    if max_loss < 0:
        raise ValueError(f"--max-quality-loss must be >= 0 points, got {max_loss}")
    c, strong, weak = (np.asarray(a, dtype=float) for a in (confidence, strong, weak))
    if not len(c):
        raise ValueError("no confidences to calibrate on")
    order = np.argsort(c, kind="stable")
    c_sorted, gain = c[order], (strong - weak)[order]
    n = len(c)
    cuttable = np.r_[True, c_sorted[1:] > c_sorted[:-1], True]  # escalate the k least confident, k = 0..n
    # loss when the k least confident escalate: the kept rows' differences (sum, sum of squares) from the top
    kept_sum = np.r_[np.cumsum(gain[::-1])[::-1], 0.0]
    kept_sq = np.r_[np.cumsum((gain ** 2)[::-1])[::-1], 0.0]
    mean = kept_sum / n
    sd = np.sqrt(np.maximum(kept_sq / n - mean ** 2, 0.0))
    upper = (mean + Z95_ONE_SIDED * sd / np.sqrt(n)) * 100
    ok = np.flatnonzero(cuttable & (upper <= max_loss + 1e-12))
    k = int(ok[0]) if len(ok) else n
    t = _cut(c_sorted, k, rule="<")
    escalated = c < t
    return QualityBound(t, float(escalated.mean()), float(mean[k] * 100), float(upper[k]), float(max_loss),
                        bool(len(ok)))


def rate_interval(rate: float, n_calibration: int, n_held_out: int, level_z: float = Z95_TWO_SIDED
                  ) -> tuple[float, float]:
    """Where a held-out escalation rate should fall (95%) when the threshold was cut for `rate` on
    `n_calibration` answers and is checked on `n_held_out` others: the calibration's own sampling error plus
    the held-out set's, rate·(1 − rate)·(1/n_cal + 1/n_held), normal approximation, clipped to [0, 1]."""
    if n_calibration < 1 or n_held_out < 1:
        raise ValueError("rate_interval needs at least one calibration and one held-out answer")
    half = level_z * np.sqrt(max(rate * (1 - rate), 1e-12) * (1 / n_calibration + 1 / n_held_out))
    return float(max(0.0, rate - half)), float(min(1.0, rate + half))
