"""Cascade evaluation: the curve against a hand computation, honest cost, combined policies, intervals,
the simpler-router rule and cascade calibration."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from router.eval import metrics
from router.eval.bootstrap import choose_router, interval, resample_indices, resampled
from router.eval.calibrate import (
    confidence_threshold_for_pgr,
    confidence_threshold_for_rate,
    discreteness_warning,
    threshold_for_share,
)
from router.eval.cascade import BandPolicy, confidence_cascade, tune_band
from router.eval.datasets import default_data_dir, load_dataset
from router.eval.runner import evaluate

PLAUT = default_data_dir() / "cascades" / "plaut-msp" / "llama3_8b_to_70b.jsonl"
needs_plaut = pytest.mark.skipif(not PLAUT.is_file(), reason=f"plaut-msp data not found at {PLAUT}")


def _hand_cpt50_deciles(conf: np.ndarray, strong: np.ndarray, weak: np.ndarray) -> float:
    """RouteLLM's recipe written out with numpy only: escalation score 1 - confidence, thresholds at its
    deciles, strong when score >= t (> for the top edge), then linear interpolation to half the gap."""
    score = 1.0 - conf
    edges = np.unique(np.quantile(score, np.linspace(0, 1, 11)))
    points = []
    for i, t in enumerate(edges):
        sel = score > t if i == len(edges) - 1 else score >= t
        points.append((sel.mean() * 100, np.where(sel, strong, weak).mean() * 100))
    points.sort()
    x, y = np.array(points).T
    target = weak.mean() * 100 + 0.5 * (strong.mean() - weak.mean()) * 100
    j = np.flatnonzero((y[:-1] < target) & (y[1:] >= target))[0]
    return float(x[j] + (target - y[j]) * (x[j + 1] - x[j]) / (y[j + 1] - y[j]))


def _hand_cpt50_ranked(conf: np.ndarray, strong: np.ndarray, weak: np.ndarray) -> float:
    """The dataset README's check: escalate the least confident first, one query at a time."""
    order = np.argsort(conf, kind="stable")
    gains = np.cumsum((strong - weak)[order])
    pgr = gains / (strong.sum() - weak.sum())
    return float((np.argmax(pgr >= 0.5) + 1) / len(conf) * 100)


@needs_plaut
def test_cascade_curve_matches_a_hand_computation_on_plaut_msp():
    raw = pd.read_json(PLAUT, lines=True)
    test = raw[raw["split"] == "test"]
    conf, strong, weak = (test[c].to_numpy(float) for c in ("weak_confidence", "strong", "weak"))
    hand = _hand_cpt50_deciles(conf, strong, weak)

    report = evaluate(load_dataset("plaut-msp", default_data_dir()), ["cascade"], None, progress=False, n_boot=50)
    harness = report.routers["cascade"]
    assert report.n_test == len(test) == 1947
    assert harness.cpt50 == pytest.approx(hand, abs=1e-6)
    # the decile curve and the README's query-by-query ranking agree to within a point (README: 34.8%)
    assert harness.cpt50 == pytest.approx(_hand_cpt50_ranked(conf, strong, weak), abs=1.0)
    assert harness.apgr == pytest.approx(0.626, abs=0.01)
    assert harness.ci["cpt50"][0] < harness.cpt50 < harness.ci["cpt50"][1]
    assert not harness.like_random


def test_a_cascade_pays_the_weak_call_on_every_query():
    rng = np.random.default_rng(0)
    conf = rng.random(400)
    weak = (rng.random(400) < conf).astype(float)
    strong = np.ones(400)
    out = confidence_cascade(conf)
    curve = metrics.threshold_sweep(out.score, strong, weak, strong_cost=np.full(400, 2.0),
                                    weak_cost=np.full(400, 0.5), weak_first=out.weak_first)
    assert curve.strong_pct[0] == 0.0 and curve.cost[0] == pytest.approx(25.0)  # 0.5/2.0 of all-strong
    assert curve.strong_pct[-1] == 100.0 and curve.cost[-1] == pytest.approx(125.0)  # both calls on all
    router = metrics.threshold_sweep(out.score, strong, weak, strong_cost=np.full(400, 2.0),
                                     weak_cost=np.full(400, 0.5))
    assert router.cost[-1] == pytest.approx(100.0)
    # without cost columns: the ratio per call, the cascade's weak call always counted
    s = metrics.summarize(metrics.Curve(np.array([0.0, 100.0]), np.array([50.0, 100.0])), 100.0, 50.0,
                          cost_ratio=0.1, kind="cascade")
    assert s.cpt50 == pytest.approx(50.0) and s.cost_at_cpt50 == pytest.approx(60.0)
    r = metrics.summarize(metrics.Curve(np.array([0.0, 100.0]), np.array([50.0, 100.0])), 100.0, 50.0,
                          cost_ratio=0.1)
    assert r.cost_at_cpt50 == pytest.approx(55.0)


def test_band_policy_sends_the_hard_straight_up_and_keeps_the_easy():
    router = np.array([0.95, 0.9, 0.5, 0.5, 0.1])
    conf = np.array([0.99, 0.2, 0.9, 0.3, 0.01])
    out = BandPolicy(low=0.2, high=0.85).apply(router, conf)
    order = np.argsort(-out.score)
    assert order.tolist() == [0, 1, 3, 2, 4]  # hard by router score, band by confidence, easy last
    assert out.weak_first.tolist() == [False, False, True, True, True]


def test_band_tuning_finds_a_useful_router():
    rng = np.random.default_rng(1)
    n = 3000
    topic_hard = rng.random(n) < 0.3  # the router sees the topic, the confidence sees the answer
    weak = (rng.random(n) < np.where(topic_hard, 0.2, 0.8)).astype(float)
    strong = np.maximum(weak, rng.random(n) < 0.7).astype(float)
    conf = np.clip(0.5 + 0.3 * (weak - 0.5) + rng.normal(0, 0.25, n), 0, 1)
    router = np.clip(np.where(topic_hard, 0.8, 0.3) + rng.normal(0, 0.1, n), 0, 1)
    tuned = tune_band(router, conf, strong, weak)
    plain = metrics.apgr(metrics.threshold_sweep(1 - conf, strong, weak), strong.mean() * 100, weak.mean() * 100)
    assert tuned.cv_apgr > plain + 0.02
    assert tuned.policy.high < np.inf


def test_bootstrap_interval_and_random_scores():
    rng = np.random.default_rng(2)
    weak = (rng.random(600) < 0.5).astype(float)
    strong = np.maximum(weak, rng.random(600) < 0.5).astype(float)
    idx = resample_indices(600, 100)
    noise = interval(resampled(rng.random(600), strong, weak, idx)["apgr"])
    assert noise[0] < 0.5 < noise[1]
    informative = interval(resampled(strong - weak + rng.random(600), strong, weak, idx)["apgr"])
    assert informative[0] > 0.6


def test_choose_the_simpler_router_when_cross_validation_cannot_beat_it():
    assert choose_router({"heuristic": 0.60, "knn": 0.58, "classifier": 0.59}).router == "heuristic"
    assert choose_router({"heuristic": 0.55, "knn": 0.66}).router == "knn"
    chosen = choose_router({"heuristic": 0.51, "knn": 0.52}, train_apgr_ci={"knn": (0.49, 0.55)})
    assert chosen.router == "random" and "not distinguishable from random" in chosen.reason


def test_cascade_threshold_for_a_rate_and_for_quality():
    conf = np.random.default_rng(3).random(1000)
    cal = confidence_threshold_for_rate(conf, 0.3)
    assert cal.escalation_rate == pytest.approx(0.3) and np.mean(conf < cal.threshold) == pytest.approx(0.3)
    weak = (conf > 0.5).astype(float)
    strong = np.ones(1000)
    q = confidence_threshold_for_pgr(conf, strong, weak, 0.5)
    assert q.pgr >= 0.5 and q.escalation_rate == pytest.approx(0.25, abs=0.002)


def test_discrete_scores_get_the_nearest_share_and_a_warning():
    # kNN with k=10 and uniform weights: scores are multiples of 0.05 with big ties
    rng = np.random.default_rng(4)
    scores = rng.binomial(10, 0.35, 2000) / 10 * 0.5 + 0.25
    cal = threshold_for_share(scores, 0.3)
    values = np.unique(scores)
    achievable = [np.mean(scores >= v) for v in values]
    assert abs(cal.strong_share - 0.3) == pytest.approx(min(abs(a - 0.3) for a in achievable))
    message = discreteness_warning(cal.strong_share, 0.3, scores)
    assert cal.strong_share != pytest.approx(0.3, abs=0.02) and "too discrete" in message
    assert discreteness_warning(0.305, 0.3, scores) is None


def test_results_json_names_cascades_next_to_routers(tmp_path):
    from router.eval.datasets import LabelledSet
    from router.eval.report import write_report

    rng = np.random.default_rng(5)
    n = 400
    conf = rng.random(n)
    weak = (rng.random(n) < conf).astype(float)
    frame = pd.DataFrame({"prompt": [f"question {i}" for i in range(n)], "weak": weak,
                          "strong": np.maximum(weak, rng.random(n) < 0.6).astype(float),
                          "split": np.where(np.arange(n) % 3 == 0, "test", "train"), "weak_confidence": conf})
    ds = LabelledSet("toy", frame, confidence_kind="prob")
    report = evaluate(ds, ["random", "heuristic", "cascade", "cascade+heuristic"], None, progress=False,
                      cost_ratio=0.1, n_boot=50)
    json_path, png_path = write_report(report, tmp_path)
    data = json.loads(json_path.read_text())
    assert set(data["routers"]) == {"random", "heuristic", "cascade", "cascade+heuristic"}
    assert data["routers"]["cascade"]["kind"] == "cascade" and data["routers"]["random"]["kind"] == "router"
    assert data["weak_confidence_kind"] == "prob" and "0.1" in data["cost_basis"]
    assert data["routers"]["cascade"]["apgr"] > 0.6  # confidence predicts the weak model's errors here
    assert "cascade+heuristic vs cascade" in data["comparisons"]
    lo, hi = data["routers"]["cascade"]["ci95"]["apgr"]
    assert lo < data["routers"]["cascade"]["apgr"] < hi
    assert png_path.read_bytes().startswith(b"\x89PNG")


def test_learned_escalation_reads_the_prompt_beside_the_confidence():
    from router.eval.cascade import tune_learned

    rng = np.random.default_rng(6)
    n = 1500
    topic = rng.integers(0, 4, n)  # topic 3: the strong model is right, the weak one mostly not
    vectors = np.eye(4)[topic] + rng.normal(0, 0.05, (n, 4))
    weak = (rng.random(n) < np.where(topic == 3, 0.3, 0.7)).astype(float)
    strong = np.where(topic == 3, 1.0, (rng.random(n) < 0.7).astype(float))
    conf = np.clip(0.4 + 0.3 * weak + rng.normal(0, 0.2, n), 0.01, 0.99)
    plain = metrics.apgr(metrics.threshold_sweep(1 - conf, strong, weak), strong.mean() * 100, weak.mean() * 100)
    tuned = tune_learned(vectors, conf, strong, weak)
    assert tuned.cv_apgr > plain + 0.05
    assert tuned.model.form in ("difficulty", "gain") and len(tuned.oof_scores) == n
