"""Running a cascade: answer on the entry tier, score it, escalate below the threshold.

The decisions are the pure functions of `serving.cascade.policy`; this module makes the calls they need (the
answer, extra consistency samples, the verification prompt) through the tier channel and hands back what
happened as a frozen `CascadeTrace`: with the answer (`run`), or on the `CascadeStream` it streams.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from dataclasses import replace

from serving.cascade.confidence import Confidence, modal_answer, verify_prompt
from serving.cascade.policy import (
    CascadePolicy,
    CascadeTrace,
    TierAttempt,
    answer_sampling,
    consistency_sampling,
    decide,
    decide_on_prefix,
    measure,
    verify_sampling,
)
from serving.channel.channel import TierCall, TierChannel
from serving.channel.errors import Overloaded
from serving.channel.wire import End
from serving.types import (
    ChatMessage,
    GenerationChunk,
    GenerationRequest,
    GenerationResult,
    SamplingOptions,
)


class CascadeRunner:
    """Runs one request through the tiers in cost order, starting at `start_index`."""

    def __init__(self, tier_names: list[str], channel: TierChannel) -> None:
        self.tier_names = tier_names
        self.channel = channel

    async def run(self, request: GenerationRequest, policy: CascadePolicy, start_index: int
                  ) -> tuple[GenerationResult, CascadeTrace]:
        """Whole-answer cascade: the answer, and the trace of the tiers it visited."""
        attempts: list[TierAttempt] = []
        reasons: list[str] = []
        previous: GenerationResult | None = None
        index, escalations = start_index, 0
        while True:
            tier = self.tier_names[index]
            try:
                result, _ = await self.channel.complete(tier, replace(request, sampling=answer_sampling(
                    request.sampling, policy)))
            except Overloaded:
                if previous is None:
                    raise
                # The tier above is full: the cheap answer beats an error. The trace says so.
                attempts[-1] = replace(attempts[-1], escalated=False)
                return previous, _trace(attempts, [*reasons, "escalation_rejected"])
            if index == len(self.tier_names) - 1:
                attempts.append(TierAttempt(tier, result.prompt_tokens, result.completion_tokens, None, False))
                return result, _trace(attempts, [*reasons, "top_tier"])
            try:
                confidence, chosen, cost = await self._measure(tier, request, result, policy)
            except Overloaded:
                # The scoring calls (extra samples, verification) were refused: keep the answer we have.
                attempts.append(TierAttempt(tier, result.prompt_tokens, result.completion_tokens, None, False))
                return result, _trace(attempts, [*reasons, "scoring_rejected"])
            decision = decide(confidence, policy, tier_index=index, escalations=escalations)
            attempts.append(TierAttempt(tier, result.prompt_tokens, result.completion_tokens, confidence.value,
                                        decision.escalate, cost))
            reasons.append(decision.reason)
            if not decision.escalate:
                return chosen, _trace(attempts, reasons)
            previous, index, escalations = chosen, index + 1, escalations + 1

    def stream(self, request: GenerationRequest, policy: CascadePolicy, start_index: int) -> CascadeStream:
        """The streamed cascade (see `CascadeStream`)."""
        return CascadeStream(self, request, policy, start_index)

    async def _measure(self, tier: str, request: GenerationRequest, result: GenerationResult, policy: CascadePolicy
                       ) -> tuple[Confidence, GenerationResult, int]:
        """Confidence of `result`, the answer to return (consistency may pick the modal one), scoring tokens."""
        if policy.method == "logprob":
            return measure(result, policy), result, 0
        if policy.method == "consistency":
            extra = [self._complete(tier, _with_sampling(request, consistency_sampling(request.sampling, policy, i),
                                                         f"s{i}"))
                     for i in range(policy.consistency.n - 1)]
            samples = await _all_or_nothing(extra)
            confidence = measure(result, policy, samples=[s.text for s in samples])
            index, _ = modal_answer([result.text, *(s.text for s in samples)], normalize=policy.consistency.normalize)
            chosen = result if index == 0 else samples[index - 1]
            return confidence, chosen, sum(s.prompt_tokens + s.completion_tokens for s in samples)
        prompt = verify_prompt(_question(request), result.text, policy.verify.prompt_template)
        check = GenerationRequest(request_id=f"{request.request_id}-verify", sampling=verify_sampling(policy),
                                  messages=(ChatMessage(role="user", content=prompt),))
        verification = await self._complete(tier, check)
        cost = verification.prompt_tokens + verification.completion_tokens
        return measure(result, policy, verification=verification), result, cost

    async def _complete(self, tier: str, request: GenerationRequest) -> GenerationResult:
        return (await self.channel.complete(tier, request))[0]


class CascadeStream:
    """A streamed cascade: iterate for the chunk batches to send; `trace` is what happened so far (final once
    the iteration has ended) and `end` the answering call's summary.

    The first K tokens are held back and decided on; then the tier streams live, or its call is closed
    (aborting its engine work) and the next tier answers. Nothing of an escalated answer is yielded, so it
    leaks no cheap token. Methods that need the whole answer (consistency, verify, a format) run `run()` and
    send the chosen answer as one batch.
    """

    def __init__(self, runner: CascadeRunner, request: GenerationRequest, policy: CascadePolicy, start_index: int
                 ) -> None:
        self.trace = CascadeTrace(())
        self.end: End | None = None
        self._runner, self._request, self._policy, self._start = runner, request, policy, start_index
        self._batches = self._stream()
        self._call: TierCall | None = None

    def __aiter__(self) -> AsyncIterator[list[GenerationChunk]]:
        return self._batches

    async def aclose(self) -> None:
        await self._batches.aclose()

    async def _stream(self) -> AsyncIterator[list[GenerationChunk]]:
        policy, request, names = self._policy, self._request, self._runner.tier_names
        if policy.needs_whole_answer:
            result, self.trace = await self._runner.run(request, policy, self._start)
            self.end = End(result.finish_reason, result.prompt_tokens, result.completion_tokens)
            yield [GenerationChunk(text=result.text, token_logprobs=result.token_logprobs,
                                   num_new_tokens=result.completion_tokens, finish_reason=result.finish_reason,
                                   prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens)]
            return
        attempts: list[TierAttempt] = []
        reasons: list[str] = []
        index, escalations = self._start, 0
        sampling = answer_sampling(request.sampling, policy)
        while True:
            tier = names[index]
            async with await self._runner.channel.open(tier, replace(request, sampling=sampling)) as call:
                held: list[GenerationChunk] = []
                escalate = False
                async for batch in call:
                    held += batch
                    last = held[-1]
                    tokens = [lp for c in held for lp in c.token_logprobs]
                    verdict = decide_on_prefix(tokens, policy, finished=last.finish_reason is not None,
                                               text="".join(c.text for c in held), tier_index=index,
                                               escalations=escalations)
                    if verdict.action == "hold":
                        continue
                    confidence = verdict.decision.confidence if verdict.decision else None
                    next_tier = names[min(index + 1, len(names) - 1)]
                    if verdict.action == "escalate" and self._runner.channel.has_room(next_tier):
                        attempts.append(TierAttempt(tier, last.prompt_tokens, last.completion_tokens, confidence, True))
                        reasons.append("escalated")
                        self.trace = _trace(attempts, reasons)
                        escalate = True
                        break
                    attempts.append(TierAttempt(tier, last.prompt_tokens, 0, confidence, False))
                    reasons.append("accepted")
                    self.trace = _trace(attempts, reasons)
                    yield held
                    async for rest in call:
                        last = rest[-1]
                        yield rest
                    attempts[-1] = replace(attempts[-1], completion_tokens=last.completion_tokens)
                    self.trace, self.end = _trace(attempts, reasons), call.end
                    return
                if not escalate:
                    self.end = call.end
                    return  # the tier ended the stream before a decision (no tokens)
            index += 1
            escalations += 1


def _question(request: GenerationRequest) -> str:
    if request.messages is not None:
        users = [m.content for m in request.messages if m.role == "user"]
        return users[-1] if users else request.messages[-1].content
    return request.prompt or ""


def _with_sampling(request: GenerationRequest, sampling: SamplingOptions, suffix: str) -> GenerationRequest:
    return replace(request, sampling=sampling, request_id=f"{request.request_id}-{suffix}")


def _trace(attempts: list[TierAttempt], reasons: list[str]) -> CascadeTrace:
    return CascadeTrace(tuple(attempts), "->".join(reasons))


async def _all_or_nothing(calls: list[Awaitable[GenerationResult]]) -> list[GenerationResult]:
    """Run the calls concurrently; if one fails the others are cancelled (no orphaned generations)."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(call) for call in calls]
    except* Exception as group:  # the first failure, as itself (Overloaded stays a 429/503)
        raise group.exceptions[0] from None
    return [t.result() for t in tasks]
