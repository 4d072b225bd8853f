"""Query-log report: per-bucket routing and escalation, and which log rows can train the classifier."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from serving.querylog import QueryRecord
from serving.querylog.report import format_report, labelled_rows, routing_over_time

T0 = datetime(2025, 3, 1, 12, tzinfo=UTC).timestamp()


def _rec(i, *, hour, chain=("small",), tier=None, escalated=False, prompt=None, label=None, status="ok"):
    return QueryRecord(request_id=str(i), router="knn", tier=tier or chain[-1], score=0.1 * (i % 10),
                       tier_chain=chain, escalated=escalated, latency_ms=10.0 * (i + 1), prompt=prompt,
                       label=label, status=status, timestamp=T0 + hour * 3600 + i)


def test_escalation_drift_shows_per_hour():
    records = [_rec(i, hour=0) for i in range(8)]
    records += [_rec(10 + i, hour=0, chain=("small", "large"), escalated=True) for i in range(2)]
    records += [_rec(20 + i, hour=1, chain=("small", "large"), escalated=True) for i in range(5)]
    records += [_rec(30 + i, hour=1, chain=("large",)) for i in range(5)]
    table = routing_over_time(records, "1h")
    assert table["requests"].tolist() == [10, 10]
    assert table["escalation_rate"].tolist() == pytest.approx([0.2, 0.5])
    assert table["share_large"].tolist() == pytest.approx([0.2, 1.0])
    assert table["share_small"].tolist() == pytest.approx([0.8, 0.0])
    text = format_report(table)
    assert "2025-03-01 13:00" in text and "50.0%" in text


def test_empty_log_reports_nothing():
    assert format_report(routing_over_time([], "1h")) == "no query-log records in that window"


def test_labelled_rows_from_cascade_outcomes_and_explicit_labels():
    records = [
        _rec(1, hour=0, prompt="easy one"),
        _rec(2, hour=0, chain=("small", "large"), escalated=True, prompt="hard one"),
        _rec(3, hour=0, chain=("large",), prompt="went straight to large"),  # says nothing about small
        _rec(4, hour=0, chain=("large",), prompt="graded offline", label=0.8),
        _rec(5, hour=0, prompt=None),  # prompt not stored
        _rec(6, hour=0, prompt="failed", status="error"),
    ]
    prompts, labels = labelled_rows(records, small_tier="small")
    assert prompts == ["easy one", "hard one", "graded offline"]
    assert labels.tolist() == [0.0, 1.0, 0.8]


def test_cascade_escalation_against_its_target_flags_drift():
    from serving.querylog.report import cascade_over_time, format_cascade

    records = []
    for i in range(100):  # hour 0: 30% escalate (on target); hour 1: 60% (drifted)
        for hour, share in ((0, 30), (1, 60)):
            up = i < share
            records.append(QueryRecord(
                request_id=f"{hour}-{i}", router="knn", tier="large" if up else "small",
                tier_chain=("small", "large") if up else ("small",), escalated=up,
                confidences=(0.2 if up else 0.9,), cascade_thresholds=(0.5,), timestamp=T0 + hour * 3600 + i))
    table = cascade_over_time(records, "1h", target=0.3)
    assert table["decisions"].tolist() == [100, 100]
    assert table["escalation_rate"].tolist() == pytest.approx([0.3, 0.6])
    assert table["drift"].tolist() == ["", "HIGH"]
    assert table["threshold"].tolist() == pytest.approx([0.5, 0.5])
    text = format_cascade(table)
    assert "200 decisions, 45.0% escalated against a calibrated target of 30.0%" in text and "HIGH" in text


def test_report_cost_counts_answers_and_escalated_drafts_per_tier():
    from serving.plan.cost import TierCost
    from serving.querylog.report import format_cost, output_tokens_by_tier

    records = [replace(_rec(i, hour=0), completion_tokens=100) for i in range(8)]
    records += [replace(_rec(10, hour=0, chain=("small", "large"), escalated=True), completion_tokens=500)]
    tokens, estimated = output_tokens_by_tier(records)
    assert tokens == {"small": 1300, "large": 500} and estimated == 500
    costs = {"small": TierCost("small", 0.3, 1500.0, 3.6), "large": TierCost("large", 0.6, 500.0, 3.6)}
    text = format_cost(records, costs, baseline="large")
    # small 1.3k x 0.2 = 0.26 GPU-s, large 0.5k x 1.2 = 0.6; the 1.3k returned tokens all on large: 1.56 GPU-s
    assert "total 0.86 GPU-s ($0.00086); all on large: 1.56 GPU-s ($0.00156); saved 44.9%" in text
    assert "500 of those tokens are escalated answers' discarded drafts" in text
    cpu = {t: TierCost(t, 0.0, None, None) for t in costs}
    assert format_cost(records, cpu, baseline="large").endswith("n/a: small: n/a (CPU); large: n/a (CPU)")
