"""Online recalibration of a cascade threshold from the decisions the query log records.

A threshold calibrated on a few hundred labelled rows misses its escalation-rate target on live traffic by
several points (sampling alone gives about ±5 points at n = 300). Live traffic logs every cascade decision's
confidence, so the threshold can be re-cut from them: every `every` decisions, the threshold that would have
escalated `target_rate` of the last `window` logged confidences. No labels are needed; the rate converges to
the target as decisions accumulate (±2 points once about 2,000 are logged, `tierserve replay` shows it).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from router.eval.calibrate import confidence_threshold_for_rate


@dataclass
class Recalibrator:
    """Keeps one tier's cascade threshold at its escalation-rate target; feed it every logged confidence."""

    target_rate: float
    threshold: float
    """The threshold in force (starts at the offline calibration's)."""
    window: int = 5000
    """Latest decisions the threshold is cut from."""
    every: int = 100
    """Decisions between two re-cuts."""
    min_decisions: int = 200
    """Decisions logged before the first re-cut (until then the offline threshold stands)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.target_rate <= 1.0:
            raise ValueError(f"target_rate ({self.target_rate}) must be within [0, 1].")
        self._recent: deque[float] = deque(maxlen=self.window)
        self._since = 0

    @property
    def logged(self) -> int:
        return len(self._recent)

    def observe(self, confidence: float) -> float | None:
        """Log one decision's confidence; returns the new threshold when it was re-cut, else None."""
        self._recent.append(float(confidence))
        self._since += 1
        if len(self._recent) < self.min_decisions or self._since < self.every:
            return None
        self._since = 0
        self.threshold = confidence_threshold_for_rate(list(self._recent), self.target_rate).threshold
        return self.threshold
