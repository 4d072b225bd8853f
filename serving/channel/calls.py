"""Calls into the tiers, each holding an admission slot for its whole duration.

The one way the request path (the plain path, the cascade, the LLM judge) reaches a tier: admission
(`CapacityController.acquire`, 429/503 when full) before the call, the slot released after it, however
the call ends (the replica's END frame has already refreshed the tier's load by then).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing

from router.judge import Complete
from serving.channel.admission import CapacityController
from serving.channel.tiers import SseRelay, TierClient
from serving.channel.wire import SseOptions
from serving.types import (
    ChatMessage,
    GenerationChunk,
    GenerationRequest,
    GenerationResult,
    SamplingOptions,
)


class TierCalls:
    """Admitted calls to the tiers (`TierClient`) under one `CapacityController`."""

    def __init__(self, tiers: TierClient, capacity: CapacityController) -> None:
        self.tiers = tiers
        self.capacity = capacity

    def has_room(self, tier: str) -> bool:
        return self.capacity.has_room(tier)

    async def generate(self, tier: str, request: GenerationRequest) -> GenerationResult:
        self.capacity.acquire(tier)
        try:
            return await self.tiers.generate(tier, request)
        finally:
            self.capacity.release(tier)

    async def stream(self, tier: str, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Typed chunks; leaving early cancels the tier call (and aborts the engine) now, not at GC time."""
        self.capacity.acquire(tier)
        try:
            async with aclosing(self.tiers.stream(tier, request)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            self.capacity.release(tier)

    async def relay(self, tier: str, request: GenerationRequest, options: SseOptions) -> SseRelay:
        """A stream the tier replica encodes itself; the slot is released when the relay closes."""
        self.capacity.acquire(tier)
        try:
            relay = await self.tiers.relay(tier, request, options)
        except BaseException:
            self.capacity.release(tier)
            raise
        relay.on_close(lambda: self.capacity.release(tier))
        return relay

def judge_completion(calls: TierCalls, tier: str) -> Complete:
    """The LLM judge's call: one greedy token from `tier`, with its top alternatives."""

    async def complete(prompt: str) -> Sequence[tuple[str, float]]:
        request = GenerationRequest(
            request_id=f"judge-{time.monotonic_ns()}",
            sampling=SamplingOptions(max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=20),
            messages=(ChatMessage(role="user", content=prompt),),
        )
        first = (await calls.generate(tier, request)).token_logprobs[0]
        return [(first.token, first.logprob), *first.top]

    return complete
