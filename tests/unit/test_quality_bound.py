"""Calibrating a cascade to a quality bound, the interval a held-out escalation rate should fall in (checked
by resampling: it must hold about 95% of the time), and online recalibration from logged decisions (within
±2 points once 2,000 are logged, replayed on plaut-msp's confidences in file order)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from router.eval.calibrate import (
    confidence_threshold_for_quality_loss,
    confidence_threshold_for_rate,
    rate_interval,
)
from router.eval.replay import recalibration_check

PLAUT = Path(__file__).resolve().parents[3] / "shared" / "data" / "cascades" / "plaut-msp" / "llama3_8b_to_70b.jsonl"


def _rows() -> list[dict]:
    if not PLAUT.is_file():
        pytest.skip(f"{PLAUT} is not there (shared routing data)")
    return [json.loads(line) for line in PLAUT.open()]


def _synthetic(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    weak = (rng.random(n) < 0.55).astype(float)
    strong = np.where(weak == 1, rng.random(n) < 0.9, rng.random(n) < 0.6).astype(float)
    conf = np.clip(rng.beta(2 + 3 * weak, 2), 1e-4, 1 - 1e-4)
    return conf, strong, weak


def test_the_bound_is_the_cheapest_threshold_that_shows_it() -> None:
    rng = np.random.default_rng(0)
    conf, strong, weak = _synthetic(3000, rng)
    bound = confidence_threshold_for_quality_loss(conf, strong, weak, 2.0)
    assert bound.met and bound.loss_upper <= 2.0 and 0 < bound.escalation_rate < 1
    escalated = conf < bound.threshold
    assert bound.escalation_rate == pytest.approx(escalated.mean())
    assert bound.loss == pytest.approx((strong.mean() - np.where(escalated, strong, weak).mean()) * 100)
    looser = confidence_threshold_for_quality_loss(conf, strong, weak, 5.0)
    assert looser.escalation_rate < bound.escalation_rate  # a looser bound costs fewer escalations
    # on fresh rows from the same traffic, the loss stays within the bound nearly always
    fresh_losses = []
    for _ in range(200):
        c, s, w = _synthetic(3000, rng)
        fresh_losses.append((s.mean() - np.where(c < bound.threshold, s, w).mean()) * 100)
    assert np.mean(np.array(fresh_losses) <= 2.0) >= 0.9


def test_the_printed_interval_holds_about_95_percent_of_the_time() -> None:
    rows = _rows()
    pool = np.array([r["weak_confidence"] for r in rows])
    rng = np.random.default_rng(1)
    hits = []
    for _ in range(400):
        idx = rng.permutation(len(pool))
        cal, held = pool[idx[:300]], pool[idx[300:1831]]
        c = confidence_threshold_for_rate(cal, 0.3)
        lo, hi = rate_interval(c.escalation_rate, len(cal), len(held))
        hits.append(lo <= np.mean(held < c.threshold) <= hi)
    coverage = float(np.mean(hits))
    assert 0.91 <= coverage <= 0.99, coverage


def test_online_recalibration_keeps_the_rate_within_two_points_after_2000_decisions() -> None:
    rows = _rows()
    train = np.array([r["weak_confidence"] for r in rows if r["split"] == "train"])
    stream = np.array([r["weak_confidence"] for r in rows])  # file order: MMLU, then TruthfulQA
    initial = confidence_threshold_for_rate(train[:300], 0.3).threshold  # a small offline calibration
    check = recalibration_check(stream, 0.3, initial)
    assert abs(check["rate_after"] - 0.3) <= 0.02, check
    # every 500 decisions within 5 points while the traffic stays MMLU; the last window is TruthfulQA, whose
    # confidences differ (14.6% there): a shift the drift alert is for, which the cumulative rate absorbs
    assert all(abs(r - 0.3) <= 0.05 for r in check["window_rates"][:-1]), check
    frozen = np.mean(stream[2000:] < initial)
    print(f"rate after 2000 decisions: recalibrated {check['rate_after']:.3f}, frozen offline threshold {frozen:.3f}")
