"""RouteLLM metrics against hand-computed curves, and against RouteLLM's own loop on random scores."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from router.eval import metrics as m

SCORES = np.array([0.1, 0.2, 0.3, 0.4])


def test_two_bin_sweep_matches_hand_computed_points():
    # edges 0.1, 0.25, 0.4 → 100% strong (>= 0.1), 50% (>= 0.25), 0% (> 0.4)
    curve = m.threshold_sweep(SCORES, strong=[1, 0, 1, 1], weak=[1, 0, 0, 0], num_bins=2)
    assert curve.points() == [[0.0, 25.0], [50.0, 75.0], [100.0, 75.0]]
    assert curve.monotone
    assert m.cpt(curve, 0.5, 75.0, 25.0) == pytest.approx(25.0)
    assert m.cpt(curve, 0.8, 75.0, 25.0) == pytest.approx(40.0)
    assert m.auc(curve) == pytest.approx(62.5)
    assert m.apgr(curve, 75.0, 25.0) == pytest.approx(0.75)


def test_non_monotone_curve_uses_first_crossing():
    # points (0,25) (25,0) (50,25) (75,50) (100,75): quality dips after the first strong calls
    curve = m.threshold_sweep(SCORES, strong=[1, 1, 1, 0], weak=[0, 0, 0, 1], num_bins=4)
    assert curve.points() == [[0.0, 25.0], [25.0, 0.0], [50.0, 25.0], [75.0, 50.0], [100.0, 75.0]]
    assert not curve.monotone
    assert m.cpt(curve, 0.5, 75.0, 25.0) == pytest.approx(75.0)
    assert m.cpt(curve, 0.2, 75.0, 25.0) == pytest.approx(60.0)
    assert m.auc(curve) == pytest.approx(31.25)
    assert m.apgr(curve, 75.0, 25.0) == pytest.approx(0.125)


def test_non_monotone_eleven_point_curve_differs_from_np_interp():
    # a decile curve that wanders: the target 50 is first reached between 30% (45) and 40% (64)
    quality = np.array([25.0, 38, 28, 45, 64, 33, 23, 42, 31, 25, 75])
    curve = m.Curve(np.linspace(0.0, 100.0, 11), quality)
    assert not curve.monotone
    assert m.cpt(curve, 0.5, 75.0, 25.0) == pytest.approx(30.0 + 10.0 * 5.0 / 19.0)
    # RouteLLM's np.interp assumes sorted quality; its binary search lands on the last segment here
    assert np.interp(50.0, curve.quality, curve.strong_pct) == pytest.approx(95.0)


def test_target_already_met_and_never_met():
    curve = m.Curve(np.array([0.0, 50.0, 100.0]), np.array([60.0, 70.0, 80.0]))
    assert m.calls_to_reach(curve, 55.0) == 0.0
    assert np.isnan(m.calls_to_reach(curve, 81.0))


def test_summary_cost_saved_at_95_percent_of_strong():
    curve = m.Curve(np.array([0.0, 50.0, 100.0]), np.array([25.0, 75.0, 75.0]))
    s = m.summarize(curve, 75.0, 25.0, cost_ratio=0.1)
    assert s.strong_pct_at_95 == pytest.approx(46.25)  # 0.95 * 75 = 71.25 on the first segment
    assert s.cost_saved_at_95 == pytest.approx(1 - (0.4625 + 0.5375 * 0.1))
    weak_good_enough = m.summarize(curve, 26.0, 25.0)
    assert weak_good_enough.strong_pct_at_95 == 0.0 and weak_good_enough.cost_saved_at_95 == 1.0


def test_oracle_binary_and_judge_scores():
    strong, weak = np.array([1, 1, 0, 1]), np.array([0, 1, 0, 0])
    assert m.optimal_quality(strong, weak, 0.0) == pytest.approx(25.0)
    assert m.optimal_quality(strong, weak, 0.25) == pytest.approx(50.0)
    assert m.optimal_quality(strong, weak, 0.375) == pytest.approx(62.5)
    assert m.optimal_quality(strong, weak, 1.0) == pytest.approx(75.0)
    # judge scores: only the positive gain counts; a weak win is kept by not routing it
    assert m.optimal_quality([0.9, 0.8], [0.5, 0.9], 0.5) == pytest.approx(90.0)
    curve = m.oracle_curve(strong, weak, steps=4)
    assert curve.points() == [[0.0, 25.0], [25.0, 50.0], [50.0, 75.0], [75.0, 75.0], [100.0, 75.0]]


def _routellm_reference(scores, strong, weak):
    """RouteLLM's Benchmark.evaluate + generate_results, transcribed."""
    _, thresholds = pd.qcut(scores, 10, retbins=True)
    rows = []
    for i, t in enumerate(thresholds):
        sel = scores >= t if i != len(thresholds) - 1 else scores > t
        rows.append((sel.mean() * 100, np.where(sel, strong, weak).mean() * 100))
    df = pd.DataFrame(rows, columns=["pct", "acc"]).sort_values("pct")
    s, w = strong.mean() * 100, weak.mean() * 100
    cpt50 = np.interp(0.5 * (s - w) + w, df["acc"], df["pct"])
    auc = np.trapezoid(df["acc"], df["pct"] / 100)
    return df, cpt50, auc, (auc - w) / (s - w)


def test_matches_routellm_on_a_monotone_random_case():
    rng = np.random.default_rng(3)
    weak = (rng.random(2000) < 0.6).astype(float)
    strong = np.maximum(weak, rng.random(2000) < 0.5).astype(float)
    scores = (strong - weak) * 0.3 + rng.random(2000)  # informative, so the curve rises
    df, cpt50, auc, apgr = _routellm_reference(scores, strong, weak)
    curve = m.threshold_sweep(scores, strong, weak)
    assert curve.monotone
    np.testing.assert_allclose(curve.strong_pct, df["pct"])
    np.testing.assert_allclose(curve.quality, df["acc"])
    s, w = strong.mean() * 100, weak.mean() * 100
    summary = m.summarize(curve, s, w)
    assert summary.cpt50 == pytest.approx(cpt50)
    assert summary.auc == pytest.approx(auc)
    assert summary.apgr == pytest.approx(apgr)
    assert summary.cpt50 < 45.0  # an informative router beats random's ~50%


def test_duplicate_scores_drop_bins_instead_of_failing():
    scores = np.array([0.0] * 8 + [1.0, 2.0])
    curve = m.threshold_sweep(scores, np.ones(10), np.zeros(10))
    assert curve.points()[0] == [0.0, 0.0] and curve.points()[-1] == [100.0, 100.0]
    assert len(curve.strong_pct) < 11


def test_constant_scores_give_one_point_and_no_apgr():
    curve = m.threshold_sweep(np.full(5, 0.5), np.ones(5), np.zeros(5))
    assert len(curve.strong_pct) == 1
    assert np.isnan(m.apgr(curve, 100.0, 0.0))
