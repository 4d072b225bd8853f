"""Heuristic router rules: length ramp, keyword rules, clipping, reasons."""

from __future__ import annotations

import pytest

from router.config import HeuristicConfig, KeywordRule
from router.heuristic import HeuristicScorer


def test_routine_request_scores_low_and_says_why():
    result = HeuristicScorer(HeuristicConfig()).score("Extract the invoice number and convert the date to ISO.")
    assert result.score < 0.5
    assert "routine" in result.reason


def test_expert_multistep_request_scores_high():
    text = (
        "Analyze whether this non-compete clause is enforceable under California law, compare it with "
        "the contract terms across these documents, and evaluate the liability step by step."
    )
    result = HeuristicScorer(HeuristicConfig()).score(text)
    assert result.score >= 0.5
    for rule in ("expert", "reasoning", "multi-doc"):
        assert rule in result.reason


def test_length_ramp_is_linear_between_short_and_long():
    cfg = HeuristicConfig(base_score=0.2, short_chars=100, long_chars=300, length_weight=0.4, rules=[])
    scorer = HeuristicScorer(cfg)
    assert scorer.score("a" * 100).score == pytest.approx(0.2)
    assert scorer.score("a" * 200).score == pytest.approx(0.4)
    assert scorer.score("a" * 5000).score == pytest.approx(0.6)


def test_each_rule_counts_once_and_scores_are_clipped():
    cfg = HeuristicConfig(
        base_score=0.5,
        length_weight=0.0,
        rules=[KeywordRule(name="hard", patterns=[r"\bprove\b", r"\bderive\b"], weight=0.8)],
    )
    scorer = HeuristicScorer(cfg)
    assert scorer.score("prove it, prove it again, derive it").score == 1.0
    cfg_down = HeuristicConfig(base_score=0.1, rules=[KeywordRule(name="easy", patterns=["list"], weight=-0.5)])
    assert HeuristicScorer(cfg_down).score("list the files").score == 0.0


def test_patterns_are_case_insensitive_regexes():
    cfg = HeuristicConfig(base_score=0.0, rules=[KeywordRule(name="code", patterns=[r"thread-?safe"], weight=0.3)])
    assert HeuristicScorer(cfg).score("Make this THREADSAFE").score == pytest.approx(0.3)
    assert HeuristicScorer(cfg).score("thread pool").score == 0.0
