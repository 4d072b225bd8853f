"""The ingress answers the router's busy fallback itself while the router's last reported queue is over
`router.max_queue_wait_s`, and calls the router again once that queue has run down."""

from __future__ import annotations

import asyncio

from router.types import QueueReport, RouteDecision, RouteInput
from serving.channel.channel import TierChannel
from serving.config import parse_config
from serving.ingress.plan import Planner, RouterQueue
from serving.ingress.protocol import TierserveOptions
from serving.metrics import Metrics

TIERS = ["small", "large"]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def report(wait_s: float, item_s: float = 0.0) -> RouteDecision:
    return RouteDecision("small", 0, "knn", 0.1, (0.5,), "test", queue=QueueReport(wait_s, item_s))


def test_the_estimate_runs_down_with_time_and_grows_with_each_request_sent() -> None:
    clock = Clock()
    queue = RouterQueue(limit_s=0.25, clock=clock)
    assert queue.admit() is None  # nothing reported: call the router
    queue.note(report(0.6, item_s=0.1))
    assert queue.admit() == 0.6
    clock.now += 0.2
    assert abs(queue.admit() - 0.4) < 1e-9  # held: not counted as sent
    clock.now += 0.2  # 0.2 s left: one more request of 0.1 s goes, and the estimate is over the limit again
    assert queue.admit() is None and abs(queue.queued_s() - 0.3) < 1e-9
    assert queue.admit() is not None
    clock.now += 0.1  # the router worked through one: room for one again
    assert queue.admit() is None and queue.admit() is not None
    queue.note(RouteDecision("small", 0, "heuristic", 0.1, (0.5,), "test"))  # no report: the estimate stays
    assert abs(queue.queued_s() - 0.3) < 1e-9
    queue.note(report(0.0, item_s=0.05))  # a new report replaces it, and what was sent before it
    assert queue.queued_s() == 0.0
    assert RouterQueue(limit_s=None, clock=clock).admit() is None  # max_queue_wait_s null: never busy


def test_the_report_is_aged_by_its_way_back_from_the_router() -> None:
    """A call of 0.3 s of which the router spent 0.1 s: the report spent about 0.1 s coming back."""
    clock = Clock()
    queue = RouterQueue(limit_s=0.25, clock=clock)
    answer = RouteDecision("small", 0, "knn", 0.1, (0.5,), "test", overhead_ms=100.0, queue=QueueReport(0.5, 0.0))
    queue.note(answer, call_s=0.3)
    assert abs(queue.queued_s() - 0.4) < 1e-9
    # And a request sent now would arrive 0.1 s later, to a queue of 0.3 s: still over the limit.
    assert queue.admit() is not None
    clock.now += 0.06  # 0.34 s now, 0.24 s by the time it arrives: sent
    assert queue.admit() is None
    queue.note(answer, call_s=0.05)  # faster than the router's own time (clocks apart): not aged
    assert abs(queue.queued_s() - 0.5) < 1e-9


def test_what_was_sent_runs_down_too_so_a_quiet_spell_reopens_the_router() -> None:
    """No answer comes while the ingress holds every request: the estimate must still run down to zero."""
    clock = Clock()
    queue = RouterQueue(limit_s=0.25, clock=clock)
    queue.note(report(0.2, item_s=0.1))
    assert queue.admit() is None and queue.admit() is not None  # 0.3 s queued: held
    clock.now += 1.0  # a quiet second, no report
    assert queue.queued_s() == 0.0
    # Sent at 0, 0.1 and 0.2 s queued (within the limit), then held at 0.3 s.
    assert [queue.admit() is None for _ in range(4)] == [True, True, True, False]


class QueuedRouter:
    """The router deployment's `route` as the ingress sees it, reporting a queue of `queue_s` with each answer."""

    def __init__(self, queue_s: float, item_s: float = 0.0) -> None:
        self.queue_s, self.item_s = queue_s, item_s
        self.asked: list[RouteInput] = []

    async def route(self, request: RouteInput) -> RouteDecision:
        self.asked.append(request)
        return RouteDecision("large", 1, "knn", 0.9, (0.5,), "test", queue=QueueReport(self.queue_s, self.item_s))


def test_the_planner_decides_the_busy_fallback_itself_until_the_queue_has_run_down(tmp_path) -> None:
    cfg = parse_config({
        "tiers": [{"name": n, "model": f"m{i}", "engine": {"kv_cache_memory_bytes": 1 << 20}}
                  for i, n in enumerate(TIERS)],
        "query_log": {"path": str(tmp_path / "querylog")},
        "router": {"max_queue_wait_s": 0.25},
    }, "test")
    metrics, router, clock = Metrics(), QueuedRouter(queue_s=1.0), Clock()
    planner = Planner(cfg, TierChannel(TIERS, cfg.capacity, token="t" * 32), metrics, router, None)
    planner.router_queue.clock = clock

    def plan(text: str, model: str = "auto") -> RouteDecision:
        return asyncio.run(planner.plan(model, text, TierserveOptions(), None, "r")).decision

    first = plan("Prove that there are infinitely many primes")
    assert first.router == "knn" and len(router.asked) == 1  # reported a 1 s queue with its answer
    clock.now += 0.5
    held = [plan(f"Summarise report {i}") for i in range(5)]  # 0.5 s of it left: over the limit
    assert len(router.asked) == 1
    assert all(d.busy and d.router == "heuristic" and "router busy" in d.reason for d in held)
    assert "~0.50 s of decisions were queued (the router's last report)" in held[0].reason
    assert metrics.registry.get_sample_value("tierserve_router_busy_fallbacks_total") == 5
    # The text the router decided before gets that decision from the ingress's copy, not the fallback.
    again = plan("Prove that there are infinitely many primes")
    assert (again.router, again.tier, again.cached, again.busy) == ("knn", "large", True, False)
    assert len(router.asked) == 1
    clock.now += 0.3  # 0.2 s left: the router decides again
    router.queue_s = 0.0
    assert plan("Summarise report 0").router == "knn" and len(router.asked) == 2
    assert plan("Summarise report 1").router == "knn" and len(router.asked) == 3
    # A named tier never asks the router, busy or not.
    router.queue_s = 5.0
    plan("Summarise report 2")
    assert plan("hi", model="small").router == "explicit" and len(router.asked) == 4


def planner_with(tmp_path, **router) -> tuple[Planner, QueuedRouter, Clock, Metrics]:
    cfg = parse_config({
        "tiers": [{"name": n, "model": f"m{i}", "engine": {"kv_cache_memory_bytes": 1 << 20}}
                  for i, n in enumerate(TIERS)],
        "query_log": {"path": str(tmp_path / "querylog")},
        "router": {"max_queue_wait_s": 0.25, **router},
    }, "test")
    metrics, router_calls, clock = Metrics(), QueuedRouter(queue_s=1.0), Clock()
    planner = Planner(cfg, TierChannel(TIERS, cfg.capacity, token="t" * 32), metrics, router_calls, None)
    planner.router_queue.clock = clock
    return planner, router_calls, clock, metrics


def test_several_router_replicas_each_answer_their_own_busy_fallback(tmp_path) -> None:
    """Ray Serve spreads calls over the replicas: one estimate cannot follow their queues, so none is kept."""
    planner, router, _, _ = planner_with(tmp_path, num_replicas=2, store={"url": "http://qdrant:6333"})
    for i in range(4):
        asyncio.run(planner.plan("auto", f"text {i}", TierserveOptions(), None, "r"))
    assert len(router.asked) == 4  # every one went to the router, though each answer reported a 1 s queue


def test_the_ingress_copy_of_decisions_lives_seconds_and_a_shadowed_heuristic_is_decided_here(tmp_path) -> None:
    planner, router, _, metrics = planner_with(tmp_path, shadow={"enabled": True, "candidate": "knn"})
    assert planner.recent.ttl_s <= 5.0  # not the router cache's 300 s: it is not cleared on exemplar changes
    asyncio.run(planner.plan("auto", "Prove it", TierserveOptions(), None, "r"))  # reports a 1 s queue
    shadowed = asyncio.run(planner.plan("router-heuristic", "Say hi", TierserveOptions(shadow=True), None, "r"))
    assert shadowed.decision.router == "heuristic" and not shadowed.decision.fallback and len(router.asked) == 1
    assert metrics.registry.get_sample_value("tierserve_router_busy_fallbacks_total") == 0
