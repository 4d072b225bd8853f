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
from serving.metrics import Metrics
from serving.querylog import read_records


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
        placed = Outcome.unmoved(RouteDecision("small", 0, "knn", 0.2, (0.5,), "test"))
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


def test_a_stream_whose_escalation_is_refused_keeps_its_trace(tmp_path):
    """The large tier refuses the escalated stream before its first event: the 429/503 the client gets, the
    metrics and the query log still say the small tier answered, was unsure, and escalated."""
    import asyncio

    import pytest

    from serving.channel.calls import TierCalls
    from serving.channel.errors import Overloaded
    from serving.ingress.cascade_run import CascadeRunner
    from serving.ingress.pipeline import StreamFormat
    from serving.types import (
        GenerationChunk,
        GenerationRequest,
        SamplingOptions,
        TokenLogprob,
    )

    class RefusingLarge(TierCalls):
        def __init__(self) -> None:  # no TierClient, no admission: scripted
            pass

        def has_room(self, tier: str) -> bool:
            return True

        async def stream(self, tier: str, request: GenerationRequest):
            if tier == "large":
                raise Overloaded.make("large is full", retry_after_s=1)
            for i in range(4):
                yield GenerationChunk(text=f"t{i}", token_logprobs=(TokenLogprob(f"t{i}", -2.0),), num_new_tokens=1,
                                      finish_reason="length" if i == 3 else None, prompt_tokens=3,
                                      completion_tokens=i + 1)

    pipeline, metrics = _pipeline(tmp_path)
    pipeline.cascade = CascadeRunner(["small", "large"], RefusingLarge())
    request = GenerationRequest(request_id="r1", sampling=SamplingOptions(max_tokens=4), prompt="q")
    placed = Outcome.unmoved(RouteDecision("small", 0, "knn", 0.2, (0.5,), "test"))
    stream = pipeline.stream(request, placed, TierserveOptions(), StreamFormat("completions", "auto", False))
    with pytest.raises(Overloaded):
        asyncio.run(stream.start())
    outcome = stream.outcome()
    assert outcome.escalated and outcome.tier_chain == ("small",) and outcome.confidences[0] < 0.6
    pipeline.record("completions", outcome, 503, time.perf_counter(), request_id="r1")
    assert _value(metrics, "tierserve_cascade_decisions_total", tier="small", outcome="escalated") == 1
    assert _value(metrics, "tierserve_cascade_escalations_total", from_tier="small", to_tier="large") == 1
    assert _value(metrics, "tierserve_cascade_wasted_tokens_total", tier="small") == 7
