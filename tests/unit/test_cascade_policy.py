"""Cascade decisions: when an answer escalates, the streaming rule, and token accounting."""

from __future__ import annotations

import math

import pytest

from serving.cascade import (
    CascadeConfig,
    CascadeOverride,
    CascadeTrace,
    Confidence,
    FormatValidator,
    TierAttempt,
    answer_sampling,
    cascade_policy,
    consistency_sampling,
    decide,
    decide_on_prefix,
    measure,
    verify_sampling,
)
from serving.types import GenerationResult, SamplingOptions, TokenLogprob

TIERS = ["small", "large"]


def policy(routed: bool = True, override: CascadeOverride | None = None, **cfg):
    cfg.setdefault("enabled", True)
    built = cascade_policy(CascadeConfig(**cfg), TIERS, routed=routed, override=override)
    assert built is not None
    return built


def tokens(*values: float) -> tuple[TokenLogprob, ...]:
    return tuple(TokenLogprob(token=f"t{i}", logprob=v) for i, v in enumerate(values))


def result(text: str = "ok", logprobs: tuple[TokenLogprob, ...] = ()) -> GenerationResult:
    return GenerationResult(text=text, finish_reason="stop", prompt_tokens=5, completion_tokens=len(logprobs),
                            token_logprobs=logprobs)


class TestPolicyResolution:
    def test_disabled_by_default(self):
        assert cascade_policy(CascadeConfig(), TIERS, routed=True) is None

    def test_enabled_cascades_routed_requests_only(self):
        cfg = CascadeConfig(enabled=True)
        assert cascade_policy(cfg, TIERS, routed=True) is not None
        assert cascade_policy(cfg, TIERS, routed=False) is None

    def test_override_opts_in_and_out(self):
        on, off = CascadeOverride(enabled=True), CascadeOverride(enabled=False)
        assert cascade_policy(CascadeConfig(), TIERS, routed=False, override=on) is not None
        assert cascade_policy(CascadeConfig(enabled=True), TIERS, routed=True, override=off) is None

    def test_override_without_enabled_follows_config(self):
        only_threshold = CascadeOverride(threshold=0.6)
        assert cascade_policy(CascadeConfig(), TIERS, routed=True, override=only_threshold) is None
        assert cascade_policy(CascadeConfig(enabled=True), TIERS, routed=False, override=only_threshold) is None
        p = cascade_policy(CascadeConfig(enabled=True), TIERS, routed=True, override=only_threshold)
        assert p is not None and p.thresholds == (0.6, 0.6)

    def test_thresholds_per_tier_and_override(self):
        assert policy(threshold=0.7, tier_thresholds={"small": 0.9}).thresholds == (0.9, 0.7)
        p = policy(override=CascadeOverride(threshold=0.5, method="verify"), tier_thresholds={"small": 0.9})
        assert p.thresholds == (0.5, 0.5) and p.method == "verify"
        p = policy(override=CascadeOverride(enabled=True, threshold=0.5, method="verify"))
        assert p.thresholds == (0.5, 0.5) and p.method == "verify"

    def test_override_format_replaces_configured(self):
        p = policy(format={"regex": "a"}, override=CascadeOverride(format=FormatValidator(regex="b")))
        assert p.format is not None and p.format.regex == "b"


class TestDecide:
    def test_below_threshold_escalates_to_next_tier(self):
        d = decide(Confidence("logprob", 0.79), policy(), tier_index=0, n_tiers=2)
        assert (d.escalate, d.reason, d.next_tier_index, d.threshold) == (True, "low_confidence", 1, 0.8)

    def test_at_or_above_threshold_accepts(self):
        d = decide(Confidence("logprob", 0.8), policy(), tier_index=0, n_tiers=2)
        assert (d.escalate, d.reason, d.next_tier_index) == (False, "confident", None)

    def test_top_tier_is_always_accepted(self):
        d = decide(Confidence("logprob", 0.0, format_passed=False), policy(), tier_index=1, n_tiers=2)
        assert (d.escalate, d.reason, d.format_passed) == (False, "top_tier", False)

    def test_format_failure_escalates_despite_high_confidence(self):
        d = decide(Confidence("logprob", 0.99, format_passed=False), policy(), tier_index=0)
        assert (d.escalate, d.reason) == (True, "format_failed")

    def test_nan_confidence_escalates(self):
        d = decide(Confidence("logprob", math.nan), policy(threshold=0.0), tier_index=0)
        assert d.escalate is False  # 0 >= threshold 0: accepted, and reported as 0
        assert d.confidence == 0.0
        assert decide(Confidence("logprob", math.nan), policy(), tier_index=0).escalate

    def test_max_escalations_stops_the_climb(self):
        three = cascade_policy(CascadeConfig(enabled=True), ["s", "m", "l"], routed=True)
        assert three is not None
        assert decide(Confidence("logprob", 0.1), three, tier_index=1, escalations=0).escalate
        d = decide(Confidence("logprob", 0.1), three, tier_index=1, escalations=1)
        assert (d.escalate, d.reason) == (False, "max_escalations")

    def test_threshold_above_every_confidence_escalates_everything(self):
        p = policy(threshold=1.0)
        for value in (0.0, 0.5, 0.999999):
            assert decide(Confidence("logprob", value), p, tier_index=0).escalate

    def test_bad_indices_are_rejected(self):
        with pytest.raises(ValueError, match="tier_index 2"):
            decide(Confidence("logprob", 0.5), policy(), tier_index=2)
        with pytest.raises(ValueError, match="n_tiers \\(3\\)"):
            decide(Confidence("logprob", 0.5), policy(), tier_index=0, n_tiers=3)


class TestMeasure:
    def test_logprob_from_result(self):
        c = measure(result(logprobs=tokens(-0.1, -0.2, -0.3)), policy())
        assert (c.method, c.tokens_scored, c.format_passed) == ("logprob", 3, None)
        assert c.value == pytest.approx(math.exp(-0.2))

    def test_empty_answer_escalates(self):
        p = policy()
        assert decide(measure(result("", ()), p), p, tier_index=0).reason == "low_confidence"

    def test_format_applied_to_text(self):
        p = policy(format={"regex": r"\d+"})
        assert measure(result("42", tokens(-0.1)), p).format_passed is True
        assert measure(result("forty", tokens(-0.1)), p).format_passed is False

    def test_consistency_counts_the_primary_answer(self):
        p = policy(method="consistency")
        c = measure(result("It is 12."), p, samples=["12", "13", "twelve"])
        assert (c.value, c.tokens_scored) == (pytest.approx(2 / 4), 4)
        with pytest.raises(ValueError, match="samples"):
            measure(result("12"), p)

    def test_verify_uses_first_position_offering_yes_or_no(self):
        reply = (
            TokenLogprob("\n", -0.01, top=(("\n", -0.01), (" ", -5.0))),
            TokenLogprob("Yes", math.log(0.7), top=(("Yes", math.log(0.7)), ("No", math.log(0.3)))),
        )
        p = policy(method="verify")
        c = measure(result("4"), p, verification=result("\nYes", reply))
        assert c.value == pytest.approx(0.7)
        with pytest.raises(ValueError, match="verification"):
            measure(result("4"), p)

    def test_verify_counts_sampled_token_missing_from_top(self):
        reply = (TokenLogprob(" yes", math.log(0.2), top=((" no", math.log(0.6)),)),)
        c = measure(result("4"), policy(method="verify"), verification=result(" no", reply))
        assert c.value == pytest.approx(0.25)

    def test_verify_without_yes_no_is_undecided(self):
        reply = (TokenLogprob("Maybe", -0.1, top=(("Maybe", -0.1),)),)
        assert measure(result("4"), policy(method="verify"), verification=result("Maybe", reply)).value == 0.5


class TestSampling:
    def test_logprobs_requested_for_logprob_method_only(self):
        base = SamplingOptions(temperature=0.3)
        assert answer_sampling(base, policy()).logprobs is True
        assert answer_sampling(base, policy(method="verify")) == base

    def test_consistency_samples_are_hot_and_distinctly_seeded(self):
        base = SamplingOptions(temperature=0.0, seed=7, logprobs=True, top_logprobs=3)
        first, second = (consistency_sampling(base, policy(), i) for i in range(2))
        assert (first.temperature, first.seed, second.seed, first.logprobs) == (0.7, 8, 9, False)
        assert consistency_sampling(SamplingOptions(), policy(), 0).seed is None

    def test_verify_is_greedy_with_alternatives(self):
        s = verify_sampling(policy())
        assert (s.temperature, s.max_tokens, s.logprobs, s.top_logprobs) == (0.0, 3, True, 10)


class TestPrefix:
    def test_holds_until_k_tokens(self):
        p = policy(streaming={"holdback_tokens": 4})
        assert decide_on_prefix(tokens(-0.1, -0.1, -0.1), p, finished=False, tier_index=0).action == "hold"

    def test_decides_on_exactly_the_first_k(self):
        p = policy(streaming={"holdback_tokens": 2})
        # The 3rd token is terrible but arrived in the same chunk: it must not count.
        d = decide_on_prefix(tokens(-0.1, -0.3, -50.0), p, finished=False, tier_index=0)
        assert (d.action, d.tokens_scored) == ("release", 2)
        assert d.decision is not None and d.decision.confidence == pytest.approx(math.exp(-0.2))

    def test_low_prefix_confidence_escalates(self):
        p = policy(streaming={"holdback_tokens": 2})
        d = decide_on_prefix(tokens(-1.0, -1.0), p, finished=False, tier_index=0)
        assert d.action == "escalate" and d.decision is not None and d.decision.next_tier_index == 1

    def test_short_answer_is_decided_whole(self):
        p = policy(streaming={"holdback_tokens": 16})
        d = decide_on_prefix(tokens(-0.1, -0.3), p, finished=True, tier_index=0)
        assert (d.action, d.tokens_scored) == ("release", 2)
        assert decide_on_prefix((), p, finished=True, tier_index=0).action == "escalate"

    def test_top_tier_releases_at_once(self):
        d = decide_on_prefix((), policy(), finished=False, tier_index=1)
        assert (d.action, d.decision) == ("release", None)

    def test_format_holds_whole_answer_then_checks_text(self):
        p = policy(format={"regex": r"\d+"}, streaming={"holdback_tokens": 1})
        assert decide_on_prefix(tokens(-0.01, -0.01), p, finished=False, tier_index=0).action == "hold"
        done = decide_on_prefix(tokens(-0.01, -0.01), p, finished=True, text="abc", tier_index=0)
        assert done.action == "escalate" and done.decision is not None and done.decision.reason == "format_failed"
        ok = decide_on_prefix(tokens(-0.01, -0.01), p, finished=True, text="12", tier_index=0)
        assert ok.action == "release"

    def test_buffer_mode_and_other_methods_need_whole_answer(self):
        buffered = policy(streaming={"mode": "buffer", "holdback_tokens": 1})
        assert decide_on_prefix(tokens(-0.1, -0.1), buffered, finished=False, tier_index=0).action == "hold"
        assert decide_on_prefix(tokens(-0.1), buffered, finished=True, tier_index=0).action == "release"
        verify = policy(method="verify", streaming={"holdback_tokens": 1})
        assert decide_on_prefix(tokens(-0.1, -0.1), verify, finished=False, tier_index=0).action == "hold"
        assert decide_on_prefix(tokens(-0.1), verify, finished=True, tier_index=0).action == "decide"


class TestTrace:
    def test_wasted_tokens_count_escalated_attempts_only(self):
        trace = CascadeTrace(
            (
                TierAttempt("small", prompt_tokens=20, completion_tokens=16, confidence=0.41, escalated=True,
                            scoring_tokens=30),
                TierAttempt("large", prompt_tokens=20, completion_tokens=80, confidence=None, escalated=False),
            )
        )
        assert trace.wasted_tokens() == {"small": 66}
        assert (trace.tier_chain, trace.confidences, trace.escalated) == (("small", "large"), (0.41, None), True)

    def test_accepted_first_answer_wastes_nothing(self):
        trace = CascadeTrace((TierAttempt("small", 10, 5, 0.95, escalated=False),))
        assert (trace.escalated, trace.wasted_tokens(), trace.tier_chain) == (False, {}, ("small",))
