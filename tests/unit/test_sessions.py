"""Sticky sessions: the key of a conversation, the bounded map, and which tier a turn leaves behind."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import pytest

from router.errors import ConfigError, InvalidRequest
from serving.cascade import CascadeTrace, TierAttempt
from serving.channel.channel import TierChannel
from serving.config import AppConfig, parse_config
from serving.ingress.app import Recorder
from serving.ingress.learning import Ticket
from serving.ingress.plan import Outcome, Planner
from serving.ingress.protocol import TierserveOptions
from serving.ingress.sessions import (
    Remembered,
    SessionKey,
    SessionStore,
    session_key,
    sticky_reason,
    tier_to_remember,
)
from serving.metrics import Metrics
from serving.types import ChatMessage, EngineLoad, ReplicaStatus


def _chat(*turns: tuple[str, str]) -> tuple[ChatMessage, ...]:
    return tuple(ChatMessage(role=role, content=text) for role, text in turns)  # type: ignore[arg-type]


FIRST = _chat(("system", "be brief"), ("user", "plan a trip to Oslo"))
SECOND = FIRST + _chat(("assistant", "Sure: day 1 ..."), ("user", "and day 2?"))


def test_every_turn_of_a_thread_derives_the_same_key_and_only_later_turns_continue() -> None:
    first, second = session_key(None, None, FIRST), session_key(None, None, SECOND)
    assert first is not None and second is not None
    assert first.key == second.key and first.source == "conversation"
    assert first.continuing is False and second.continuing is True


def test_a_different_opening_system_prompt_or_user_is_another_session() -> None:
    base = session_key(None, None, SECOND).key
    other_opening = _chat(("system", "be brief"), ("user", "plan a trip to Bergen")) + SECOND[2:]
    other_system = _chat(("system", "be verbose")) + SECOND[1:]
    assert session_key(None, None, other_opening).key != base
    assert session_key(None, None, other_system).key != base
    assert session_key(None, "alice", SECOND).key != base
    assert session_key(None, "alice", SECOND).key != session_key(None, "bob", SECOND).key


def test_the_header_wins_over_the_messages_and_always_continues() -> None:
    a = session_key("conv-1", None, FIRST)
    b = session_key("conv-1", None, _chat(("user", "something else entirely")))
    assert a.key == b.key and a.source == "header" and a.continuing
    assert session_key("conv-2", None, FIRST).key != a.key
    assert session_key("conv-1", None, None).key == a.key  # completions carry the header too
    assert a.key != session_key(None, None, FIRST).key


def test_no_session_without_header_or_user_message() -> None:
    assert session_key(None, None, None) is None
    assert session_key(None, None, _chat(("system", "only a system prompt"))) is None


@pytest.mark.parametrize("value", ["", "   ", "x" * 257])
def test_a_bad_header_is_a_400_naming_it(value: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        session_key(value, None, FIRST)
    assert err.value.param == "x-tierserve-session" and "256" in str(err.value)


def test_keys_are_hashes_not_client_text() -> None:
    key = session_key("my secret conversation id", None, None).key
    assert "secret" not in key and len(key) == 32


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_store_expires_entries_after_the_ttl_since_the_last_answer() -> None:
    clock = Clock()
    store = SessionStore(ttl_s=60, max_entries=10, clock=clock)
    store.put("a", "small")
    clock.t += 59
    assert store.get("a") == Remembered("small", 1000.0)
    store.put("a", "large")  # a new answered turn restarts the TTL
    clock.t += 59
    assert store.get("a").tier == "large"
    clock.t += 2
    assert store.get("a") is None and len(store) == 0


def test_store_drops_the_least_recently_used_past_max_entries() -> None:
    store = SessionStore(ttl_s=60, max_entries=2, clock=Clock())
    store.put("a", "small")
    store.put("b", "small")
    assert store.get("a") is not None  # a is now the most recent
    store.put("c", "large")
    assert store.get("b") is None
    assert store.get("a").tier == "small" and store.get("c").tier == "large" and len(store) == 2


def test_an_escalation_moves_the_session_a_load_spill_does_not() -> None:
    assert tier_to_remember("small", "small", escalated=False, moved_by_load=False) == "small"
    assert tier_to_remember("small", "large", escalated=True, moved_by_load=False) == "large"
    assert tier_to_remember("small", "large", escalated=False, moved_by_load=True) == "small"
    assert tier_to_remember("small", "large", escalated=True, moved_by_load=True) == "large"


def test_the_reason_names_the_session_its_origin_and_tier() -> None:
    key = SessionKey("0123456789abcdef" * 2, "conversation", True)
    reason = sticky_reason(key, Remembered("large", 100.0), now=130.4)
    assert reason == ("session 01234567 (derived from the conversation's opening) stays on large, the tier of "
                      "its last answer 30 s ago")


def _config(**sessions: object) -> dict:
    tier = {"engine": {"kv_cache_memory_bytes": 1 << 20}}
    return {"tiers": [{"name": "small", "model": "m", **tier}], "sessions": sessions}


def test_sessions_config_defaults_and_bounds_name_the_field() -> None:
    cfg = parse_config(_config()).sessions
    assert cfg.enabled and cfg.ttl_s == 1800 and cfg.max_entries == 100_000
    with pytest.raises(ConfigError, match=r"sessions\.ttl_s: Input should be greater than 0 \(got -1\)"):
        parse_config(_config(ttl_s=-1))
    with pytest.raises(ConfigError, match=r"sessions\.max_entries: .*greater than or equal to 1 \(got 0\)"):
        parse_config(_config(max_entries=0))
    with pytest.raises(ConfigError, match=r"sessions\.ttl: unknown field"):
        parse_config(_config(ttl=5))


# ---- the planner's decision and the recorder's memory (no Ray: the tiers are never called) ------------------


@dataclass
class Ingress:
    """The parts of an ingress replica that decide and remember a conversation's tier."""

    config: AppConfig
    channel: TierChannel
    planner: Planner
    recorder: Recorder

    @property
    def sessions(self) -> SessionStore | None:
        return self.planner.sessions

    async def plan(self, model: str, text: str, options: TierserveOptions, session):
        """The decision: the named tier's, or the router's (the conversation's tier when it continues)."""
        return (await self.planner.plan(model, text, options, session)).decision


def _ingress(capacity: dict | None = None, **sessions: object) -> Ingress:
    tier = {"engine": {"kv_cache_memory_bytes": 1 << 20}}
    config = parse_config({"tiers": [{"name": "small", "model": "m1", **tier}, {"name": "large", "model": "m2", **tier}],
                           "router": {"default_router": "cheapest"}, "query_log": {"enabled": False},
                           "sessions": sessions, "capacity": capacity or {}})
    metrics = Metrics()
    store = SessionStore(config.sessions.ttl_s, config.sessions.max_entries) if config.sessions.enabled else None
    channel = TierChannel(config.tier_names, config.capacity, token="t" * 32)
    return Ingress(config, channel, Planner(config, channel, metrics, None, store), Recorder(config, metrics, store))


def _answered(ingress: Ingress, plan, chain: list[str], *, escalated: bool = False, capacity: str | None = None,
              status: int = 200) -> None:
    attempts = tuple(TierAttempt(t, 1, 1, None, escalated and i < len(chain) - 1) for i, t in enumerate(chain))
    outcome = Outcome(plan, chain[0], capacity=capacity, trace=CascadeTrace(attempts))
    ingress.recorder.record(Ticket("r", "chat", time.perf_counter()), outcome, status)


def test_a_conversation_keeps_an_escalated_session_on_its_tier_and_a_named_tier_wins() -> None:
    ingress, opts = _ingress(), TierserveOptions()
    first, later = session_key(None, None, FIRST), session_key(None, None, SECOND)

    async def flow() -> None:
        plan = await ingress.plan("auto", "x", opts, first)
        assert (plan.router, plan.tier, plan.session) == ("cheapest", "small", first.key)
        _answered(ingress, plan, ["small", "large"], escalated=True)
        sticky = await ingress.plan("auto", "x", opts, later)
        assert (sticky.router, sticky.tier) == ("session", "large") and "stays on large" in sticky.reason
        named = await ingress.plan("small", "x", opts, later)
        assert (named.router, named.session) == ("explicit", None)
        forced = await ingress.plan("auto", "x", TierserveOptions(tier="small"), later)
        assert forced.router == "forced"
        assert (await ingress.plan("auto", "x", TierserveOptions(routing=False), later)).router == "cheapest"
        _answered(ingress, sticky, ["large"], status=503)  # a failed turn changes nothing
        assert (await ingress.plan("auto", "x", opts, later)).tier == "large"

    asyncio.run(flow())


def test_a_saturated_sticky_tier_spills_for_one_turn_and_says_so() -> None:
    ingress = _ingress(capacity={"enabled": True, "hard_mode": "latency_first"})
    now = time.time()
    for tier, running in (("small", 0), ("large", 32)):  # the large tier's batch is full, the small one idle
        load = EngineLoad(tier=tier, running=running, waiting=0, kv_cache_usage=0.1, max_num_seqs=32, timestamp=now)
        ingress.channel.add_replica(tier, ReplicaStatus(f"{tier}-1", "127.0.0.1:1", load))
    key = session_key("conv-9", None, None)
    ingress.sessions.put(key.key, "large")

    async def flow() -> None:
        outcome = await ingress.planner.plan("auto", "x", TierserveOptions(), key)  # routed, then placed
        assert outcome.decision.tier == "large" and outcome.entry_tier == "small"
        assert outcome.decision.reason.endswith("; large is saturated, so this turn moved to small (spill_down); "
                                                "the session stays on large")
        assert outcome.capacity == "spill_down:spill_down_latency_first"
        _answered(ingress, outcome.decision, ["small"], capacity=outcome.capacity)
        ingress.channel.add_replica("large", ReplicaStatus("large-1", "127.0.0.1:1", EngineLoad(
            tier="large", running=0, waiting=0, kv_cache_usage=0.1, max_num_seqs=32, timestamp=time.time() + 1)))
        assert (await ingress.planner.plan("auto", "x", TierserveOptions(), key)).entry_tier == "large"

    asyncio.run(flow())


def test_sessions_off_route_every_turn_afresh() -> None:
    ingress = _ingress(enabled=False)
    assert ingress.sessions is None
    plan = asyncio.run(ingress.plan("auto", "x", TierserveOptions(), session_key("conv-1", None, None)))
    assert plan.router == "cheapest" and plan.session is None
