"""The ingress's side of the router learning from its traffic (`router.learn`), off the request's path:

    learning.observe(ticket, outcome)                           # once it is answered: the router learns from it
    result = await learning.feedback(response_id, score, key)   # POST /v1/feedback

`observe` is fire and forget: never awaited by the request, bounded in number (past the bound it is skipped and
counted), its failures logged and counted, never the request's. (The shadow of `router.shadow` needs no call of
its own: its decision comes back with the live one, `RouteDecision.shadow`.)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from router.errors import TierserveError
from router.learn import Feedback, LearnResult, RequestOutcome
from serving.config import AppConfig
from serving.ingress.errors import (
    Forbidden,
    NotFound,
    RouterUnavailable,
    find_tierserve_error,
)
from serving.ingress.plan import Outcome
from serving.ingress.router_calls import RouterCalls
from serving.metrics import Metrics

logger = logging.getLogger(__name__)

MAX_IN_FLIGHT = 512
"""Observations one ingress replica keeps in flight to the router at once; more are skipped: a router that
cannot keep up loses learning material, never requests."""


@dataclass(frozen=True)
class Ticket:
    """What the recorder needs of a request besides its outcome: ids, timing, its text and key."""

    request_id: str
    """Also the response id clients send feedback about."""
    endpoint: str
    started: float
    """perf_counter() when the request arrived."""
    routing_text: str | None = None
    key_id: str | None = None
    """The API key's id (`Keys.check`); None on a stack without keys."""


def request_outcome(outcome: Outcome, ticket: Ticket, tier_names: list[str]) -> RequestOutcome | None:
    """What the learner hears of an answered request; None when it could teach nothing (a named tier, or the
    top tier answered without a cascade decision, so no label and no feedback to take).

    The cascade's decision counts only where it was carried out: an answer kept because the tier above was full
    (its confidence below the threshold) is passed without it, so it is remembered for feedback but not learned
    as `kept`."""
    if not outcome.routed or ticket.routing_text is None:
        return None
    chain = outcome.tier_chain
    confidence = threshold = None
    if outcome.confidences and outcome.cascade_thresholds:
        first, bar = outcome.confidences[0], outcome.scored_thresholds(tier_names)[0]
        if len(chain) > 1 or first >= bar:
            confidence, threshold = first, bar
    if confidence is None and chain[-1] == tier_names[-1]:
        return None
    return RequestOutcome(response_id=ticket.request_id, text=ticket.routing_text, tier_chain=chain,
                          confidence=confidence, threshold=threshold, api_key_id=ticket.key_id,
                          explored=outcome.explored)


class Learning:
    """Tells the router's learner what the ingress saw; one per ingress replica."""

    def __init__(self, config: AppConfig, router: RouterCalls, metrics: Metrics) -> None:
        self.learn = config.router.learn
        self.tier_names = list(config.tier_names)
        self.router = router
        self.metrics = metrics
        self._tasks: set[asyncio.Task] = set()
        self._observing: dict[str, asyncio.Task] = {}
        """Observations not yet delivered, by response id: a feedback on one waits for it."""

    @classmethod
    def build(cls, config: AppConfig, router: RouterCalls | None, metrics: Metrics) -> Learning | None:
        """None when learning is off, or no router runs."""
        if router is None or not config.router.learn.enabled:
            return None
        return cls(config, router, metrics)

    def observe(self, ticket: Ticket, outcome: Outcome) -> None:
        """Tell the router's learner about an answered request (fire and forget)."""
        if not self.learn.enabled:
            return
        told = request_outcome(outcome, ticket, self.tier_names)
        if told is None:
            return
        task = self._spawn(self._observe(told), "observe")
        if task is not None:
            self._observing[told.response_id] = task
            task.add_done_callback(lambda _: self._observing.pop(told.response_id, None))

    async def feedback(self, response_id: str, score: float, key_id: str | None) -> LearnResult:
        """A client's score of an answer, passed to the router's learner (its observation first, if this replica
        is still delivering it)."""
        pending = self._observing.get(response_id)
        if pending is not None:
            await asyncio.wait([pending], timeout=5.0)
        try:
            result = await self.router.feedback(Feedback(response_id, score, key_id))
        except Exception as exc:
            if find_tierserve_error(exc) is not None:
                raise
            raise RouterUnavailable(f"The router did not take the feedback ({type(exc).__name__}); retry shortly.",
                                    code="router_unavailable", headers={"Retry-After": "5"}) from None
        self.metrics.learn_verdicts.labels("feedback", result.verdict).inc()
        return result

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    async def _observe(self, told: RequestOutcome) -> None:
        result = await self.router.observe(told)
        self.metrics.learn_verdicts.labels("observe", result.verdict).inc()

    def _spawn(self, call: Coroutine[Any, Any, Any], name: str) -> asyncio.Task | None:
        if len(self._tasks) >= MAX_IN_FLIGHT:
            call.close()
            self.metrics.learn_calls_failed.labels(f"{name}_dropped").inc()
            return None
        task = asyncio.get_running_loop().create_task(call)
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._done(t, name))
        return task

    def _done(self, task: asyncio.Task, name: str) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()  # retrieved, so asyncio does not log it again
        if exc is not None:
            self.metrics.learn_calls_failed.labels(name).inc()
            logger.warning("router %s call failed (%s: %s); the request was answered all the same", name,
                           type(exc).__name__, exc)


def feedback_refusal(verdict: str, response_id: str) -> TierserveError | None:
    """The error a feedback verdict answers with; None when the feedback was taken (learned or not).

    Unknown, expired and foreign ids get the same 404, so a client learns nothing about other keys' ids."""
    if verdict == "disabled":
        return Forbidden("Feedback is off on this stack: router.learn.enabled is false, so scores are not learned "
                         "from.", code="learning_disabled")
    if verdict in ("opted_out", "anonymous"):
        return Forbidden("This API key's traffic is not learned from (router.learn.opt_out_key_ids), so its "
                         "feedback is not used.", code="opted_out")
    if verdict in ("unknown_response", "expired_response", "foreign_response"):
        return NotFound(f"No answer with id '{response_id}' is open for feedback: the id is unknown, its feedback "
                        "window (router.learn.feedback_window_s) has passed, it was scored already, its tier was "
                        "named in the request (only routed answers teach the router), or another key got it.",
                        param="response_id", code="response_not_found")
    return None
