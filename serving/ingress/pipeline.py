"""One request's path, top to bottom: plan the tier, admit, generate, (cascade), answer."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any

from router.heuristic import HeuristicScorer
from router.judge import JudgeRouter
from router.querylog import QueryLog, QueryRecord
from router.scoring import tier_for_score, with_threshold
from router.types import RouteDecision, RouteInput, parse_router_model
from serving.cascade import CascadeOverride, CascadePolicy, TierAttempt, cascade_policy
from serving.config import AppConfig
from serving.errors import ModelNotFound
from serving.ingress.admission import CapacityController
from serving.ingress.cascade_run import CascadeRunner, strip_logprobs
from serving.ingress.router_calls import RouterCalls
from serving.ingress.sessions import SessionKey, SessionStore, sticky_reason, tier_to_remember
from serving.ingress.tiers import TierClient
from serving.ingress.tiers import SseRelay
from serving.metrics import Metrics
from serving.responses import ChunkEncoder, Kind, encode_stream
from serving.wire import SseOptions
from serving.types import ChatMessage, GenerationChunk, GenerationRequest, GenerationResult, SamplingOptions

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoutePlan:
    """Which tier a request starts on, and why."""

    tier: str
    router: str
    """'explicit' (model named a tier), 'forced' (tierserve.tier), 'cheapest', 'session' (a conversation's
    earlier tier), or the router's name."""
    score: float | None = None
    thresholds: tuple[float, ...] = ()
    reason: str = ""
    overhead_ms: float = 0.0
    fallback: bool = False
    session: str | None = None
    """The session key whose tier the answer updates (None: the request belongs to no session)."""


@dataclass
class Outcome:
    """What happened to a request, reported in headers, the body's `tierserve` object and the log."""

    plan: RoutePlan
    tier_chain: list[str] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    escalated: bool = False
    capacity: str | None = None
    """How load moved the request (e.g. `spill_up:spill_up`), None when it stayed on its routed tier."""
    cascade_reason: str | None = None
    wasted_tokens: dict[str, int] = field(default_factory=dict)
    cascade_thresholds: tuple[float, ...] = ()
    """The request's cascade threshold per tier index (empty without a cascade), for the query log."""

    @property
    def tier(self) -> str:
        return self.tier_chain[-1] if self.tier_chain else self.plan.tier

    def meta(self) -> dict[str, Any]:
        plan = self.plan
        return {
            "tier": self.tier,
            "routed_tier": plan.tier,
            "router": plan.router,
            "score": plan.score,
            "thresholds": list(plan.thresholds),
            "reason": plan.reason,
            "overhead_ms": round(plan.overhead_ms, 3),
            "fallback": plan.fallback,
            "tier_chain": list(self.tier_chain or [plan.tier]),
            "confidences": [round(c, 6) for c in self.confidences],
            "escalated": self.escalated,
            "cascade_reason": self.cascade_reason,
            "wasted_tokens": dict(self.wasted_tokens),
            "capacity": self.capacity,
        }

    def headers(self) -> dict[str, str]:
        h = {
            "x-tierserve-tier": self.tier,
            "x-tierserve-router": self.plan.router + ("-fallback" if self.plan.fallback else ""),
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

    def __init__(
        self, config: AppConfig, tiers: TierClient, metrics: Metrics, router: RouterCalls | None = None
    ) -> None:
        self.config = config
        self.tiers = tiers
        self.metrics = metrics
        self.router = router
        """The router, in this process or behind its deployment's handle (None: the heuristic decides)."""
        self.query_log = (
            QueryLog.from_config(config.query_log, config.resolved_data_dir()) if config.query_log.enabled else None
        )
        self.capacity = CapacityController(config.capacity, config.tier_names, tiers, metrics)
        self.cascade = CascadeRunner(config.tier_names, self._generate_on, self._stream_on, self.capacity.has_room)
        self._judge = JudgeRouter(self._judge_complete)
        self._heuristic = HeuristicScorer(config.router.heuristic)
        self._thresholds = config.router.thresholds_for(len(config.tiers))
        self.sessions = (
            SessionStore(config.sessions.ttl_s, config.sessions.max_entries) if config.sessions.enabled else None
        )
        """Sticky tiers of this replica's conversations (None: sessions off)."""
        for tier in config.tier_names[:-1]:  # the drift alert compares escalations with the calibrated target
            target = config.cascade.target_rate_for(tier)
            if target is not None:
                metrics.cascade_escalation_target.labels(tier).set(target)

    async def plan(self, model: str, routing_text: str, options: Any, session: SessionKey | None = None) -> RoutePlan:
        """Pick the entry tier from `model` and the per-request options (a named tier wins over a session)."""
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
            if session is None or self.sessions is None:
                return await self._route(model, routing_text, options)
            return self._session_plan(session) or replace(
                await self._route(model, routing_text, options), session=session.key
            )
        raise ModelNotFound(
            f"The model '{model}' does not exist. Use 'auto', 'router-<name>[-<threshold>]' or a tier: {names}.",
            param="model",
            code="model_not_found",
        )

    def _session_plan(self, session: SessionKey) -> RoutePlan | None:
        """The tier a continuing conversation answered on last, if this replica remembers it."""
        remembered = self.sessions.get(session.key) if self.sessions and session.continuing else None
        if remembered is None or remembered.tier not in self.config.tier_names:
            return None
        self.metrics.routing.labels("session", remembered.tier).inc()
        return RoutePlan(tier=remembered.tier, router="session", thresholds=self._thresholds,
                         reason=sticky_reason(session, remembered, self.sessions.now()), session=session.key)

    async def _route(self, model: str, routing_text: str, options: Any) -> RoutePlan:
        kind, threshold = None, None
        if model != "auto":
            try:
                kind, threshold = parse_router_model(model)
            except ValueError as exc:
                raise ModelNotFound(str(exc), param="model", code="model_not_found") from None
        if options.threshold is not None:
            threshold = options.threshold
        route_input = RouteInput(text=routing_text, threshold=threshold, router=kind)
        started = time.perf_counter()
        kind = kind or self.config.router.default_router
        if kind == "cheapest":
            decision = self._decision(route_input, 0.0, "cheapest", "cheapest router: always the first tier")
            decision = replace(decision, tier=self.config.tier_names[0], tier_index=0)
        elif kind == "heuristic":
            result = self._heuristic.score(routing_text)
            decision = self._decision(route_input, result.score, "heuristic", result.reason)
        elif kind == "judge":
            try:
                decision = await asyncio.wait_for(
                    self._judge_decision(route_input), self.config.ingress.router_timeout_s
                )
            except TimeoutError:
                decision = self._local_heuristic(route_input, "judge timed out")
        elif self.router is None:
            decision = self._local_heuristic(route_input, "no router deployment")
        else:
            try:
                decision = await asyncio.wait_for(
                    self.router.route(route_input), self.config.ingress.router_timeout_s
                )
            except Exception as exc:  # the router deployment is down or slow: never a 5xx for that
                logger.warning("router deployment failed (%s); heuristic fallback", exc)
                decision = self._local_heuristic(route_input, f"router deployment: {type(exc).__name__}")
        overhead_ms = (time.perf_counter() - started) * 1000
        self.metrics.routing.labels(decision.router, decision.tier).inc()
        self.metrics.routing_overhead.labels(decision.router).observe(overhead_ms / 1000)
        if decision.fallback:
            self.metrics.router_fallbacks.labels(decision.reason.split(";")[0][:60]).inc()
        return RoutePlan(
            tier=decision.tier,
            router=decision.router,
            score=decision.score,
            thresholds=decision.thresholds,
            reason=decision.reason,
            overhead_ms=overhead_ms,
            fallback=decision.fallback,
        )

    async def _judge_complete(self, prompt: str) -> list[tuple[str, float]]:
        """The LLM-judge call: one greedy token from the cheapest tier, with its top alternatives."""
        request = GenerationRequest(
            request_id=f"judge-{time.monotonic_ns()}",
            sampling=SamplingOptions(max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=20),
            messages=(ChatMessage(role="user", content=prompt),),
        )
        result = await self._generate_on(self.config.tier_names[0], request)
        first = result.token_logprobs[0]
        return [(first.token, first.logprob), *first.top]

    async def _judge_decision(self, item: RouteInput) -> RouteDecision:
        verdict = await self._judge.verdict(item.text)
        cheapest = self.config.tier_names[0]
        reason = (f"judge: P(hard) {verdict.p_hard:.3f} from the {cheapest} tier (yes/no mass {verdict.answer_mass:.3f})"
                  if verdict.answered else f"judge: the call to the {cheapest} tier failed; P(hard) {verdict.p_hard}")
        return self._decision(item, verdict.p_hard, "judge", reason)

    def _local_heuristic(self, item: RouteInput, cause: str) -> RouteDecision:
        result = self._heuristic.score(item.text)
        return self._decision(item, result.score, "heuristic", f"knn unavailable ({cause}); {result.reason}", True)

    def _decision(self, item: RouteInput, score: float, router: Any, reason: str, fallback: bool = False) -> RouteDecision:
        """A routing decision made here in the ingress (judge, fallback), with the request's threshold."""
        thresholds = self._thresholds if item.threshold is None else with_threshold(self._thresholds, item.threshold)
        index = tier_for_score(score, thresholds)
        return RouteDecision(
            tier=self.config.tier_names[index],
            tier_index=index,
            router=router,
            score=score,
            thresholds=thresholds,
            reason=reason,
            fallback=fallback,
        )

    def _served_names(self) -> dict[str, str]:
        return {(t.served_model_name or t.name): t.name for t in self.config.tiers}

    def _tier_for_model(self, model: str) -> str:
        return model if model in self.config.tier_names else self._served_names()[model]

    # ---- generation ---------------------------------------------------------------------------

    async def _generate_on(self, tier: str, request: GenerationRequest) -> GenerationResult:
        self.capacity.acquire(tier)
        try:
            return await self.tiers.generate(tier, request)
        finally:
            self._release(tier)

    async def _stream_on(self, tier: str, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        self.capacity.acquire(tier)
        try:
            # aclosing: an early exit cancels the tier call (and aborts the engine) now, not at GC time.
            async with aclosing(self.tiers.stream(tier, request)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            self._release(tier)

    def _entry_index(self, outcome: Outcome) -> int:
        """The routed tier, or a neighbour when load says so (only for routed requests)."""
        plan = outcome.plan
        if plan.router in ("explicit", "forced"):
            return self.config.tier_names.index(plan.tier)
        decision = self.capacity.place(plan.tier, plan.score, plan.thresholds)
        if decision.action != "keep":
            outcome.capacity = f"{decision.action}:{decision.reason}"
            self.metrics.capacity_moves.labels(plan.tier, decision.tier).inc()
            if plan.router == "session" and decision.tier != plan.tier:
                outcome.plan = replace(plan, reason=f"{plan.reason}; {plan.tier} is saturated, so this turn "
                                                    f"moved to {decision.tier} ({decision.action}); the session "
                                                    f"stays on {plan.tier}")
        return decision.tier_index

    def _policy(self, outcome: Outcome, options: Any) -> CascadePolicy | None:
        override = None
        if options.cascade is not None or options.cascade_method or options.cascade_threshold is not None:
            override = CascadeOverride(
                enabled=options.cascade, method=options.cascade_method, threshold=options.cascade_threshold
            )
        routed = outcome.plan.router not in ("explicit", "forced")
        policy = cascade_policy(self.config.cascade, self.config.tier_names, routed=routed, override=override)
        outcome.cascade_thresholds = policy.thresholds if policy is not None else ()
        return policy

    def _trace(self, outcome: Outcome, attempts: list[TierAttempt], reason: str | None, final: bool) -> None:
        outcome.tier_chain = [a.tier for a in attempts]
        outcome.confidences = [a.confidence for a in attempts if a.confidence is not None]
        outcome.escalated = any(a.escalated for a in attempts)
        outcome.cascade_reason = reason
        if not final:
            return
        for a in attempts:
            if a.confidence is not None:  # the cascade scored this answer and decided
                self.metrics.cascade_decisions.labels(a.tier, "escalated" if a.escalated else "kept").inc()
        for a, nxt in zip(attempts, attempts[1:], strict=False):
            if a.escalated:
                wasted = a.prompt_tokens + a.completion_tokens + a.scoring_tokens
                outcome.wasted_tokens[a.tier] = outcome.wasted_tokens.get(a.tier, 0) + wasted
                self.metrics.escalations.labels(a.tier, nxt.tier).inc()
                self.metrics.wasted_tokens.labels(a.tier).inc(wasted)

    async def generate(self, request: GenerationRequest, outcome: Outcome, options: Any) -> GenerationResult:
        """A whole answer: entry tier by route and load, then the cascade if the request has one."""
        index = self._entry_index(outcome)
        policy = self._policy(outcome, options)
        if policy is None:
            tier = self.config.tier_names[index]
            outcome.tier_chain.append(tier)
            return await self._generate_on(tier, request)
        result, attempts, reason = await self.cascade.run(request, policy, index)
        self._trace(outcome, attempts, reason, final=True)
        return strip_logprobs(result, request.sampling)

    async def stream(
        self, request: GenerationRequest, outcome: Outcome, options: Any, fmt: StreamFormat
    ) -> SseRelay:
        """The SSE body, its first event already read (so errors get a real status).

        A plain stream is encoded by the tier replica and relayed as bytes; a cascade's stream is held
        back and judged here, so the ingress encodes it.
        """
        index = self._entry_index(outcome)
        policy = self._policy(outcome, options)
        if policy is None:
            tier = self.config.tier_names[index]
            outcome.tier_chain.append(tier)
            options_ = SseOptions(kind=fmt.kind, model=fmt.model, logprobs=request.sampling.logprobs,
                                  include_usage=fmt.include_usage, meta=outcome.meta())
            self.capacity.acquire(tier)
            try:
                relay = await self.tiers.relay(tier, request, options_)
            except BaseException:
                self._release(tier)
                raise
            relay.on_close(lambda: self._release(tier))
            return relay
        encoder = ChunkEncoder(kind=fmt.kind, request_id=request.request_id, model=fmt.model,
                               logprobs=request.sampling.logprobs, include_usage=fmt.include_usage)
        relay = SseRelay()
        chunks = _last_into(self._cascade_stream(request, policy, index, outcome), relay)
        return await relay.start(encode_stream(chunks, encoder, outcome.meta))

    def _release(self, tier: str) -> None:
        """The end of every tier call (pairs with `capacity.acquire`): free the slot, re-poll the tier's load."""
        self.capacity.release(tier)
        self.tiers.refresh_soon(tier)

    async def _cascade_stream(
        self, request: GenerationRequest, policy: CascadePolicy, index: int, outcome: Outcome
    ) -> AsyncIterator[GenerationChunk]:
        attempts: list[TierAttempt] = []
        try:
            async with aclosing(self.cascade.stream(request, policy, index, attempts)) as inner:
                async for chunk in inner:
                    self._trace(outcome, attempts, None, final=False)
                    yield chunk if request.sampling.logprobs else replace(chunk, token_logprobs=())
        finally:
            self._trace(outcome, attempts, "escalated" if outcome.escalated else "accepted", final=True)

    def record(
        self,
        endpoint: str,
        outcome: Outcome,
        status: int,
        started: float,
        last: Any = None,
        *,
        request_id: str = "",
        routing_text: str | None = None,
    ) -> None:
        """Metrics, the session's tier and the query log for one finished request (any status)."""
        tier = outcome.tier
        if status == 200 and outcome.plan.session is not None and self.sessions is not None:
            self.sessions.put(outcome.plan.session, tier_to_remember(
                outcome.plan.tier, tier, escalated=outcome.escalated, moved_by_load=outcome.capacity is not None))
        latency_s = time.perf_counter() - started
        self.metrics.requests.labels(endpoint, tier, str(status)).inc()
        self.metrics.latency.labels(endpoint, tier).observe(latency_s)
        if last is not None:
            self.metrics.tokens.labels(tier, "prompt").inc(last.prompt_tokens)
            self.metrics.tokens.labels(tier, "completion").inc(last.completion_tokens)
        if self.query_log is None:
            return
        plan = outcome.plan
        self.query_log.append(
            QueryRecord(
                request_id=request_id,
                router=plan.router if plan.router not in ("explicit", "forced") else "none",
                tier=tier,
                score=plan.score,
                threshold=plan.thresholds[-1] if plan.thresholds else None,
                tier_chain=tuple(outcome.tier_chain or [plan.tier]),
                escalated=outcome.escalated,
                confidences=tuple(outcome.confidences),
                cascade_thresholds=_scored_thresholds(outcome, self.config.tier_names),
                latency_ms=latency_s * 1000,
                prompt_tokens=getattr(last, "prompt_tokens", 0),
                completion_tokens=getattr(last, "completion_tokens", 0),
                status=_status_word(status),
                prompt=routing_text,
            )
        )


@dataclass(frozen=True)
class StreamFormat:
    """What a stream's SSE events look like, from the client's request."""

    kind: Kind
    model: str
    include_usage: bool


async def _last_into(chunks: AsyncIterator[GenerationChunk], relay: SseRelay) -> AsyncIterator[GenerationChunk]:
    """Pass chunks through, keeping the last one as the relay's summary (token counts for the log)."""
    async with aclosing(chunks) as inner:
        async for chunk in inner:
            relay.summary = chunk
            yield chunk


def _scored_thresholds(outcome: Outcome, tier_names: list[str]) -> tuple[float, ...]:
    """The threshold each recorded confidence was compared with (confidences are the chain's first tiers)."""
    if not outcome.cascade_thresholds:
        return ()
    chain = outcome.tier_chain[: len(outcome.confidences)]
    return tuple(outcome.cascade_thresholds[tier_names.index(t)] for t in chain)


def _status_word(status: int) -> str:
    if status < 400:
        return "ok"
    if status in (429, 503):
        return "rejected"
    if status == 499:
        return "cancelled"
    return "error"
