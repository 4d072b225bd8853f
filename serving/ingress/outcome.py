"""What happened to a request: the routing decision, the tier load moved it to, and the cascade's trace.

One frozen value, reported in the response headers, the body's `tierserve` object and the query log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from router.types import RouteDecision
from serving.cascade import CascadeTrace


@dataclass(frozen=True)
class Outcome:
    decision: RouteDecision
    """Where the request was routed (the router's decision, or the tier it named)."""
    entry_tier: str
    """The tier it started on: the routed one, or a neighbour when load moved it."""
    capacity: str | None = None
    """How load moved the request (e.g. `spill_up:spill_up`), None when it stayed on its routed tier."""
    trace: CascadeTrace | None = None
    """The cascade's tiers and confidences (None: no cascade, the entry tier answered)."""
    cascade_thresholds: tuple[float, ...] = ()
    """The request's cascade threshold per tier index (empty without a cascade)."""

    @classmethod
    def unmoved(cls, decision: RouteDecision) -> Outcome:
        """The request on the tier it was routed to (or named)."""
        return cls(decision=decision, entry_tier=decision.tier)

    @property
    def tier_chain(self) -> tuple[str, ...]:
        return self.trace.tier_chain if self.trace and self.trace.attempts else (self.entry_tier,)

    @property
    def tier(self) -> str:
        """The tier that answered (so far)."""
        return self.tier_chain[-1]

    @property
    def escalated(self) -> bool:
        return self.trace is not None and self.trace.escalated

    @property
    def confidences(self) -> tuple[float, ...]:
        return tuple(c for c in self.trace.confidences if c is not None) if self.trace else ()

    def scored_thresholds(self, tier_names: list[str]) -> tuple[float, ...]:
        """The threshold each recorded confidence was compared with (confidences are the chain's first tiers)."""
        if not self.cascade_thresholds:
            return ()
        return tuple(self.cascade_thresholds[tier_names.index(t)] for t in self.tier_chain[: len(self.confidences)])

    def meta(self) -> dict[str, Any]:
        d = self.decision
        return {
            "tier": self.tier,
            "routed_tier": d.tier,
            "router": d.router,
            "score": d.score,
            "thresholds": list(d.thresholds),
            "reason": d.reason,
            "overhead_ms": round(d.overhead_ms, 3),
            "fallback": d.fallback,
            "tier_chain": list(self.tier_chain),
            "confidences": [round(c, 6) for c in self.confidences],
            "escalated": self.escalated,
            "cascade_reason": self.trace.reason if self.trace else None,
            "wasted_tokens": self.trace.wasted_tokens() if self.trace else {},
            "capacity": self.capacity,
        }

    def headers(self) -> dict[str, str]:
        d = self.decision
        h = {
            "x-tierserve-tier": self.tier,
            "x-tierserve-router": d.router + ("-fallback" if d.fallback else ""),
            "x-tierserve-overhead-ms": f"{d.overhead_ms:.3f}",
            "x-tierserve-tier-chain": ",".join(self.tier_chain),
            "x-tierserve-escalated": "true" if self.escalated else "false",
        }
        if d.score is not None:
            h["x-tierserve-score"] = f"{d.score:.4f}"
        if self.confidences:
            h["x-tierserve-confidences"] = ",".join(f"{c:.4f}" for c in self.confidences)
        if self.capacity:
            h["x-tierserve-capacity"] = self.capacity
        return h


def status_word(status: int) -> str:
    """A response status as the query log's `status`."""
    if status < 400:
        return "ok"
    if status in (429, 503):
        return "rejected"
    if status == 499:
        return "cancelled"
    return "error"
