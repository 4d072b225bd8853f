"""An engine without a model: emits a scripted answer at a fixed token rate.

It implements the real `Engine` interface and returns the real result types, so the whole Serve app
(ingress, wire, tier replica) runs unchanged on top of it. Uses: `tierserve bench --plumbing` measures
how many tokens/s and requests/s the path around an engine can carry; integration tests drive the app
(routing, spill, cascade, SSE framing, errors) without vLLM.

Behaviour is set with class attributes; a test or benchmark binds a subclass (`engine_cls=`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from router.errors import InvalidRequest
from serving.engines.base import Engine, EngineError, prompt_too_long
from serving.types import (
    EngineLoad,
    GenerationChunk,
    GenerationRequest,
    TierInfo,
    TokenLogprob,
)

_WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta")


class ScriptedEngine(Engine):
    """Token i of every answer is `_WORDS[i % 8]` + space; one engine step emits one token per request.

    Steps run at `tokens_per_s` like a continuous-batching engine: all running requests advance together.
    Prompt tokens are counted as whitespace-separated words. Every token's logprob is `logprob`, or
    `logprob_by_tier[tier]` (so a cascade test can set the confidence each tier reports).
    """

    tokens_per_s: float = 200.0
    """Engine steps per second (each running request gets one token per step)."""
    answer_tokens: int = 16
    """Length of an answer that is not cut by max_tokens (unless ignore_eos)."""
    logprob: float = -0.05
    logprob_by_tier: dict[str, float] = {}

    def start(self) -> None:
        self._ongoing = 0
        self._running = 0
        self._started = True
        self._step = asyncio.Event()
        self._ticker: asyncio.Task | None = None

    def info(self) -> TierInfo:
        return TierInfo(
            name=self.tier.name,
            served_model_name=self.tier.served_model_name or self.tier.name,
            max_model_len=self.tier.engine.max_model_len,
            ready=self._started,
        )

    def load(self) -> EngineLoad:
        max_seqs = self.tier.engine.max_num_seqs
        return EngineLoad(
            tier=self.tier.name,
            running=min(self._running, max_seqs),
            waiting=max(0, self._running - max_seqs),
            kv_cache_usage=min(1.0, self._running / max_seqs),
            max_num_seqs=max_seqs,
            ongoing=self._ongoing,
            timestamp=time.time(),
        )

    async def check_health(self) -> None:
        if not self._started:
            raise EngineError(f"tier '{self.tier.name}': scripted engine not started")

    def _prompt_tokens(self, request: GenerationRequest) -> int:
        if request.messages is not None:
            return sum(len(m.content.split()) + 4 for m in request.messages) + 2
        return len((request.prompt or "").split()) + 1

    async def _tick(self) -> None:
        """The 'engine loop': wake every waiting request once per step."""
        period = 1.0 / self.tokens_per_s
        while self._running:
            await asyncio.sleep(period)
            self._step.set()
            self._step = asyncio.Event()
        self._ticker = None

    async def generate(self, request: GenerationRequest, *, whole: bool = False) -> AsyncIterator[GenerationChunk]:
        if whole:  # the same steps, delivered as one chunk
            async with aclosing(self._steps(request)) as steps:
                chunks = [c async for c in steps]
            yield GenerationChunk.joined(chunks)
            return
        async with aclosing(self._steps(request)) as steps:
            async for chunk in steps:
                yield chunk

    async def _steps(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        s = request.sampling
        if "fail" in s.stop:
            raise InvalidRequest("stop: the scripted engine refuses the stop word 'fail'.", param="stop")
        prompt_len = self._prompt_tokens(request)
        limit = self.tier.engine.max_model_len
        max_tokens = s.max_tokens if s.max_tokens is not None else min(limit - prompt_len, self.answer_tokens)
        if prompt_len + max_tokens > limit:
            raise prompt_too_long(prompt_len, max_tokens, limit, self.tier.name)
        if s.top_logprobs > 20:
            raise InvalidRequest("top_logprobs must be at most 20.", param="top_logprobs")
        n = max_tokens if s.ignore_eos else min(max_tokens, self.answer_tokens)
        self._ongoing += 1
        self._running += 1
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(self._tick())
        try:
            for i in range(n):
                await self._step.wait()
                token = _WORDS[i % len(_WORDS)] + " "
                logprobs = ()
                if s.logprobs:
                    lp = self.logprob_by_tier.get(self.tier.name, self.logprob)
                    top = tuple((_WORDS[(i + k) % len(_WORDS)] + " ", lp - k) for k in range(s.top_logprobs))
                    logprobs = (TokenLogprob(token=token, logprob=lp, top=top),)
                last = i == n - 1
                yield GenerationChunk(
                    text=token,
                    token_logprobs=logprobs,
                    num_new_tokens=1,
                    finish_reason=("length" if n == max_tokens else "stop") if last else None,
                    prompt_tokens=prompt_len,
                    completion_tokens=i + 1,
                )
        finally:
            self._ongoing -= 1
            self._running -= 1

    def shutdown(self) -> None:
        self._started = False
