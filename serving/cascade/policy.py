"""Cascade decisions: accept a tier's answer or send the request one tier up.

The ingress reads as the pipeline:
    policy = cascade_policy(cfg.cascade, tier_names, routed=..., override=...)
    result = await engines[tier].generate(request with answer_sampling(...))
    decision = decide(measure(result, policy, ...), policy, tier_index=i)
Streams use `decide_on_prefix` on the first `holdback_tokens` tokens instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from serving.cascade.confidence import (
    Confidence,
    consistency_confidence,
    format_ok,
    has_yes_no,
    logprob_confidence,
    verify_confidence,
)
from serving.cascade.config import (
    CascadeConfig,
    CascadeOverride,
    ConfidenceMethod,
    ConsistencyOptions,
    FormatValidator,
    LogprobOptions,
    StreamMode,
    VerifyOptions,
)
from serving.types import GenerationResult, SamplingOptions, TokenLogprob

DecisionReason = Literal["confident", "low_confidence", "format_failed", "top_tier", "max_escalations"]
PrefixAction = Literal["hold", "release", "escalate", "decide"]


@dataclass(frozen=True)
class CascadePolicy:
    """The cascade settings of one request, resolved from config and the request's override."""

    method: ConfidenceMethod
    thresholds: tuple[float, ...]
    """Threshold per tier index (the top tier's is never used)."""
    max_escalations: int
    logprob: LogprobOptions
    consistency: ConsistencyOptions
    verify: VerifyOptions
    format: FormatValidator | None
    stream_mode: StreamMode
    holdback_tokens: int

    @property
    def needs_whole_answer(self) -> bool:
        """True when a stream must be held until the cheap tier finishes (no live prefix decision)."""
        return self.stream_mode == "buffer" or self.method != "logprob" or self.format is not None


@dataclass(frozen=True)
class CascadeDecision:
    """Accept the answer of `tier_index`, or escalate to `next_tier_index`."""

    escalate: bool
    reason: DecisionReason
    confidence: float
    threshold: float
    tier_index: int
    next_tier_index: int | None
    format_passed: bool | None = None


@dataclass(frozen=True)
class PrefixDecision:
    """What a stream held back at the cheap tier does next.

    `hold`: keep buffering. `release`: send the held chunks and stream the rest live (no later
    escalation). `escalate`: abort the cheap stream, send nothing of it, go to `decision.next_tier_index`.
    `decide`: the answer finished and the method needs extra calls; run `measure` and `decide`.
    `decision` is set when a confidence was computed here (release after scoring, or escalate).
    """

    action: PrefixAction
    decision: CascadeDecision | None = None
    tokens_scored: int = 0


def cascade_policy(
    cfg: CascadeConfig, tier_names: Sequence[str], *, routed: bool, override: CascadeOverride | None = None
) -> CascadePolicy | None:
    """The request's policy, or None when this request does not cascade.

    By default only routed (`model="auto"`) requests cascade, and only if `cfg.enabled`. An override
    with `enabled` true opts the request in (any entry tier), false opts it out; its method, threshold
    and format apply whenever the request cascades.
    """
    opted = None if override is None else override.enabled
    if opted is False or (opted is None and not (cfg.enabled and routed)):
        return None
    if override is not None and override.threshold is not None:
        thresholds = tuple(override.threshold for _ in tier_names)
    else:
        thresholds = tuple(cfg.tier_thresholds.get(name, cfg.threshold) for name in tier_names)
    return CascadePolicy(
        method=(override.method if override and override.method else cfg.method),
        thresholds=thresholds,
        max_escalations=cfg.max_escalations,
        logprob=cfg.logprob,
        consistency=cfg.consistency,
        verify=cfg.verify,
        format=(override.format if override and override.format else cfg.format),
        stream_mode=cfg.streaming.mode,
        holdback_tokens=cfg.streaming.holdback_tokens,
    )


def answer_sampling(base: SamplingOptions, policy: CascadePolicy) -> SamplingOptions:
    """Sampling for a cheap tier's answer: token logprobs on when the method or a stream needs them."""
    return replace(base, logprobs=True) if policy.method == "logprob" else base


def consistency_sampling(base: SamplingOptions, policy: CascadePolicy, sample_index: int) -> SamplingOptions:
    """Sampling for extra answer `sample_index` (0-based): hotter, and a distinct seed if one was set."""
    seed = None if base.seed is None else base.seed + 1 + sample_index
    return replace(base, temperature=policy.consistency.temperature, seed=seed, logprobs=False, top_logprobs=0)


def verify_sampling(policy: CascadePolicy) -> SamplingOptions:
    """Sampling for the yes/no verification call: greedy, short, with top alternatives."""
    v = policy.verify
    return SamplingOptions(max_tokens=v.max_tokens, temperature=0.0, logprobs=True, top_logprobs=v.top_logprobs)


def measure(
    result: GenerationResult,
    policy: CascadePolicy,
    *,
    samples: Sequence[str] = (),
    verification: GenerationResult | None = None,
) -> Confidence:
    """Confidence of `result` under the policy's method.

    `consistency` needs the extra answers (`samples`, ideally n - 1 of them); `verify` needs the
    result of the verification prompt. The format validator, if any, is applied to `result.text`.
    """
    passed = format_ok(result.text, policy.format) if policy.format is not None else None
    if policy.method == "logprob":
        lp = policy.logprob
        value = logprob_confidence(result.token_logprobs, aggregate=lp.aggregate, tail_fraction=lp.tail_fraction)
        return Confidence("logprob", value, passed, len(result.token_logprobs))
    if policy.method == "consistency":
        if not samples:
            raise ValueError("method 'consistency' needs the extra answers; pass samples=[...].")
        answers = [result.text, *samples]
        value = consistency_confidence(answers, normalize=policy.consistency.normalize)
        return Confidence("consistency", value, passed, len(answers))
    if verification is None:
        raise ValueError("method 'verify' needs the verification call's result; pass verification=...")
    return Confidence("verify", _verify_value(verification, policy.verify), passed, 1)


def _verify_value(verification: GenerationResult, options: VerifyOptions) -> float:
    # The reply may open with a space or newline token; use the first position that offers yes/no.
    for position in verification.token_logprobs[: options.max_tokens]:
        alternatives = ((position.token, position.logprob), *position.top)
        if has_yes_no(alternatives, yes_tokens=options.yes_tokens, no_tokens=options.no_tokens):
            return verify_confidence(alternatives, yes_tokens=options.yes_tokens, no_tokens=options.no_tokens)
    return 0.5


def decide(
    confidence: Confidence,
    policy: CascadePolicy,
    *,
    tier_index: int,
    n_tiers: int | None = None,
    escalations: int = 0,
) -> CascadeDecision:
    """Accept or escalate the answer of tier `tier_index` (0 = cheapest).

    In order: the top tier, or a request already escalated `max_escalations` times, is accepted;
    a failed format escalates; a confidence below the tier's threshold (NaN counts as 0) escalates.
    """
    n = _n_tiers(policy, n_tiers)
    if not 0 <= tier_index < n:
        raise ValueError(f"tier_index {tier_index} is out of range for {n} tiers.")
    value = 0.0 if math.isnan(confidence.value) else confidence.value
    threshold = policy.thresholds[tier_index]

    def result(escalate: bool, reason: DecisionReason) -> CascadeDecision:
        nxt = tier_index + 1 if escalate else None
        return CascadeDecision(escalate, reason, value, threshold, tier_index, nxt, confidence.format_passed)

    if tier_index == n - 1:
        return result(False, "top_tier")
    if escalations >= policy.max_escalations:
        return result(False, "max_escalations")
    if confidence.format_passed is False:
        return result(True, "format_failed")
    if value < threshold:
        return result(True, "low_confidence")
    return result(False, "confident")


def decide_on_prefix(
    tokens: Sequence[TokenLogprob],
    policy: CascadePolicy,
    *,
    finished: bool,
    text: str = "",
    tier_index: int,
    n_tiers: int | None = None,
    escalations: int = 0,
) -> PrefixDecision:
    """The streaming rule, called with all tokens held so far after each chunk.

    Nothing to decide (top tier, escalations used up): release at once, unscored. Policies that need the whole
    answer hold until it finishes, then `decide` (method logprob with a format: decided here, on
    `text`). Otherwise hold until `holdback_tokens` tokens arrived and decide on exactly those; an
    answer that finishes sooner is decided whole, as a non-streamed one would be.
    """
    n = _n_tiers(policy, n_tiers)
    if not 0 <= tier_index < n:
        raise ValueError(f"tier_index {tier_index} is out of range for {n} tiers.")
    if tier_index == n - 1 or escalations >= policy.max_escalations:
        return PrefixDecision("release")
    if not finished and (policy.needs_whole_answer or len(tokens) < policy.holdback_tokens):
        return PrefixDecision("hold")
    if policy.method != "logprob":
        return PrefixDecision("decide")
    scored = tokens if finished else tokens[: policy.holdback_tokens]
    lp = policy.logprob
    value = logprob_confidence(scored, aggregate=lp.aggregate, tail_fraction=lp.tail_fraction)
    passed = format_ok(text, policy.format) if finished and policy.format is not None else None
    confidence = Confidence("logprob", value, passed, len(scored))
    decision = decide(confidence, policy, tier_index=tier_index, n_tiers=n, escalations=escalations)
    return PrefixDecision("escalate" if decision.escalate else "release", decision, len(scored))


def _n_tiers(policy: CascadePolicy, n_tiers: int | None) -> int:
    if n_tiers is not None and n_tiers != len(policy.thresholds):
        raise ValueError(
            f"n_tiers ({n_tiers}) differs from the {len(policy.thresholds)} tiers the policy was built for."
        )
    return len(policy.thresholds)


@dataclass(frozen=True)
class TierAttempt:
    """One tier's call within a cascade."""

    tier: str
    prompt_tokens: int
    completion_tokens: int
    confidence: float | None
    """None when the answer was not scored (the last tier)."""
    escalated: bool
    scoring_tokens: int = 0
    """Tokens spent measuring the confidence (verification call, extra consistency samples)."""


@dataclass(frozen=True)
class CascadeTrace:
    """What happened to one request: the tiers it visited, for the response and the metrics."""

    attempts: tuple[TierAttempt, ...]
    reason: str = ""
    """Why the cascade stopped where it did, e.g. `confidence 0.91 >= 0.80` or `...->escalation_rejected`."""

    @property
    def tier_chain(self) -> tuple[str, ...]:
        return tuple(a.tier for a in self.attempts)

    @property
    def escalated(self) -> bool:
        return any(a.escalated for a in self.attempts)

    @property
    def confidences(self) -> tuple[float | None, ...]:
        return tuple(a.confidence for a in self.attempts)

    def wasted_tokens(self) -> dict[str, int]:
        """Tokens per tier spent on answers that were escalated and thrown away (scoring included)."""
        wasted: dict[str, int] = {}
        for a in self.attempts:
            if a.escalated:
                wasted[a.tier] = wasted.get(a.tier, 0) + a.prompt_tokens + a.completion_tokens + a.scoring_tokens
        return wasted
