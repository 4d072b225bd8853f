"""A cascade threshold chosen on one part of the confidences and checked on the other: labelled data (train
to choose, test to check) or the confidences the query log recorded (older to choose, the latest to check).
`tierserve calibrate --cascade` reads the data and writes the threshold into the config."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from router.eval import calibrate
from router.eval.calibrate import CascadeCalibration


@dataclass(frozen=True)
class CascadeCheck:
    """A cascade threshold chosen on one part of the data and what it does on the held-out part."""

    tier: str
    calibration: CascadeCalibration
    n_calibration: int
    target_rate: float
    """The escalation rate asked for (with a quality target: the rate that reached it on calibration data)."""
    held_out_rate: float
    n_held_out: int
    held_out_pgr: float | None = None
    warning: str | None = None
    """Set when ties in the calibration confidences keep the rate more than 2 points from the target."""

    @property
    def within_tolerance(self) -> bool:
        return abs(self.held_out_rate - self.target_rate) <= calibrate.TOLERANCE


def check_labelled(train_conf: np.ndarray, test_conf: np.ndarray, *, tier: str, target_rate: float | None = None,
                   target_pgr: float | None = None, train_quality: tuple[np.ndarray, np.ndarray] | None = None,
                   test_quality: tuple[np.ndarray, np.ndarray] | None = None) -> CascadeCheck:
    """Calibrate on train confidences, check on test. Quality pairs are (strong, weak) per row."""
    if target_pgr is not None:
        strong, weak = train_quality
        cal = calibrate.confidence_threshold_for_pgr(train_conf, strong, weak, target_pgr)
        target = cal.escalation_rate
    else:
        cal = calibrate.confidence_threshold_for_rate(train_conf, target_rate)
        target = target_rate
    warning = calibrate.discreteness_warning(cal.escalation_rate, target, train_conf)
    escalated = np.asarray(test_conf, dtype=float) < cal.threshold
    pgr = None
    if test_quality is not None and len(escalated):
        strong, weak = (np.asarray(a, dtype=float) for a in test_quality)
        gap = strong.mean() - weak.mean()
        pgr = float((np.where(escalated, strong, weak).mean() - weak.mean()) / gap) if gap else None
    rate = float(escalated.mean()) if len(escalated) else float("nan")
    return CascadeCheck(tier, cal, len(train_conf), target, rate, len(escalated), pgr, warning)
