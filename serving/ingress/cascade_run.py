"""Running a cascade: answer on the entry tier, score it, escalate below the threshold.

The decisions are the pure functions in `serving.cascade`; this module only makes the calls they
need (the answer, extra consistency samples, the verification prompt) through `TierCalls`, and hands
back what happened as a frozen `CascadeTrace`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from dataclasses import replace

from serving.cascade import (
    CascadePolicy,
    CascadeTrace,
    Confidence,
    TierAttempt,
    answer_sampling,
    consistency_sampling,
    decide,
    decide_on_prefix,
    measure,
    modal_answer,
    verify_prompt,
    verify_sampling,
)
from serving.channel.calls import TierCalls
from serving.channel.errors import Overloaded
from serving.types import (
    ChatMessage,
    GenerationChunk,
    GenerationRequest,
    GenerationResult,
    SamplingOptions,
)


def _question(request: GenerationRequest) -> str:
    if request.messages is not None:
        users = [m.content for m in request.messages if m.role == "user"]
        return users[-1] if users else request.messages[-1].content
    return request.prompt or ""


def _with_sampling(request: GenerationRequest, sampling: SamplingOptions, suffix: str) -> GenerationRequest:
    return replace(request, sampling=sampling, request_id=f"{request.request_id}-{suffix}")


def strip_logprobs(result: GenerationResult, wanted: SamplingOptions) -> GenerationResult:
    """Drop logprobs the cascade asked for but the client did not."""
    if wanted.logprobs:
        return result
    return replace(result, token_logprobs=())


class CascadeRunner:
    """Runs one request through the tiers in cost order, starting at `start_index`."""

    def __init__(self, tier_names: list[str], calls: TierCalls) -> None:
        self.tier_names = tier_names
        self.calls = calls

    async def _measure(
        self, tier: str, request: GenerationRequest, result: GenerationResult, policy: CascadePolicy
    ) -> tuple[Confidence, GenerationResult, int]:
        """Confidence of `result`, the answer to return (consistency may pick the modal one), scoring tokens."""
        if policy.method == "logprob":
            return measure(result, policy), result, 0
        if policy.method == "consistency":
            extra = [
                self.calls.generate(tier, _with_sampling(request, consistency_sampling(request.sampling, policy, i), f"s{i}"))
                for i in range(policy.consistency.n - 1)
            ]
            samples = await _all_or_nothing(extra)
            confidence = measure(result, policy, samples=[s.text for s in samples])
            index, _ = modal_answer([result.text, *(s.text for s in samples)], normalize=policy.consistency.normalize)
            chosen = result if index == 0 else samples[index - 1]
            cost = sum(s.prompt_tokens + s.completion_tokens for s in samples)
            return confidence, chosen, cost
        prompt = verify_prompt(_question(request), result.text, policy.verify.prompt_template)
        check = GenerationRequest(
            request_id=f"{request.request_id}-verify",
            sampling=verify_sampling(policy),
            messages=(ChatMessage(role="user", content=prompt),),
        )
        verification = await self.calls.generate(tier, check)
        cost = verification.prompt_tokens + verification.completion_tokens
        return measure(result, policy, verification=verification), result, cost

    async def run(
        self, request: GenerationRequest, policy: CascadePolicy, start_index: int
    ) -> tuple[GenerationResult, CascadeTrace]:
        """Whole-answer cascade: the answer, and the trace of the tiers it visited."""
        attempts: list[TierAttempt] = []
        reasons: list[str] = []
        previous: GenerationResult | None = None
        index, escalations = start_index, 0
        while True:
            tier = self.tier_names[index]
            try:
                result = await self.calls.generate(tier, replace(request, sampling=answer_sampling(request.sampling, policy)))
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
            attempts.append(
                TierAttempt(tier, result.prompt_tokens, result.completion_tokens, confidence.value, decision.escalate, cost)
            )
            reasons.append(decision.reason)
            if not decision.escalate:
                return chosen, _trace(attempts, reasons)
            previous, index, escalations = chosen, index + 1, escalations + 1

    async def stream(
        self, request: GenerationRequest, policy: CascadePolicy, start_index: int
    ) -> AsyncIterator[GenerationChunk | CascadeTrace]:
        """Streaming cascade: hold back the first K tokens, decide on them, then stream live or escalate.

        Yields the chunks to send and, whenever it changes, the trace so far (the last one yielded is the
        whole story). Nothing of a tier's answer is yielded before the decision, so an escalated answer leaks
        no cheap token. Methods that need the whole answer (consistency, verify, a format) run `run()` and
        stream the chosen answer.
        """
        if policy.needs_whole_answer:
            result, trace = await self.run(request, policy, start_index)
            yield trace
            yield _as_chunk(result)
            return
        attempts: list[TierAttempt] = []
        reasons: list[str] = []
        index, escalations = start_index, 0
        while True:
            tier = self.tier_names[index]
            upstream = self.calls.stream(tier, replace(request, sampling=answer_sampling(request.sampling, policy)))
            held: list[GenerationChunk] = []
            try:
                async for chunk in upstream:
                    held.append(chunk)
                    tokens = [lp for c in held for lp in c.token_logprobs]
                    verdict = decide_on_prefix(
                        tokens, policy, finished=chunk.finish_reason is not None, text="".join(c.text for c in held),
                        tier_index=index, escalations=escalations,
                    )
                    if verdict.action == "hold":
                        continue
                    confidence = verdict.decision.confidence if verdict.decision else None
                    next_tier = self.tier_names[min(index + 1, len(self.tier_names) - 1)]
                    if verdict.action == "escalate" and self.calls.has_room(next_tier):
                        attempts.append(TierAttempt(tier, chunk.prompt_tokens, chunk.completion_tokens, confidence, True))
                        reasons.append("escalated")
                        yield _trace(attempts, reasons)
                        break
                    attempts.append(TierAttempt(tier, chunk.prompt_tokens, 0, confidence, False))
                    reasons.append("accepted")
                    yield _trace(attempts, reasons)
                    for h in held:
                        yield h
                    last = held[-1]
                    async for rest in upstream:
                        last = rest
                        yield rest
                    attempts[-1] = replace(attempts[-1], completion_tokens=last.completion_tokens)
                    yield _trace(attempts, reasons)
                    return
                else:
                    return  # the tier ended the stream before a decision (no tokens)
            finally:
                await upstream.aclose()  # an escalated or abandoned stream is aborted in its engine
            index += 1
            escalations += 1


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


def _as_chunk(result: GenerationResult) -> GenerationChunk:
    return GenerationChunk(
        text=result.text,
        token_logprobs=result.token_logprobs,
        num_new_tokens=result.completion_tokens,
        finish_reason=result.finish_reason,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
    )
