"""The cascade's calls, over the real tier channel and wire servers with scripted engines (no Ray).

Each tier's engine gives every token a chosen logprob (small unsure: -2, large sure: -0.01), so each test
knows which decision is right; the real engines run the same code in tests/e2e/test_cascade.py.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from serving.capacity import CapacityConfig
from serving.cascade import CascadeConfig, cascade_policy
from serving.cascade.runner import CascadeRunner, _all_or_nothing
from serving.channel.channel import TierChannel
from serving.channel.errors import Overloaded
from serving.channel.replica import WireServer
from serving.config import EngineConfig, TierConfig
from serving.engines.scripted import ScriptedEngine
from serving.types import (
    EngineLoad,
    GenerationRequest,
    GenerationResult,
    ReplicaStatus,
    SamplingOptions,
)
from tests.unit.channel.helpers import TOKEN

TIERS = ["small", "large"]
REQUEST = GenerationRequest(request_id="r1", sampling=SamplingOptions(max_tokens=6), prompt="q")


class Tier(ScriptedEngine):
    tokens_per_s = 500.0
    answer_tokens = 6
    logprob_by_tier = {"small": -2.0, "large": -0.01}


class Stack:
    """Both tiers behind wire servers, and a channel to them; `started` counts generations per tier."""

    def __init__(self, limits: dict[str, int] | None = None) -> None:
        self.limits = limits or {}

    async def __aenter__(self) -> Stack:
        capacity = CapacityConfig(tiers={t: {"max_inflight": n} for t, n in self.limits.items()})
        self.channel = TierChannel(TIERS, capacity, token=TOKEN, node_ip="127.0.0.1")
        self.engines: dict[str, Tier] = {}
        self.servers: list[WireServer] = []
        for name in TIERS:
            engine = Tier(TierConfig(name=name, model="unused", engine=EngineConfig(max_model_len=256)), Path("x"), "cpu")
            engine.start()
            server = WireServer(engine, TOKEN, max_ongoing=64)
            address = await server.start("127.0.0.1")
            load = EngineLoad(tier=name, running=0, waiting=0, kv_cache_usage=0.0, max_num_seqs=32,
                              timestamp=time.time())
            self.channel.add_replica(name, ReplicaStatus(f"{name}-1", address, load, server.local_path))
            self.engines[name], self.servers = engine, [*self.servers, server]
        self.runner = CascadeRunner(TIERS, self.channel)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for server in self.servers:
            server.close()

    async def idle(self) -> dict[str, int]:
        for _ in range(200):
            if all(e.load().ongoing == 0 for e in self.engines.values()):
                break
            await asyncio.sleep(0.01)
        return {name: e.load().ongoing for name, e in self.engines.items()}


def policy(**cfg):
    return cascade_policy(CascadeConfig(enabled=True, streaming={"holdback_tokens": 3}, **cfg), TIERS, routed=True)


async def _stream(stack: Stack, request: GenerationRequest, pol) -> tuple[str, object, object]:
    stream = stack.runner.stream(request, pol, 0)
    text = ""
    async for batch in stream:
        assert stream.trace.attempts, "a chunk came before the cascade decided"
        text += "".join(c.text for c in batch)
    return text, stream.trace, stream.end


def test_stream_escalates_before_sending_any_cheap_token() -> None:
    async def main():
        async with Stack() as stack:
            text, trace, end = await _stream(stack, REQUEST, policy())
            return text, trace, end, await stack.idle(), stack.channel.inflight
    text, trace, end, ongoing, inflight = asyncio.run(main())
    assert text == "alpha beta gamma delta epsilon zeta "  # the large tier's whole answer, nothing of the small one
    assert trace.tier_chain == ("small", "large") and trace.attempts[0].escalated
    assert trace.reason == "escalated->accepted" and end.completion_tokens == 6
    assert ongoing == {"small": 0, "large": 0} and inflight == {"small": 0, "large": 0}  # the cheap call was aborted


def test_stream_without_room_above_keeps_the_cheap_answer() -> None:
    async def main():
        async with Stack(limits={"large": 1}) as stack:
            blocker = await stack.channel.open("large", REQUEST)  # the large tier is full
            try:
                return await _stream(stack, REQUEST, policy())
            finally:
                await blocker.aclose()
    text, trace, _ = asyncio.run(main())
    assert text == "alpha beta gamma delta epsilon zeta " and trace.tier_chain == ("small",) and not trace.escalated


def test_confident_stream_is_released_live() -> None:
    async def main():
        async with Stack() as stack:
            return await _stream(stack, REQUEST, policy(threshold=0.01))
    text, trace, end = asyncio.run(main())
    assert text.startswith("alpha") and trace.tier_chain == ("small",)
    assert trace.attempts[0].confidence == pytest.approx(0.1353, abs=1e-3)  # exp(-2)
    assert trace.attempts[0].completion_tokens == 6 and end.finish_reason == "length"


def test_whole_answer_cascade_escalates_and_counts_the_waste() -> None:
    async def main():
        async with Stack() as stack:
            result, trace = await stack.runner.run(REQUEST, policy(), 0)
            return result, trace, await stack.idle(), stack.channel.inflight
    result, trace, ongoing, inflight = asyncio.run(main())
    assert trace.tier_chain == ("small", "large") and trace.wasted_tokens()["small"] > 0
    assert result.completion_tokens == 6 and inflight == {"small": 0, "large": 0}


def test_a_refused_escalation_keeps_the_cheap_answer_and_frees_every_slot() -> None:
    async def main():
        async with Stack(limits={"large": 1}) as stack:
            blocker = await stack.channel.open("large", REQUEST)
            try:
                result, trace = await stack.runner.run(REQUEST, policy(), 0)
            finally:
                await blocker.aclose()
            return result, trace, stack.channel.inflight
    result, trace, inflight = asyncio.run(main())
    assert trace.reason.endswith("escalation_rejected") and trace.tier_chain == ("small",)
    assert result.text.startswith("alpha") and inflight == {"small": 0, "large": 0}


def test_refused_scoring_keeps_the_answer() -> None:
    """The verification call is refused (the tier filled up between the answer and its scoring)."""
    async def main():
        async with Stack() as stack:
            async def full(tier: str, request: GenerationRequest) -> GenerationResult:
                raise Overloaded.make("full", retry_after_s=1)

            stack.runner._complete = full  # type: ignore[method-assign]  # the scoring calls' one way out
            return await stack.runner.run(REQUEST, policy(method="verify"), 0)
    result, trace = asyncio.run(main())
    assert result.text.startswith("alpha") and trace.reason == "scoring_rejected" and trace.tier_chain == ("small",)


def test_all_or_nothing_cancels_the_rest_on_failure() -> None:
    cancelled = []

    async def slow() -> GenerationResult:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        raise AssertionError("not reached")

    async def failing() -> GenerationResult:
        await asyncio.sleep(0.01)
        raise Overloaded.make("full", retry_after_s=1)

    with pytest.raises(Overloaded):
        asyncio.run(_all_or_nothing([slow(), failing()]))
    assert cancelled == [True]
