"""One request's path, top to bottom: plan the tier, admit, generate, (cascade), answer."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any

from serving.config import AppConfig
from serving.errors import ModelNotFound
from serving.ingress.tiers import TierClient
from serving.metrics import Metrics
from serving.types import GenerationChunk, GenerationRequest, GenerationResult

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoutePlan:
    """Which tier a request starts on, and why."""

    tier: str
    router: str
    """'explicit' (model named a tier), 'forced' (tierserve.tier), 'cheapest', or the router's name."""
    score: float | None = None
    threshold: float | None = None
    reason: str = ""
    overhead_ms: float = 0.0
    fallback: bool = False


@dataclass
class Outcome:
    """What happened to a request, reported in headers, the body's `tierserve` object and the log."""

    plan: RoutePlan
    tier_chain: list[str] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    escalated: bool = False
    capacity: str | None = None

    @property
    def tier(self) -> str:
        return self.tier_chain[-1] if self.tier_chain else self.plan.tier

    def meta(self) -> dict[str, Any]:
        plan = asdict(self.plan)
        return {
            "tier": self.tier,
            "router": plan["router"],
            "score": plan["score"],
            "threshold": plan["threshold"],
            "reason": plan["reason"],
            "overhead_ms": round(plan["overhead_ms"], 3),
            "fallback": plan["fallback"],
            "tier_chain": list(self.tier_chain or [self.plan.tier]),
            "confidences": [round(c, 6) for c in self.confidences],
            "escalated": self.escalated,
            "capacity": self.capacity,
        }

    def headers(self) -> dict[str, str]:
        h = {
            "x-tierserve-tier": self.tier,
            "x-tierserve-router": self.plan.router,
            "x-tierserve-overhead-ms": f"{self.plan.overhead_ms:.3f}",
            "x-tierserve-tier-chain": ",".join(self.tier_chain or [self.plan.tier]),
            "x-tierserve-escalated": "true" if self.escalated else "false",
        }
        if self.plan.score is not None:
            h["x-tierserve-score"] = f"{self.plan.score:.4f}"
        if self.confidences:
            h["x-tierserve-confidences"] = ",".join(f"{c:.4f}" for c in self.confidences)
        if self.capacity:
            h["x-tierserve-capacity"] = self.capacity
        return h


class Pipeline:
    """The decisions and calls for one request; the HTTP layer only parses and encodes."""

    def __init__(self, config: AppConfig, tiers: TierClient, metrics: Metrics, router: Any = None) -> None:
        self.config = config
        self.tiers = tiers
        self.metrics = metrics
        self.router = router

    async def plan(self, model: str, routing_text: str, options: Any) -> RoutePlan:
        """Pick the entry tier from `model` and the per-request options."""
        names = self.config.tier_names
        if options.tier is not None:
            if options.tier not in names:
                raise ModelNotFound(
                    f"tierserve.tier '{options.tier}' is not a tier; choose one of {names}.", param="tierserve.tier"
                )
            return RoutePlan(tier=options.tier, router="forced", reason="tierserve.tier in the request")
        if model in names or model in self._served_names():
            return RoutePlan(tier=self._tier_for_model(model), router="explicit", reason="model names a tier")
        if model == "auto" or model.startswith("router-"):
            if not options.routing:
                return RoutePlan(tier=names[0], router="cheapest", reason="routing disabled by the request")
            return await self._route(model, routing_text, options)
        raise ModelNotFound(
            f"The model '{model}' does not exist. Use 'auto', 'router-<name>[-<threshold>]' or a tier: {names}.",
            param="model",
            code="model_not_found",
        )

    async def _route(self, model: str, routing_text: str, options: Any) -> RoutePlan:
        # Replaced by the router deployment when one is configured.
        return RoutePlan(tier=self.config.tier_names[0], router="cheapest", reason="no router configured")

    def _served_names(self) -> dict[str, str]:
        return {(t.served_model_name or t.name): t.name for t in self.config.tiers}

    def _tier_for_model(self, model: str) -> str:
        return model if model in self.config.tier_names else self._served_names()[model]

    # ---- generation ---------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest, outcome: Outcome) -> GenerationResult:
        tier = outcome.plan.tier
        outcome.tier_chain.append(tier)
        return await self.tiers.generate(tier, request)

    async def stream(self, request: GenerationRequest, outcome: Outcome) -> AsyncIterator[GenerationChunk]:
        tier = outcome.plan.tier
        outcome.tier_chain.append(tier)
        return self.tiers.stream(tier, request)

    def record(self, endpoint: str, outcome: Outcome, status: int, started: float, last: Any = None) -> None:
        tier = outcome.tier
        self.metrics.requests.labels(endpoint, tier, str(status)).inc()
        self.metrics.latency.labels(endpoint, tier).observe(time.perf_counter() - started)
        if last is not None:
            self.metrics.tokens.labels(tier, "prompt").inc(last.prompt_tokens)
            self.metrics.tokens.labels(tier, "completion").inc(last.completion_tokens)
