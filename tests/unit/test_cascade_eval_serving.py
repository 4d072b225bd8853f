"""What serving records for drift: the calibrated target gauge, a counter per cascade decision, and the
threshold each logged confidence was compared with."""

from __future__ import annotations

import time
from dataclasses import replace
from types import SimpleNamespace

from router.types import RouteDecision
from serving.cascade import CascadeTrace, TierAttempt
from serving.config import parse_config
from serving.ingress.outcome import Outcome
from serving.ingress.pipeline import Pipeline
from serving.ingress.protocol import TierserveOptions
from serving.querylog import read_records
from serving.metrics import Metrics


def _pipeline(tmp_path) -> tuple[Pipeline, Metrics]:
    tier = {"engine": {"kv_cache_memory_bytes": 268435456}}
    config = parse_config({
        "query_log": {"path": str(tmp_path / "querylog")},
        "tiers": [{"name": "small", "model": "m1", **tier}, {"name": "large", "model": "m2", **tier}],
        "cascade": {"enabled": True, "tier_thresholds": {"small": 0.6},
                    "tier_target_escalation_rates": {"small": 0.3}},
    }, "test")
    metrics = Metrics()
    return Pipeline(config, tiers=SimpleNamespace(), metrics=metrics), metrics


def _value(metrics: Metrics, name: str, **labels) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_target_gauge_is_set_from_config_at_start(tmp_path):
    _, metrics = _pipeline(tmp_path)
    assert _value(metrics, "tierserve_cascade_escalation_target", tier="small") == 0.3
    assert _value(metrics, "tierserve_cascade_escalation_target", tier="large") is None  # top tier: never scored


def test_each_decision_is_counted_and_logged_with_its_threshold(tmp_path):
    pipeline, metrics = _pipeline(tmp_path)
    for i, (confidence, up) in enumerate([(0.31, True), (0.9, False), (0.75, False)]):
        placed = Outcome.routed(RouteDecision("small", 0, "knn", 0.2, (0.5,), "test"))
        policy = pipeline._policy(placed, TierserveOptions())
        attempts = [TierAttempt("small", 10, 3, confidence, up)]
        if up:
            attempts.append(TierAttempt("large", 10, 5, None, False))
        trace = CascadeTrace(tuple(attempts), "low_confidence" if up else "confident")
        outcome = replace(placed, trace=trace, cascade_thresholds=policy.thresholds)
        pipeline.record("chat", outcome, 200, time.perf_counter(), request_id=str(i))
    assert _value(metrics, "tierserve_cascade_decisions_total", tier="small", outcome="escalated") == 1
    assert _value(metrics, "tierserve_cascade_decisions_total", tier="small", outcome="kept") == 2
    assert _value(metrics, "tierserve_cascade_decisions_total", tier="large", outcome="kept") is None
    pipeline.query_log.close()
    decisions = [d for r in read_records(pipeline.query_log.directory) for d in r.cascade_decisions()]
    assert [(d.tier, d.confidence, d.threshold, d.escalated) for d in decisions] == [
        ("small", 0.31, 0.6, True), ("small", 0.9, 0.6, False), ("small", 0.75, 0.6, False)]
