"""The cascade's call orchestration, over scripted tier calls (a `TierCalls` subclass).

The tiers here are scripted answers with chosen logprobs, so each test knows which decision is right;
the real engines run the same code in tests/e2e/test_cascade.py.
"""

from __future__ import annotations

import asyncio

import pytest

from serving.cascade import CascadeConfig, CascadeTrace, cascade_policy
from serving.channel.calls import TierCalls
from serving.channel.errors import Overloaded
from serving.ingress.cascade_run import CascadeRunner, _all_or_nothing
from serving.types import (
    GenerationChunk,
    GenerationRequest,
    GenerationResult,
    SamplingOptions,
    TokenLogprob,
)

TIERS = ["small", "large"]
REQUEST = GenerationRequest(request_id="r1", sampling=SamplingOptions(max_tokens=8), prompt="q")


def chunks(tier: str, n: int, logprob: float) -> list[GenerationChunk]:
    return [
        GenerationChunk(
            text=f"{tier}{i} ", token_logprobs=(TokenLogprob(f"{tier}{i}", logprob),), num_new_tokens=1,
            finish_reason="length" if i == n - 1 else None, prompt_tokens=3, completion_tokens=i + 1,
        )
        for i in range(n)
    ]


class Tiers(TierCalls):
    """Scripted tiers: the small one is unsure (logprob -2), the large one sure; records what ran."""

    def __init__(self, room: bool = True, refuse_scoring: bool = False) -> None:  # no TierClient, no admission
        self.room = room
        self.refuse_scoring = refuse_scoring
        self.started: list[str] = []
        self.closed: list[str] = []

    async def stream(self, tier: str, request: GenerationRequest):
        self.started.append(tier)
        try:
            for c in chunks(tier, 6, -2.0 if tier == "small" else -0.01):
                await asyncio.sleep(0)
                yield c
        finally:
            self.closed.append(tier)

    async def generate(self, tier: str, request: GenerationRequest) -> GenerationResult:
        if self.refuse_scoring and request.request_id != REQUEST.request_id:
            raise Overloaded.make("full", retry_after_s=1)
        self.started.append(tier)
        return GenerationResult.from_chunks(chunks(tier, 6, -2.0 if tier == "small" else -0.01))

    def has_room(self, tier: str) -> bool:
        return self.room

    def runner(self) -> CascadeRunner:
        return CascadeRunner(TIERS, self)


def policy(**cfg):
    return cascade_policy(CascadeConfig(enabled=True, streaming={"holdback_tokens": 3}, **cfg), TIERS, routed=True)


async def collect(items) -> tuple[str, CascadeTrace]:
    """The streamed text and the last trace the cascade yielded (each trace comes before the text it covers)."""
    text, traces = "", []
    async for item in items:
        if isinstance(item, CascadeTrace):
            traces.append(item)
        else:
            assert traces, "a chunk was yielded before the cascade decided"
            text += item.text
    return text, traces[-1]


def test_stream_escalates_before_sending_any_cheap_token() -> None:
    tiers = Tiers()
    text, trace = asyncio.run(collect(tiers.runner().stream(REQUEST, policy(), 0)))
    assert text == "".join(c.text for c in chunks("large", 6, 0))
    assert trace.tier_chain == ("small", "large") and trace.attempts[0].escalated
    assert trace.reason == "escalated->accepted"
    assert "small" in tiers.closed  # the cheap stream was closed (aborted) at the decision


def test_stream_without_room_above_keeps_the_cheap_answer() -> None:
    tiers = Tiers(room=False)
    text, trace = asyncio.run(collect(tiers.runner().stream(REQUEST, policy(), 0)))
    assert text == "".join(c.text for c in chunks("small", 6, 0))
    assert tiers.started == ["small"] and not trace.escalated


def test_confident_stream_is_released_live() -> None:
    tiers = Tiers()
    text, trace = asyncio.run(collect(tiers.runner().stream(REQUEST, policy(threshold=0.01), 0)))
    assert text.startswith("small0") and tiers.started == ["small"]
    assert trace.attempts[0].confidence == pytest.approx(0.1353, abs=1e-3)  # exp(-2)
    assert trace.attempts[0].completion_tokens == 6


def test_refused_scoring_keeps_the_answer() -> None:
    tiers = Tiers(refuse_scoring=True)
    result, trace = asyncio.run(tiers.runner().run(REQUEST, policy(method="verify"), 0))
    assert result.text.startswith("small0") and trace.reason == "scoring_rejected"
    assert trace.tier_chain == ("small",)


def test_all_or_nothing_cancels_the_rest_on_failure() -> None:
    cancelled = []

    async def slow() -> GenerationResult:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def refused() -> GenerationResult:
        raise Overloaded.make("full", retry_after_s=1)

    with pytest.raises(Overloaded):
        asyncio.run(_all_or_nothing([slow(), slow(), refused()]))
    assert cancelled == [True, True]
