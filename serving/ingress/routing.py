"""Where a request starts: a tier it names, its conversation's tier, or a router's decision.

kNN and the classifier run in the router (its deployment, or in this process: `router.placement: ingress`);
the heuristic and `cheapest` decide here with the router's own `router.decide.Decider`, and so does every
fallback when the router is down or slow (never a 5xx for that). The LLM judge asks the cheapest tier.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace

from router.decide import Decider
from router.judge import JudgeRouter
from router.types import (
    Chosen,
    RouteDecision,
    RouteInput,
    RouterKind,
    parse_router_model,
)
from serving.channel.calls import TierCalls, judge_completion
from serving.config import AppConfig
from serving.ingress.errors import ModelNotFound
from serving.ingress.protocol import TierserveOptions
from serving.ingress.router_calls import RouterCalls
from serving.ingress.sessions import SessionKey, SessionStore, sticky_reason
from serving.metrics import Metrics

logger = logging.getLogger(__name__)


class Planner:
    """Decides each request's entry tier (before load is considered: that is `Pipeline.place`)."""

    def __init__(
        self, config: AppConfig, calls: TierCalls, metrics: Metrics, router: RouterCalls | None,
        sessions: SessionStore | None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.router = router
        """The kNN / classifier router, in this process or behind its deployment's handle (None: none runs)."""
        self.sessions = sessions
        self.local = Decider(config.router, config.tier_names)
        """Heuristic, cheapest, judge and fallback decisions, made here."""
        self._judge = JudgeRouter(judge_completion(calls, config.tier_names[0]))
        self._served = {(t.served_model_name or t.name): t.name for t in config.tiers}

    async def plan(
        self, model: str, routing_text: str, options: TierserveOptions, session: SessionKey | None = None
    ) -> RouteDecision:
        """The entry tier from `model` and the per-request options (a named tier wins over a session)."""
        names = self.config.tier_names
        if options.tier is not None:
            if options.tier not in names:
                raise ModelNotFound(
                    f"tierserve.tier '{options.tier}' is not a tier; choose one of {names}.", param="tierserve.tier"
                )
            return self._chosen(options.tier, "forced", "tierserve.tier in the request")
        if model in names or model in self._served:
            return self._chosen(model if model in names else self._served[model], "explicit", "model names a tier")
        if model != "auto" and not model.startswith("router-"):
            raise ModelNotFound(
                f"The model '{model}' does not exist. Use 'auto', 'router-<name>[-<threshold>]' or a tier: {names}.",
                param="model",
                code="model_not_found",
            )
        if not options.routing:
            return self._chosen(names[0], "cheapest", "routing disabled by the request")
        if session is None or self.sessions is None:
            return await self._route(model, routing_text, options)
        return self._remembered(session) or replace(await self._route(model, routing_text, options),
                                                    session=session.key)

    def _chosen(self, tier: str, how: RouterKind | Chosen, reason: str) -> RouteDecision:
        return RouteDecision(tier=tier, tier_index=self.config.tier_names.index(tier), router=how, score=None,
                             thresholds=(), reason=reason)

    def _remembered(self, session: SessionKey) -> RouteDecision | None:
        """The tier a continuing conversation answered on last, if this replica remembers it."""
        remembered = self.sessions.get(session.key) if self.sessions and session.continuing else None
        if remembered is None or remembered.tier not in self.config.tier_names:
            return None
        self.metrics.routing.labels("session", remembered.tier).inc()
        return RouteDecision(
            tier=remembered.tier, tier_index=self.config.tier_names.index(remembered.tier), router="session",
            score=None, thresholds=self.local.thresholds,
            reason=sticky_reason(session, remembered, self.sessions.now()), session=session.key,
        )

    async def _route(self, model: str, routing_text: str, options: TierserveOptions) -> RouteDecision:
        kind: RouterKind | None = None
        threshold = None
        if model != "auto":
            try:
                kind, threshold = parse_router_model(model)
            except ValueError as exc:
                raise ModelNotFound(str(exc), param="model", code="model_not_found") from None
        if options.threshold is not None:
            threshold = options.threshold
        item = RouteInput(text=routing_text, threshold=threshold, router=kind)
        started = time.perf_counter()
        decision = await self._decide(item, kind or self.config.router.default_router)
        decision = replace(decision, overhead_ms=(time.perf_counter() - started) * 1000)
        self.metrics.routing.labels(decision.router, decision.tier).inc()
        self.metrics.routing_overhead.labels(decision.router).observe(decision.overhead_ms / 1000)
        if decision.fallback:
            self.metrics.router_fallbacks.labels(decision.reason.split(";")[0][:60]).inc()
        return decision

    async def _decide(self, item: RouteInput, kind: RouterKind) -> RouteDecision:
        timeout_s = self.config.ingress.router_timeout_s
        if kind in ("cheapest", "heuristic"):
            return self.local.local(item, kind)
        if kind == "judge":
            try:
                verdict = await asyncio.wait_for(self._judge.verdict(item.text), timeout_s)
            except TimeoutError:
                return self.local.fallback(item, "judge timed out")
            cheapest = self.config.tier_names[0]
            reason = (f"judge: P(hard) {verdict.p_hard:.3f} from the {cheapest} tier (yes/no mass "
                      f"{verdict.answer_mass:.3f})" if verdict.answered
                      else f"judge: the call to the {cheapest} tier failed; P(hard) {verdict.p_hard}")
            return self.local.decide(item, "judge", verdict.p_hard, reason)
        if self.router is None:
            return self.local.fallback(item, "no router deployment")
        try:
            return await asyncio.wait_for(self.router.route(replace(item, deadline=time.time() + timeout_s)),
                                          timeout_s)
        except TimeoutError:  # slow (overloaded): never a 5xx for that
            logger.warning("router deployment took over ingress.router_timeout_s (%.1f s); heuristic fallback",
                           timeout_s)
            return self.local.fallback(item, "router deployment: timed out")
        except Exception as exc:  # the router deployment is down: never a 5xx for that
            logger.warning("router deployment failed (%s: %s); heuristic fallback", type(exc).__name__, exc)
            return self.local.fallback(item, f"router deployment: {type(exc).__name__}")
