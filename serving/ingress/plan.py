"""Where a request goes, before the call: the tier it names, its conversation's tier, or a router's decision
(`Planner.plan`); the neighbour the tiers' load moves it to (`Planner.place`); and the cascade it runs.

kNN and the classifier run in the router (its deployment, or in this process: `router.placement: ingress`),
except what the static first pass decides here on the ingress's copy of the router's static index
(`router.static_first`); the heuristic and `cheapest` decide here with the router's own `router.scoring.Decider`,
and so does every fallback when the router is down or slow (never a 5xx for that). The LLM judge asks the
cheapest tier.
What happened is one frozen `Outcome`, reported in the response and the query log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from router.decision_cache import DecisionCache
from router.errors import InvalidRequest
from router.judge import JudgeRouter
from router.learn.rules import explore, gate, sampled
from router.overflow import OverflowIndex
from router.scoring import Decider
from router.types import (
    BUSY_CAUSE,
    FAST_LABEL,
    OVERFLOW_LABEL,
    Chosen,
    RouteDecision,
    RouteInput,
    RouterKind,
    parse_router_model,
)
from serving.capacity import choose_tier
from serving.cascade import CascadeOverride, CascadePolicy, CascadeTrace, cascade_policy
from serving.channel.channel import TierChannel
from serving.config import AppConfig
from serving.ingress.errors import ModelNotFound
from serving.ingress.protocol import TierserveOptions
from serving.ingress.router_calls import OverflowCopy, RouterCalls
from serving.ingress.sessions import SessionKey, SessionStore, sticky_reason
from serving.metrics import Metrics
from serving.types import ChatMessage, GenerationRequest, SamplingOptions

logger = logging.getLogger(__name__)


def router_label(decision: RouteDecision) -> str:
    """The router as headers, the query log and the metrics name it: `knn-static` (the static overflow),
    `knn-fast` (the static first pass), else `decision.router`."""
    return OVERFLOW_LABEL if decision.overflow else FAST_LABEL if decision.fast else decision.router


@dataclass(frozen=True)
class Outcome:
    """What happened to a request: the routing decision, the tier load moved it to, the cascade's trace."""

    decision: RouteDecision
    """Where the request was routed (the router's decision, or the tier it named)."""
    entry_tier: str
    """The tier it started on: the routed one, or a neighbour when load moved it."""
    routed: bool = True
    """False when the request named its tier (`model`, or `tierserve.tier`): no router, no spill, no learning."""
    capacity: str | None = None
    """How load moved the request (e.g. `spill_up:spill_up`), None when it stayed on its routed tier."""
    trace: CascadeTrace | None = None
    """The cascade's tiers and confidences (None: no cascade, the entry tier answered)."""
    cascade_thresholds: tuple[float, ...] = ()
    """The request's cascade threshold per tier index (empty without a cascade)."""
    explored: bool = False
    """The router chose a tier above the cheapest, and exploration (`router.learn.explore_rate`) started the
    request on the cheapest tier anyway, its cascade judging the answer (`Planner.explore`)."""

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


RECENT_TTL_S = 5.0
"""How long the ingress keeps the router's decisions to answer repeats while the router is busy."""


class RouterQueue:
    """The router deployment's queue as the ingress estimates it: the last answer's report (`QueueReport`), less
    the time since (the router works through it), plus what each request sent since adds.

    Past `router.max_queue_wait_s` the router answers the busy fallback itself, after a call that costs a round trip
    through Ray Serve's handle (the ingress and the router replica both spend CPU on it, and under load it took a
    large part of a request's time to first token). While the estimate is over that limit, the ingress decides the
    fallback here instead; it sends a request again once the estimate, less the way to the router, has run down,
    about as often as the router can take one (the router still refuses what it cannot take in time)."""

    def __init__(self, limit_s: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit_s = limit_s
        self.clock = clock
        self._queued_s = 0.0
        """The estimate as of `_at`."""
        self._at = 0.0
        self._item_s = 0.0
        """What one request adds (the last report's)."""
        self._way_s = 0.0
        """The way from here to the router (half the last call's time outside the router)."""

    def note(self, decision: RouteDecision, call_s: float = 0.0) -> None:
        """Take the queue an answer reports (one from a router that reports none leaves the estimate alone).
        `call_s`: how long the call took here; what the router did not spend on it (`overhead_ms`) was the way
        there and back, and the queue ran down for the way back (half of it) before the report arrived."""
        if decision.queue is not None:
            self._way_s = max(0.0, call_s - decision.overhead_ms / 1000) / 2
            self._queued_s, self._item_s = decision.queue.wait_s, decision.queue.item_s
            self._at = self.clock() - self._way_s

    def queued_s(self) -> float:
        """The router's expected wait now: the estimate less the time since (the router works through it; an
        idle router saves no time for later)."""
        now = self.clock()
        self._queued_s, self._at = max(0.0, self._queued_s - (now - self._at)), now
        return self._queued_s

    def admit(self) -> float | None:
        """None: send the request (it joins the estimate); else the queue it would wait behind (over the limit),
        for the busy fallback to answer."""
        queued = self.queued_s()
        # A request sent now reaches the router `_way_s` later, when the queue has run down by that much more:
        # the router itself refuses what it cannot take, so the ingress sends until then.
        if self.limit_s is not None and queued - self._way_s > self.limit_s:
            return queued
        self._queued_s += self._item_s
        return None


class Planner:
    """Decides each request's entry tier, moves it by load, and resolves its cascade policy."""

    def __init__(self, config: AppConfig, channel: TierChannel, metrics: Metrics, router: RouterCalls | None,
                 sessions: SessionStore | None) -> None:
        self.config = config
        self.channel = channel
        self.metrics = metrics
        self.router = router
        """The kNN / classifier router, in this process or behind its deployment's handle (None: none runs)."""
        self.sessions = sessions
        self.tier_names = list(config.tier_names)
        self.local = Decider(config.router, self.tier_names)
        """Heuristic, cheapest, judge and fallback decisions, made here."""
        self._judge = JudgeRouter(self._ask_cheapest)
        self._served = {(t.served_model_name or t.name): t.name for t in config.tiers}
        one_remote_queue = config.router.placement != "ingress" and config.router.num_replicas == 1
        self.router_queue = RouterQueue(config.router.max_queue_wait_s if one_remote_queue else None)
        """Only where a round trip is saved and one router queue serves this ingress: the router inside the
        ingress checks its own queue and cache in this process, and Ray Serve spreads calls over several router
        replicas, whose queues one estimate cannot follow (there each replica answers its own busy fallback)."""
        one_index = config.router.placement == "ingress" or config.router.num_replicas == 1
        wanted = self.router_queue.limit_s is not None or config.router.resolved_static_first
        self.overflow = (OverflowCopy(router, metrics) if router is not None and one_index and wanted
                         and config.router.resolved_overflow == "static" else None)
        """The router's static overflow index: the first pass (`router.static_first`) and the busy decisions
        made here (where the router is in this process, it decides its busy ones with its own). Not with several
        router replicas, each of which has an index of its own."""
        self._static_first, self._default_router = config.router.resolved_static_first, config.router.default_router
        self.recent = DecisionCache(config.router.decision_cache_size,
                                    min(config.router.decision_cache_ttl_s, RECENT_TTL_S))
        """The router's decisions of the last seconds by text, answered from here while the router is too busy to
        ask (its own cache would have answered them at once). Not cleared when the exemplars change (the
        router's cache is): the short life bounds how long a decision made on the old ones can be served."""

    async def plan(self, model: str, routing_text: str, options: TierserveOptions,
                   session: SessionKey | None = None, request_id: str = "") -> Outcome:
        """Where the request starts: the tier it names, else its conversation's tier or the router's, moved by
        load (`place`). `request_id` draws it into `router.shadow`'s sample (deterministic per id)."""
        names = self.tier_names
        if options.tier is not None:
            if options.tier not in names:
                raise ModelNotFound(f"tierserve.tier '{options.tier}' is not a tier; choose one of {names}.",
                                    param="tierserve.tier")
            return Outcome(self._chosen(options.tier, "forced", "tierserve.tier in the request"), options.tier,
                           routed=False)
        if model in names or model in self._served:
            tier = model if model in names else self._served[model]
            return Outcome(self._chosen(tier, "explicit", "model names a tier"), tier, routed=False)
        shadow = self.config.router.shadow
        if options.shadow and not shadow.enabled:
            raise InvalidRequest("tierserve.shadow is true, but this deployment runs no shadow router; set "
                                 "router.shadow.enabled (and its candidate) in the config, or drop the field.",
                                 param="tierserve.shadow")
        wanted = shadow.enabled and (sampled(request_id, shadow.sample_rate, salt="shadow") if options.shadow is None
                                     else options.shadow)
        return self.place(await self.route(model, routing_text, options, session, shadow=wanted))

    async def route(self, model: str, routing_text: str, options: TierserveOptions,
                    session: SessionKey | None = None, *, shadow: bool = False) -> RouteDecision:
        """The routing decision for `model="auto"` / `router-*` (the session's tier when it continues one)."""
        names = self.tier_names
        if model != "auto" and not model.startswith("router-"):
            raise ModelNotFound(
                f"The model '{model}' does not exist. Use 'auto', 'router-<name>[-<threshold>]' or a tier: {names}.",
                param="model", code="model_not_found",
            )
        if not options.routing:
            return self._chosen(names[0], "cheapest", "routing disabled by the request")
        if session is None or self.sessions is None:
            return await self._route(model, routing_text, options, shadow)
        return self._remembered(session) or replace(await self._route(model, routing_text, options, shadow),
                                                    session=session.key)

    def place(self, decision: RouteDecision) -> Outcome:
        """The routed tier, or a neighbour when load says so (`capacity.enabled`)."""
        names, cfg = self.tier_names, self.config.capacity
        if not cfg.enabled:
            return Outcome(decision, decision.tier)
        thresholds = decision.thresholds if len(decision.thresholds) == len(names) - 1 else self.local.thresholds
        moved = choose_tier(names.index(decision.tier), 0.5 if decision.score is None else decision.score,
                            thresholds, self.channel.loads(cfg.stats_max_age_s), names, cfg, now=time.time(),
                            inflight=self.channel.inflight)
        if moved.action == "keep":
            return Outcome(decision, decision.tier)
        self.metrics.capacity_moves.labels(decision.tier, moved.tier).inc()
        if decision.router == "session" and moved.tier != decision.tier:
            decision = replace(decision, reason=f"{decision.reason}; {decision.tier} is saturated, so this turn "
                                                f"moved to {moved.tier} ({moved.action}); the session stays on "
                                                f"{decision.tier}")
        return Outcome(decision, moved.tier, capacity=f"{moved.action}:{moved.reason}")

    def explore(self, placed: Outcome, policy: CascadePolicy | None, request_id: str, key_id: str | None) -> Outcome:
        """`router.learn`'s exploration: a share of the requests the router sends above the cheapest tier start on
        the cheapest one instead, where their cascade judges the answer (the tier above answers when it is not
        good enough), so the router keeps learning where it has stopped trying the cheap tier. Never for a key
        whose traffic is not learned from, nor when load already moved the request or the cheapest tier is full."""
        learn = self.config.router.learn
        if not learn.enabled or not placed.routed or placed.capacity is not None or policy is None:
            return placed
        if gate(key_id, learn) is not None or not explore(placed.decision, request_id, learn.explore_rate,
                                                          cascading=True):
            return placed
        cheapest = self.tier_names[0]
        if not self.channel.has_room(cheapest):
            return placed
        self.metrics.explorations.labels(placed.decision.tier).inc()
        return replace(placed, entry_tier=cheapest, explored=True)

    def cascade(self, placed: Outcome, options: TierserveOptions) -> CascadePolicy | None:
        """The request's cascade policy (config and its `tierserve` options), None when it does not cascade."""
        asked = options.cascade is not None or options.cascade_method or options.cascade_threshold is not None
        if not asked and not self.config.cascade.enabled:
            return None  # cascades off, and this request does not ask for one
        override = None
        if asked:
            override = CascadeOverride(enabled=options.cascade, method=options.cascade_method,
                                       threshold=options.cascade_threshold)
        return cascade_policy(self.config.cascade, self.tier_names, routed=placed.routed, override=override)

    def _chosen(self, tier: str, how: RouterKind | Chosen, reason: str) -> RouteDecision:
        return RouteDecision(tier=tier, tier_index=self.tier_names.index(tier), router=how, score=None,
                             thresholds=(), reason=reason)

    def _remembered(self, session: SessionKey) -> RouteDecision | None:
        """The tier a continuing conversation answered on last, if this replica remembers it."""
        remembered = self.sessions.get(session.key) if self.sessions and session.continuing else None
        if remembered is None or remembered.tier not in self.tier_names:
            return None
        self.metrics.routing.labels("session", remembered.tier).inc()
        return RouteDecision(
            tier=remembered.tier, tier_index=self.tier_names.index(remembered.tier), router="session",
            score=None, thresholds=self.local.thresholds,
            reason=sticky_reason(session, remembered, self.sessions.now()), session=session.key,
        )

    async def _route(self, model: str, routing_text: str, options: TierserveOptions, shadow: bool) -> RouteDecision:
        kind: RouterKind | None = None
        threshold = None
        if model != "auto":
            try:
                kind, threshold = parse_router_model(model)
            except ValueError as exc:
                raise ModelNotFound(str(exc), param="model", code="model_not_found") from None
        if options.threshold is not None:
            threshold = options.threshold
        item = RouteInput(text=routing_text, threshold=threshold, router=kind, shadow=shadow)
        started = time.perf_counter()
        decision = await self._decide(item, kind or self.config.router.default_router)
        decision = replace(decision, overhead_ms=(time.perf_counter() - started) * 1000)
        router = router_label(decision)
        self.metrics.routing.labels(router, decision.tier).inc()
        self.metrics.routing_overhead.labels(router).observe(decision.overhead_ms / 1000)
        if decision.fallback:
            self.metrics.router_fallbacks.labels(decision.reason.split(";")[0][:60]).inc()
        if decision.busy:  # the busy fallback's share is an alert (TierserveRouterBusy)
            self.metrics.router_busy_fallbacks.inc()
        if decision.cached:
            self.metrics.router_cached_decisions.inc()
        if shadow:
            self.metrics.shadow_decisions.labels("decided" if decision.shadow is not None else "skipped").inc()
        return decision

    async def _decide(self, item: RouteInput, kind: RouterKind) -> RouteDecision:
        timeout_s = self.config.ingress.router_timeout_s
        if kind == "cheapest" or (kind == "heuristic" and (not item.shadow or self.router is None)):
            return self.local.local(item, kind)  # a shadowed one goes to the router, where the candidate runs
        if kind == "judge":
            try:
                verdict = await asyncio.wait_for(self._judge.verdict(item.text), timeout_s)
            except TimeoutError:
                return self.local.fallback(item, "judge timed out")
            cheapest = self.tier_names[0]
            reason = (f"judge: P(hard) {verdict.p_hard:.3f} from the {cheapest} tier (yes/no mass "
                      f"{verdict.answer_mass:.3f})" if verdict.answered
                      else f"judge: the call to the {cheapest} tier failed; P(hard) {verdict.p_hard}")
            return self.local.decide(item, "judge", verdict.p_hard, reason)
        if self.router is None:
            return self.local.fallback(item, "no router deployment")
        static = self._static(item)
        scores = None  # the static scores, computed once for the first pass and the busy overflow alike
        if static is not None and self._static_first and not item.shadow and static.decides_first:
            scores = static.score(item)
            if (fast := static.first(item, self.local, scores)) is not None:
                return fast
        if (queued_s := self.router_queue.admit()) is not None:  # the router would answer this, after a round trip
            if kind == "heuristic":  # shadowed: the candidate skips this one, the heuristic decides here
                return self.local.local(item, kind)
            if (known := self.recent.get(item, kind)) is not None:
                return known  # a text the router decided moments ago: its decision, as its cache would answer
            note = f"~{queued_s:.2f} s of decisions were queued (the router's last report)"
            if static is not None and (decision := static.decide(item, self.local, note, scores)) is not None:
                return decision
            decision = self.local.fallback(item, BUSY_CAUSE)
            return replace(decision, reason=f"{decision.reason}; {note}")
        try:
            called = time.perf_counter()
            decision = await asyncio.wait_for(self.router.route(replace(item, deadline=time.time() + timeout_s)),
                                              timeout_s)
            if self.router_queue.limit_s is not None:  # the copy serves only the gate above
                self.router_queue.note(decision, time.perf_counter() - called)
                self.recent.put(item, kind, replace(decision, shadow=None), generation=self.recent.generation)
            return decision
        except TimeoutError:  # slow (overloaded): never a 5xx for that
            logger.warning("router deployment took over ingress.router_timeout_s (%.1f s); the static overflow "
                           "or the heuristic decides", timeout_s)
            note = f"the router took over ingress.router_timeout_s ({timeout_s:.1f} s)"
            latest = self._static(item)  # the copy may have arrived while the call waited
            decision = latest.decide(item, self.local, note, scores if latest is static else None) if latest else None
            return decision or self.local.fallback(item, "router deployment: timed out")
        except Exception as exc:  # noqa: BLE001 - the router deployment is down: never a 5xx for that
            logger.warning("router deployment failed (%s: %s); heuristic fallback", type(exc).__name__, exc)
            return self.local.fallback(item, f"router deployment: {type(exc).__name__}")

    def exemplars_changed(self) -> None:
        """The exemplars changed through this ingress: the first pass waits for the router's index of the new
        ones (the router's own decisions follow at once)."""
        if self.overflow is not None:
            self.overflow.changed()

    def _static(self, item: RouteInput) -> OverflowIndex | None:
        """This ingress's copy of the static index, where it may decide `item` (None: it has none yet, or the
        request asked for another router than kNN). The first pass runs on it with `router.static_first`
        (never for a request drawn for the shadow router, which runs in the router); a busy router's overflow
        always."""
        if self.overflow is None or (item.router or self._default_router) != "knn":
            return None
        self.overflow.follow()
        return self.overflow.index

    async def _ask_cheapest(self, prompt: str) -> list[tuple[str, float]]:
        """The LLM judge's call: one greedy token from the cheapest tier, with its top alternatives."""
        request = GenerationRequest(
            request_id=f"judge-{time.monotonic_ns()}",
            sampling=SamplingOptions(max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=20),
            messages=(ChatMessage(role="user", content=prompt),),
        )
        result, _ = await self.channel.complete(self.tier_names[0], request)
        first = result.token_logprobs[0]
        return [(first.token, first.logprob), *first.top]
