"""`tierserve report`'s shadow section: agreement and the candidate's estimated cost from logged outcomes."""

from __future__ import annotations

import pytest

from serving.querylog import QueryRecord
from serving.querylog.shadow import format_shadow, summarize_shadow

TIERS = ["small", "large"]


def rec(i: int, chain: tuple[str, ...], shadow: str, *, conf: tuple[float, ...] = (), explored: bool = False
        ) -> QueryRecord:
    return QueryRecord(f"r{i}", "knn", chain[-1], tier_chain=chain, escalated=len(chain) > 1, confidences=conf,
                       routed_tier=chain[0] if not explored else "large", explored=explored,
                       shadow_router="version:2", shadow_tier=shadow)


def test_agreement_and_cost_come_from_the_logged_outcomes() -> None:
    records = [
        rec(1, ("small",), "small", conf=(0.9,)),  # agree; live cost 0.1
        rec(2, ("small", "large"), "large", conf=(0.2,)),  # candidate pre-routes an escalation: 1.0 vs 1.1
        rec(3, ("small",), "large", conf=(0.9,)),  # candidate pays the top tier for an accepted answer
        rec(4, ("large",), "small"),  # live sent it up: the candidate's cascade at the live rate (1/3 here)
        rec(5, ("small", "large"), "small", conf=(0.1,), explored=True),  # explored: its own outcome stands
    ]
    (s,) = summarize_shadow(records, TIERS, 0.1)
    assert s.requests == 5 and s.agreement == pytest.approx(1 / 5)
    assert s.escalation_rate == pytest.approx(2 / 4)
    assert s.live_cost == pytest.approx((0.1 + 1.1 + 0.1 + 1.0 + 1.1) / 5)
    assert s.shadow_cost == pytest.approx((0.1 + 1.0 + 1.0 + (0.1 + 0.5) + 1.1) / 5)
    assert s.live_top_share == pytest.approx(3 / 5) and s.shadow_top_share == pytest.approx((0 + 1 + 1 + 0.5 + 1) / 5)
    text = format_shadow([s], 0.1, "test")
    assert "version:2" in text and "20.0%" in text
    assert "no request" in format_shadow([], 0.1, "test")
