"""The ingress's side of learning, without Ray or a router: what the learner is told of an answered request,
which routed requests explore the cheapest tier, the status each feedback verdict answers with, the
escalation-floor gauge, the shadow's sample and the query record that carries the shadow's decision."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from types import SimpleNamespace

import pytest

from router.learn import key_id
from router.types import RouteDecision, RouteInput
from serving.cascade import CascadeTrace, TierAttempt, cascade_policy
from serving.channel.channel import TierChannel
from serving.config import parse_config
from serving.ingress.app import Recorder
from serving.ingress.learning import Ticket, feedback_refusal, request_outcome
from serving.ingress.plan import Outcome, Planner
from serving.metrics import Metrics
from serving.querylog import read_records

TIERS = ["small", "large"]


def config(tmp_path, **router):
    tier = {"engine": {"kv_cache_memory_bytes": 1 << 20}}
    return parse_config({
        "tiers": [{"name": "small", "model": "m1", **tier}, {"name": "large", "model": "m2", **tier}],
        "query_log": {"path": str(tmp_path / "querylog")},
        "cascade": {"enabled": True, "threshold": 0.6, "tier_target_escalation_rates": {"small": 0.3},
                    "tier_min_escalation_rates": {"small": 0.22}},
        "router": {"learn": {"enabled": True, "explore_rate": 0.5}, **router},
    }, "test")


def knn(tier: str) -> RouteDecision:
    return RouteDecision(tier, TIERS.index(tier), "knn", 0.9 if tier == "large" else 0.1, (0.5,), "test")


def cascaded(entry: str, confidence: float, *, escalated: bool, routed_to: str | None = None) -> Outcome:
    attempts = [TierAttempt(entry, 10, 3, confidence, escalated)]
    if escalated:
        attempts.append(TierAttempt("large", 10, 5, None, False))
    return Outcome(knn(routed_to or entry), entry, trace=CascadeTrace(tuple(attempts)), cascade_thresholds=(0.6, 0.6))


TICKET = Ticket("chatcmpl-1", "chat", 0.0, "Convert these names to JSON", "k1")


def test_the_learner_hears_a_decided_cascade_and_answers_it_can_take_feedback_on() -> None:
    up = request_outcome(cascaded("small", 0.31, escalated=True), TICKET, TIERS)
    assert (up.tier_chain, up.confidence, up.threshold, up.api_key_id) == (("small", "large"), 0.31, 0.6, "k1")
    assert (up.response_id, up.text) == ("chatcmpl-1", "Convert these names to JSON")
    kept = request_outcome(cascaded("small", 0.9, escalated=False), TICKET, TIERS)
    assert (kept.tier_chain, kept.confidence) == (("small",), 0.9)
    # Unsure, but kept because the tier above was full: the decision was not carried out, so it is not a label,
    # though the answer still takes feedback.
    refused = request_outcome(cascaded("small", 0.31, escalated=False), TICKET, TIERS)
    assert (refused.tier_chain, refused.confidence, refused.threshold) == (("small",), None, None)
    plain_small = request_outcome(Outcome(knn("small"), "small"), TICKET, TIERS)
    assert plain_small.confidence is None and plain_small.tier_chain == ("small",)
    explored = replace(cascaded("small", 0.9, escalated=False, routed_to="large"), explored=True)
    assert request_outcome(explored, TICKET, TIERS).explored
    # Nothing to learn and nothing to score: the top tier without a cascade, or a tier the client named.
    assert request_outcome(Outcome(knn("large"), "large"), TICKET, TIERS) is None
    assert request_outcome(replace(cascaded("small", 0.9, escalated=False), routed=False), TICKET, TIERS) is None


def test_feedback_verdicts_answer_403_404_or_200_and_a_foreign_id_looks_unknown() -> None:
    assert feedback_refusal("disabled", "r").status_code == 403
    assert "opt_out_key_ids" in feedback_refusal("opted_out", "r").message
    foreign, unknown = feedback_refusal("foreign_response", "r"), feedback_refusal("unknown_response", "r")
    assert foreign.status_code == unknown.status_code == 404 and foreign.envelope() == unknown.envelope()
    assert feedback_refusal("expired_response", "r").envelope() == unknown.envelope()
    assert unknown.param == "response_id"
    for taken in ("learned", "sampled_out", "no_label", "label_cap", "key_cap", "key_share"):
        assert feedback_refusal(taken, "r") is None


class FullChannel(TierChannel):
    def has_room(self, tier: str) -> bool:
        return False


def test_exploration_starts_a_share_of_requests_routed_up_on_the_cheapest_tier(tmp_path) -> None:
    cfg = config(tmp_path, **{"learn": {"enabled": True, "explore_rate": 0.5, "opt_out_key_ids": [key_id("sk-o")]}})
    metrics = Metrics()
    planner = Planner(cfg, TierChannel(TIERS, cfg.capacity, token="t" * 32), metrics, None, None)
    policy = cascade_policy(cfg.cascade, TIERS, routed=True)
    up = Outcome(knn("large"), "large")
    moved = [planner.explore(up, policy, f"chatcmpl-{i}", "k1") for i in range(400)]
    explored = [o for o in moved if o.explored]
    assert 150 < len(explored) < 250  # the configured half, by the request id's hash
    assert {(o.entry_tier, o.decision.tier) for o in explored} == {("small", "large")}
    assert metrics.registry.get_sample_value("tierserve_learn_explorations_total", {"routed_tier": "large"}) == len(
        explored)
    rid = next(f"chatcmpl-{i}" for i, o in enumerate(moved) if o.explored)
    assert planner.explore(up, policy, rid, "k1").explored  # the same request always gets the same answer
    # Never: without a cascade to judge the cheap answer, for an opted-out key, a tier the client named, a
    # request load already moved, a full cheapest tier, or a request routed to the cheapest tier anyway.
    assert not planner.explore(up, None, rid, "k1").explored
    assert not planner.explore(up, policy, rid, key_id("sk-o")).explored
    assert not planner.explore(replace(up, routed=False), policy, rid, "k1").explored
    assert not planner.explore(replace(up, capacity="spill_up:x"), policy, rid, "k1").explored
    assert not planner.explore(Outcome(knn("small"), "small"), policy, rid, "k1").explored
    full = Planner(cfg, FullChannel(TIERS, cfg.capacity, token="t" * 32), metrics, None, None)
    assert not full.explore(up, policy, rid, "k1").explored
    off = config(tmp_path, learn={"enabled": False, "explore_rate": 0.5})
    assert not Planner(off, TierChannel(TIERS, off.capacity, token="t" * 32), metrics, None, None).explore(
        up, policy, rid, "k1").explored


def test_the_escalation_floor_gauge_is_set_beside_the_target(tmp_path) -> None:
    metrics = Metrics()
    Recorder(config(tmp_path), metrics, None).close()
    assert metrics.registry.get_sample_value("tierserve_cascade_escalation_floor", {"tier": "small"}) == 0.22
    assert metrics.registry.get_sample_value("tierserve_cascade_escalation_target", {"tier": "small"}) == 0.3
    assert metrics.registry.get_sample_value("tierserve_cascade_escalation_floor", {"tier": "large"}) is None


def test_the_query_record_carries_the_shadow_decision_that_came_with_the_live_one(tmp_path) -> None:
    cfg = config(tmp_path, learn={"enabled": False}, shadow={"enabled": True, "candidate": "knn", "threshold": 0.3})
    recorder = Recorder(cfg, Metrics(), None)
    shadowed = Outcome(replace(knn("small"), shadow=knn("large")), "small")
    recorder.record(replace(TICKET, request_id="shadowed", started=time.perf_counter()), shadowed, 200)
    recorder.record(replace(TICKET, request_id="none", started=time.perf_counter()), Outcome(knn("small"), "small"),
                    200)
    recorder.close()
    records = {r.request_id: r for r in read_records(recorder.query_log.directory)}
    shadowed, none = records["shadowed"], records["none"]
    assert (shadowed.shadow_router, shadowed.shadow_tier, shadowed.shadow_score) == ("knn@0.3", "large", 0.9)
    assert (shadowed.routed_tier, shadowed.tier) == ("small", "small")
    assert none.shadow_router is None and none.shadow_tier is None and none.status == "ok"


class Router:
    """What the planner asks of the router deployment (`RouterCalls.route`), recording the inputs."""

    def __init__(self, default_router: str) -> None:
        self.asked: list[RouteInput] = []
        self.default_router = default_router

    async def route(self, request: RouteInput) -> RouteDecision:
        self.asked.append(request)
        decision = knn("large")
        return replace(decision, router=request.router or self.default_router,
                       shadow=knn("small") if request.shadow else None)


def test_the_planner_asks_for_the_shadow_on_its_sample_and_counts_it(tmp_path) -> None:
    """`router.shadow.sample_rate` of the routed requests ask for the candidate's decision (drawn by request id);
    a shadowed heuristic request goes to the router deployment, where the candidate runs."""
    cfg = config(tmp_path, learn={"enabled": False}, default_router="heuristic",
                 shadow={"enabled": True, "candidate": "knn", "sample_rate": 0.5})
    metrics, router = Metrics(), Router(cfg.router.default_router)
    planner = Planner(cfg, TierChannel(TIERS, cfg.capacity, token="t" * 32), metrics, router, None)
    from serving.ingress.protocol import TierserveOptions

    async def main() -> list[Outcome]:
        return [await planner.plan("auto", "Convert these names to JSON", TierserveOptions(), None, f"r{i}")
                for i in range(40)]

    outcomes = asyncio.run(main())
    asked = len(router.asked)
    assert 8 <= asked <= 32 and all(item.shadow and item.router is None for item in router.asked)
    assert sum(o.decision.shadow is not None for o in outcomes) == asked
    assert all(o.decision.router == "heuristic" for o in outcomes)  # the rest decided in the ingress
    decided = metrics.registry.get_sample_value("tierserve_shadow_decisions_total", {"result": "decided"})
    assert decided == asked
    again = asyncio.run(planner.plan("auto", "Convert these names to JSON", TierserveOptions(), None, "r0"))
    assert (again.decision.shadow is not None) == router.asked[0].shadow  # the same id, the same draw


def test_a_request_can_ask_for_the_shadow_or_keep_out_of_it(tmp_path) -> None:
    """`tierserve.shadow`: true always shadows, false never, whatever the sample; true without a shadow router is
    a 400 naming the field."""
    from router.errors import InvalidRequest
    from serving.ingress.protocol import TierserveOptions

    def planner_for(shadow: dict) -> tuple[Planner, Router]:
        cfg = config(tmp_path, learn={"enabled": False}, shadow=shadow)
        router = Router(cfg.router.default_router)
        return Planner(cfg, TierChannel(TIERS, cfg.capacity, token="t" * 32), Metrics(), router, None), router

    planner, router = planner_for({"enabled": True, "candidate": "knn", "threshold": 0.3, "sample_rate": 0.5})

    async def plan_all(p: Planner, shadow: bool | None) -> list[Outcome]:
        return [await p.plan("auto", "Convert these names to JSON", TierserveOptions(shadow=shadow), None, f"r{i}")
                for i in range(20)]

    assert all(o.decision.shadow is not None for o in asyncio.run(plan_all(planner, True)))
    assert all(o.decision.shadow is None for o in asyncio.run(plan_all(planner, False)))
    assert [item.shadow for item in router.asked] == [True] * 20 + [False] * 20
    planner, _ = planner_for({"enabled": False})
    with pytest.raises(InvalidRequest) as refused:
        asyncio.run(plan_all(planner, True))
    assert refused.value.param == "tierserve.shadow" and "router.shadow.enabled" in str(refused.value)
    assert all(o.decision.shadow is None for o in asyncio.run(plan_all(planner, False)))


def test_feedback_needs_keys_configured_and_learning_on(tmp_path) -> None:
    """On a stack without keys nobody owns an answer: 401 naming the setting; with learning off, 403 saying so."""
    import httpx

    from serving.ingress.protocol import Keys
    from serving.ingress.routes import build_routes

    def post(keys: Keys, headers: dict | None = None) -> httpx.Response:
        parts = SimpleNamespace(config=config(tmp_path, learn={"enabled": False}), keys=keys, channel=None,
                                planner=None, router=None, metrics=Metrics(), learning=None)

        async def main() -> httpx.Response:
            transport = httpx.ASGITransport(app=build_routes(parts))
            async with httpx.AsyncClient(transport=transport, base_url="http://ingress") as client:
                return await client.post("/v1/feedback", json={"response_id": "chatcmpl-1", "score": 1.0},
                                         headers=headers)

        return asyncio.run(main())

    keyless = post(Keys(set(), set()))
    assert keyless.status_code == 401 and "http.api_keys" in keyless.json()["error"]["message"]
    off = post(Keys({"sk-1"}, set()), {"Authorization": "Bearer sk-1"})
    assert off.status_code == 403 and off.json()["error"]["code"] == "learning_disabled"


def test_an_explored_turn_leaves_its_conversation_on_the_routed_tier(tmp_path) -> None:
    from serving.ingress.sessions import SessionStore

    sessions = SessionStore(60.0, 100)
    recorder = Recorder(config(tmp_path), Metrics(), sessions)
    probe = replace(cascaded("small", 0.9, escalated=False, routed_to="large"), explored=True)
    probe = replace(probe, decision=replace(probe.decision, session="s1"))
    recorder.record(replace(TICKET, started=time.perf_counter()), probe, 200)
    assert sessions.get("s1").tier == "large"  # the small tier answered this once; the conversation stays up
    recorder.close()
