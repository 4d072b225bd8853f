"""What serving records for drift: the calibrated target gauge, a counter per cascade decision, and the
threshold each logged confidence was compared with."""

from __future__ import annotations

import time
from dataclasses import replace

from router.types import RouteDecision
from serving.cascade import CascadeTrace, TierAttempt, cascade_policy
from serving.config import parse_config
from serving.ingress.app import Recorder
from serving.ingress.learning import Ticket
from serving.ingress.plan import Outcome
from serving.metrics import Metrics
from serving.querylog import read_records


def recorder_config(tmp_path):
    tier = {"engine": {"kv_cache_memory_bytes": 268435456}}
    return parse_config({
        "query_log": {"path": str(tmp_path / "querylog")},
        "tiers": [{"name": "small", "model": "m1", **tier}, {"name": "large", "model": "m2", **tier}],
        "cascade": {"enabled": True, "tier_thresholds": {"small": 0.6},
                    "tier_target_escalation_rates": {"small": 0.3}},
    }, "test")


def _recorder(tmp_path) -> tuple[Recorder, Metrics]:
    metrics = Metrics()
    return Recorder(recorder_config(tmp_path), metrics, sessions=None), metrics


def _value(metrics: Metrics, name: str, **labels) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_target_gauge_is_set_from_config_at_start(tmp_path):
    _, metrics = _recorder(tmp_path)
    assert _value(metrics, "tierserve_cascade_escalation_target", tier="small") == 0.3
    assert _value(metrics, "tierserve_cascade_escalation_target", tier="large") is None  # top tier: never scored


def test_each_decision_is_counted_and_logged_with_its_threshold(tmp_path):
    recorder, metrics = _recorder(tmp_path)
    policy = cascade_policy(recorder_config(tmp_path).cascade, ["small", "large"], routed=True)
    for i, (confidence, up) in enumerate([(0.31, True), (0.9, False), (0.75, False)]):
        placed = Outcome(RouteDecision("small", 0, "knn", 0.2, (0.5,), "test"), "small")
        attempts = [TierAttempt("small", 10, 3, confidence, up)]
        if up:
            attempts.append(TierAttempt("large", 10, 5, None, False))
        trace = CascadeTrace(tuple(attempts), "low_confidence" if up else "confident")
        outcome = replace(placed, trace=trace, cascade_thresholds=policy.thresholds)
        recorder.record(Ticket(str(i), "chat", time.perf_counter()), outcome, 200)
    assert _value(metrics, "tierserve_cascade_decisions_total", tier="small", outcome="escalated") == 1
    assert _value(metrics, "tierserve_cascade_decisions_total", tier="small", outcome="kept") == 2
    assert _value(metrics, "tierserve_cascade_decisions_total", tier="large", outcome="kept") is None
    recorder.close()
    decisions = [d for r in read_records(recorder.query_log.directory) for d in r.cascade_decisions()]
    assert [(d.tier, d.confidence, d.threshold, d.escalated) for d in decisions] == [
        ("small", 0.31, 0.6, True), ("small", 0.9, 0.6, False), ("small", 0.75, 0.6, False)]


def test_a_stream_whose_escalation_is_refused_keeps_its_trace(tmp_path):
    """The large tier refuses the escalated stream before its first event: the 429/503 the client gets, the
    metrics and the query log still say the small tier answered, was unsure, and escalated."""
    import asyncio

    import pytest

    from serving.channel.errors import Overloaded
    from tests.unit.test_cascade_run import REQUEST, Stack, policy

    async def main():
        async with Stack(limits={"large": 1}) as stack:
            stack.channel.has_room = lambda tier: True  # it looked free when the cascade decided, then filled up
            blocker = await stack.channel.open("large", REQUEST)
            stream = stack.runner.stream(REQUEST, policy(), 0)
            try:
                with pytest.raises(Overloaded):
                    await anext(aiter(stream))
            finally:
                await blocker.aclose()
            return stream.trace

    trace = asyncio.run(main())
    recorder, metrics = _recorder(tmp_path)
    placed = Outcome(RouteDecision("small", 0, "knn", 0.2, (0.5,), "test"), "small", trace=trace,
                     cascade_thresholds=(0.6, 0.0))
    recorder.record(Ticket("r1", "completions", time.perf_counter()), placed, 503)
    assert trace.tier_chain == ("small",) and trace.escalated
    assert _value(metrics, "tierserve_cascade_decisions_total", tier="small", outcome="escalated") == 1
    recorder.close()
    [record] = read_records(recorder.query_log.directory)
    assert record.escalated and record.status == "rejected" and record.tier_chain == ("small",)
