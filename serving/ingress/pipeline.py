"""One request's path, top to bottom: plan the tier (`routing`), place it by load, generate (or cascade),
answer, record. Every stage returns a value; no module this one calls calls back into it."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, replace

from router.types import RouteDecision
from serving.cascade import CascadeOverride, CascadePolicy, CascadeTrace, cascade_policy
from serving.channel.admission import CapacityController
from serving.channel.calls import TierCalls
from serving.channel.tiers import SseRelay, TierClient
from serving.channel.wire import SseOptions
from serving.config import AppConfig
from serving.ingress.cascade_run import CascadeRunner, strip_logprobs
from serving.ingress.openai import ChunkEncoder, Kind, encode_stream
from serving.ingress.outcome import Outcome, status_word
from serving.ingress.protocol import TierserveOptions
from serving.ingress.router_calls import RouterCalls
from serving.ingress.routing import Planner
from serving.ingress.sessions import SessionKey, SessionStore, tier_to_remember
from serving.metrics import Metrics
from serving.querylog import QueryLog, QueryRecord
from serving.types import GenerationChunk, GenerationRequest, GenerationResult


@dataclass(frozen=True)
class StreamFormat:
    """What a stream's SSE events look like, from the client's request."""

    kind: Kind
    model: str
    include_usage: bool


@dataclass(frozen=True)
class Stream:
    """An answer on its way. `start()` reads its first event (so errors get a real status) and returns the
    SSE body; `outcome()` is what happened so far: the placed request, then, for a cascade, each new trace;
    final once the body has ended (or once `start()` has failed)."""

    start: Callable[[], Awaitable[SseRelay]]
    outcome: Callable[[], Outcome]


class Pipeline:
    """The decisions and calls for one request; the HTTP layer only parses and encodes."""

    def __init__(
        self, config: AppConfig, tiers: TierClient, metrics: Metrics, router: RouterCalls | None = None
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.capacity = CapacityController(config.capacity, config.tier_names, tiers, metrics)
        self.calls = TierCalls(tiers, self.capacity)
        self.cascade = CascadeRunner(config.tier_names, self.calls)
        self.sessions = (
            SessionStore(config.sessions.ttl_s, config.sessions.max_entries) if config.sessions.enabled else None
        )
        """Sticky tiers of this replica's conversations (None: sessions off)."""
        self.planner = Planner(config, self.calls, metrics, router, self.sessions)
        self.query_log = (
            QueryLog.from_config(config.query_log, config.resolved_data_dir()) if config.query_log.enabled else None
        )
        for tier in config.tier_names[:-1]:  # the drift alert compares escalations with the calibrated target
            target = config.cascade.target_rate_for(tier)
            if target is not None:
                metrics.cascade_escalation_target.labels(tier).set(target)

    async def plan(
        self, model: str, routing_text: str, options: TierserveOptions, session: SessionKey | None = None
    ) -> RouteDecision:
        """The entry tier from `model`, the options and the session (`serving.ingress.routing`)."""
        return await self.planner.plan(model, routing_text, options, session)

    def place(self, decision: RouteDecision) -> Outcome:
        """The routed tier, or a neighbour when load says so (only for routed requests)."""
        if not decision.routed:
            return Outcome.unmoved(decision)
        moved = self.capacity.place(decision.tier, decision.score, decision.thresholds)
        if moved.action == "keep":
            return Outcome.unmoved(decision)
        self.metrics.capacity_moves.labels(decision.tier, moved.tier).inc()
        if decision.router == "session" and moved.tier != decision.tier:
            decision = replace(decision, reason=f"{decision.reason}; {decision.tier} is saturated, so this turn "
                                                f"moved to {moved.tier} ({moved.action}); the session stays on "
                                                f"{decision.tier}")
        return Outcome(decision, moved.tier, capacity=f"{moved.action}:{moved.reason}")

    async def generate(
        self, request: GenerationRequest, placed: Outcome, options: TierserveOptions
    ) -> tuple[GenerationResult, Outcome]:
        """A whole answer on the placed tier, through the cascade if the request has one."""
        policy = self._policy(placed, options)
        if policy is None:
            return await self.calls.generate(placed.entry_tier, request), placed
        result, trace = await self.cascade.run(request, policy, self._index(placed))
        return strip_logprobs(result, request.sampling), replace(placed, trace=trace,
                                                                 cascade_thresholds=policy.thresholds)

    def stream(
        self, request: GenerationRequest, placed: Outcome, options: TierserveOptions, fmt: StreamFormat
    ) -> Stream:
        """The SSE answer, to `start()`.

        A plain stream is encoded by the tier replica and relayed as bytes; a cascade's stream is held
        back and judged here, so the ingress encodes it.
        """
        policy = self._policy(placed, options)
        if policy is None:
            options_ = SseOptions(kind=fmt.kind, model=fmt.model, logprobs=request.sampling.logprobs,
                                  include_usage=fmt.include_usage, meta=placed.meta())
            return Stream(lambda: self.calls.relay(placed.entry_tier, request, options_), lambda: placed)
        encoder = ChunkEncoder(kind=fmt.kind, request_id=request.request_id, model=fmt.model,
                               logprobs=request.sampling.logprobs, include_usage=fmt.include_usage)
        cascade = _CascadeStream(replace(placed, cascade_thresholds=policy.thresholds))

        async def start() -> SseRelay:
            relay = SseRelay()
            chunks = cascade.chunks(self.cascade.stream(request, policy, self._index(placed)), relay, request)
            return await relay.start(encode_stream(chunks, encoder, lambda: cascade.outcome.meta()))

        return Stream(start, lambda: cascade.outcome)

    def _index(self, placed: Outcome) -> int:
        return self.config.tier_names.index(placed.entry_tier)

    def _policy(self, placed: Outcome, options: TierserveOptions) -> CascadePolicy | None:
        override = None
        if options.cascade is not None or options.cascade_method or options.cascade_threshold is not None:
            override = CascadeOverride(
                enabled=options.cascade, method=options.cascade_method, threshold=options.cascade_threshold
            )
        return cascade_policy(self.config.cascade, self.config.tier_names, routed=placed.decision.routed,
                              override=override)

    def _count_cascade(self, trace: CascadeTrace) -> None:
        """The cascade's metrics (from `record`, once per request)."""
        for a in trace.attempts:
            if a.confidence is not None:  # the cascade scored this answer and decided
                self.metrics.cascade_decisions.labels(a.tier, "escalated" if a.escalated else "kept").inc()
        names = self.config.tier_names
        for a in trace.attempts:
            if a.escalated:  # counted when decided, as its wasted tokens are (the next answer may never come)
                self.metrics.escalations.labels(a.tier, names[names.index(a.tier) + 1]).inc()
        for tier, wasted in trace.wasted_tokens().items():
            self.metrics.wasted_tokens.labels(tier).inc(wasted)

    def record(
        self,
        endpoint: str,
        outcome: Outcome,
        status: int,
        started: float,
        last: GenerationResult | GenerationChunk | None = None,
        *,
        request_id: str = "",
        routing_text: str | None = None,
    ) -> None:
        """Metrics, the session's tier and the query log for one finished request (any status)."""
        tier = outcome.tier
        decision = outcome.decision
        if status == 200 and decision.session is not None and self.sessions is not None:
            self.sessions.put(decision.session, tier_to_remember(
                decision.tier, tier, escalated=outcome.escalated, moved_by_load=outcome.capacity is not None))
        if outcome.trace is not None:
            self._count_cascade(outcome.trace)
        latency_s = time.perf_counter() - started
        self.metrics.requests.labels(endpoint, tier, str(status)).inc()
        self.metrics.latency.labels(endpoint, tier).observe(latency_s)
        if last is not None:
            self.metrics.tokens.labels(tier, "prompt").inc(last.prompt_tokens)
            self.metrics.tokens.labels(tier, "completion").inc(last.completion_tokens)
        if self.query_log is None:
            return
        self.query_log.append(
            QueryRecord(
                request_id=request_id,
                router=decision.router if decision.routed else "none",
                tier=tier,
                score=decision.score,
                threshold=decision.thresholds[-1] if decision.thresholds else None,
                tier_chain=outcome.tier_chain,
                escalated=outcome.escalated,
                confidences=outcome.confidences,
                cascade_thresholds=outcome.scored_thresholds(self.config.tier_names),
                latency_ms=latency_s * 1000,
                prompt_tokens=getattr(last, "prompt_tokens", 0),
                completion_tokens=getattr(last, "completion_tokens", 0),
                status=status_word(status),
                prompt=routing_text,
            )
        )


class _CascadeStream:
    """A cascade's chunks for the encoder, and the outcome as of the latest trace the cascade yielded."""

    def __init__(self, placed: Outcome) -> None:
        self.outcome = placed

    async def chunks(
        self, items: AsyncIterator[GenerationChunk | CascadeTrace], relay: SseRelay, request: GenerationRequest
    ) -> AsyncIterator[GenerationChunk]:
        """The chunks to send (logprobs only if the client asked); the last one is the relay's summary."""
        async with aclosing(items) as inner:
            async for item in inner:
                if isinstance(item, CascadeTrace):
                    self.outcome = replace(self.outcome, trace=item)
                    continue
                relay.summary = item
                yield item if request.sampling.logprobs else replace(item, token_logprobs=())
