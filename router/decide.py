"""A score becomes a tier: one comparison per boundary, as a `RouteDecision`. Pure; no model, no store.

The router (`router.core.Router`) decides with it, and so does the ingress for what it decides itself: the
heuristic, `cheapest`, the LLM judge's verdict, and every fallback when the router is down or slow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from router.config import RouterConfig
from router.scorers import CheapestRouter, HeuristicRouter, Scorer
from router.scoring import tier_for_score, with_threshold
from router.types import Neighbor, RouteDecision, RouteInput, RouterKind


class Decider:
    """The tier boundaries of one config, and the routers that need no model (heuristic, cheapest)."""

    def __init__(self, cfg: RouterConfig, tier_names: Sequence[str]) -> None:
        self.tier_names = list(tier_names)
        self.thresholds = cfg.thresholds_for(len(self.tier_names))
        """The configured boundaries between neighbouring tiers (cost order)."""
        self.heuristic = HeuristicRouter(cfg.heuristic)
        self.cheapest = CheapestRouter()

    def thresholds_for(self, item: RouteInput) -> tuple[float, ...]:
        """The boundaries for one request: the config's, with the request's own threshold applied."""
        return self.thresholds if item.threshold is None else with_threshold(self.thresholds, item.threshold)

    def decide(
        self, item: RouteInput, router: RouterKind, score: float, reason: str, *, fallback: bool = False,
        neighbors: tuple[Neighbor, ...] = (),
    ) -> RouteDecision:
        """The tier for `score`: one comparison per boundary (`cheapest` is the first tier whatever the score)."""
        thresholds = self.thresholds_for(item)
        index = 0 if router == "cheapest" else tier_for_score(score, thresholds)
        return RouteDecision(tier=self.tier_names[index], tier_index=index, router=router, score=score,
                             thresholds=thresholds, reason=reason, fallback=fallback, neighbors=neighbors)

    def local(self, item: RouteInput, router: RouterKind) -> RouteDecision:
        """The decision of a router that needs no model: `heuristic` or `cheapest`."""
        scorer: Scorer = self.cheapest if router == "cheapest" else self.heuristic
        scores = scorer.score([item.text])
        return self.decide(item, router, float(scores.values[0]), scores.reasons[0])

    def fallback(self, item: RouteInput, cause: str) -> RouteDecision:
        """The heuristic's decision when the requested router could not decide (`cause` says why)."""
        scores = self.heuristic.score([item.text])
        reason = f"knn unavailable ({cause}); {scores.reasons[0]}"
        decision = self.decide(item, "heuristic", float(scores.values[0]), reason, fallback=True)
        return replace(decision, fallback_cause=cause)
