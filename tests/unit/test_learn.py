"""The learning rules: labels from cascade outcomes and feedback, sampling, caps per label and per key,
opt-out, provenance and expiry, exploration."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from router.config import RouterConfig
from router.learn import Feedback, LearnConfig, Learner, RequestOutcome, key_id
from router.learn.rules import explore, outcome_label
from router.types import RouteDecision

TIERS = ["small", "large"]


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def outcome(i: int, *, escalated: bool = False, key: str | None = "k1", confidence: float = 0.5,
            threshold: float = 0.8, at: float = 1_000_000.0, chain: tuple[str, ...] | None = None) -> RequestOutcome:
    chain = chain or (("small", "large") if escalated else ("small",))
    return RequestOutcome(f"resp-{i}", f"prompt number {i}", chain, confidence=confidence, threshold=threshold,
                          api_key_id=key, timestamp=at)


def learner(clock: Clock | None = None, retention_s: float | None = None, **overrides) -> Learner:
    cfg = LearnConfig(**{"enabled": True, "sample_accepted": 1.0, **overrides})
    return Learner(cfg, TIERS, retention_s=retention_s, clock=clock or Clock())


def test_a_kept_answer_labels_its_tier_and_an_escalation_the_tier_above() -> None:
    assert outcome_label(outcome(1), TIERS) == ("small", None)
    assert outcome_label(outcome(2, escalated=True), TIERS) == ("large", None)
    # the top tier's answers are never judged, and an answer no cascade scored says nothing
    assert outcome_label(outcome(3, chain=("large",)), TIERS) == (None, "no_label")
    unscored = RequestOutcome("r", "t", ("small",))
    assert outcome_label(unscored, TIERS) == (None, "no_label")
    assert outcome_label(outcome(4, confidence=0.79), TIERS, margin=0.05) == (None, "near_threshold")
    three = ["s", "m", "l"]
    assert outcome_label(RequestOutcome("r", "t", ("m", "l"), confidence=0.1, threshold=0.5), three) == ("l", None)


def test_learned_exemplars_carry_their_provenance_and_expire_with_the_query_log() -> None:
    clock = Clock()
    ln = learner(clock, retention_s=7 * 86_400)
    first = ln.observe(outcome(1, escalated=True, at=clock.t - 3))
    assert first.learned
    ex = first.exemplar
    assert (ex.tier, ex.provenance, ex.key_id, ex.source) == ("large", "cascade", "k1", "learned")
    assert ex.created_at == clock.t - 3 and ex.expires_at == clock.t - 3 + 7 * 86_400
    assert ln.drain() == [ex] and ln.drain() == []


def test_sampling_keeps_the_configured_share_and_is_the_same_for_the_same_response() -> None:
    ln = Learner(LearnConfig(enabled=True, sample_accepted=0.25, max_per_label=10**6, max_per_key=10**6,
                             max_key_share=1.0), TIERS, clock=Clock())
    verdicts = [ln.observe(outcome(i)).verdict for i in range(4000)]
    share = verdicts.count("learned") / len(verdicts)
    assert 0.22 < share < 0.28
    again = Learner(ln.cfg, TIERS, clock=Clock())
    assert [again.observe(outcome(i)).verdict for i in range(200)] == verdicts[:200]
    # escalations are all kept by default
    assert all(ln.observe(outcome(10_000 + i, escalated=True)).learned for i in range(50))


def test_one_key_cannot_flood_the_store() -> None:
    clock = Clock()
    ln = learner(clock, max_per_key=5, max_per_label=1000, max_key_share=1.0)
    verdicts = [ln.observe(outcome(i, key="flooder")).verdict for i in range(20)]
    assert verdicts == ["learned"] * 5 + ["key_cap"] * 15
    assert ln.observe(outcome(100, key="someone-else")).learned
    clock.t += 3601  # the window slides on
    assert ln.observe(outcome(200, key="flooder", at=clock.t)).learned


def test_one_key_cannot_dominate_the_window_and_labels_are_capped() -> None:
    ln = learner(max_per_key=1000, max_key_share=0.2, key_share_after=10)
    for i in range(10):  # ten clients, one exemplar each
        assert ln.observe(outcome(i, key=f"c{i}")).learned
    verdicts = [ln.observe(outcome(100 + i, key="poisoner", escalated=True)).verdict for i in range(10)]
    # at most a fifth of the window: 2 of 12, the third would be 3 of 13 > 20%
    assert verdicts[:2] == ["learned", "learned"] and set(verdicts[2:]) == {"key_share"}
    capped = learner(max_per_label=3, max_key_share=1.0)
    assert [capped.observe(outcome(i, key=f"c{i}")).verdict for i in range(5)] == ["learned"] * 3 + ["label_cap"] * 2
    assert capped.observe(outcome(9, key="c9", escalated=True)).learned  # another label has room


def test_opted_out_keys_anonymous_traffic_and_a_disabled_learner_teach_nothing() -> None:
    ln = learner(opt_out_key_ids=[key_id("secret-key")], learn_anonymous=False)
    assert ln.observe(outcome(1, key=key_id("secret-key"))).verdict == "opted_out"
    assert ln.observe(outcome(2, key=None)).verdict == "anonymous"
    assert ln.drain() == []
    off = Learner(LearnConfig(), TIERS)
    assert off.observe(outcome(3)).verdict == "disabled"
    assert off.feedback(Feedback("resp-3", 1.0, "k1")).verdict == "disabled"
    assert key_id("secret-key") != "secret-key" and len(key_id("secret-key")) == 16


def test_feedback_labels_the_answer_only_for_its_own_key_once_and_in_time() -> None:
    clock = Clock()
    ln = learner(clock, retention_s=3600, sample_accepted=0.0, feedback_window_s=86_400)
    plain = RequestOutcome("resp-a", "write a sonnet about routers", ("small",), api_key_id="alice", timestamp=clock.t)
    assert ln.observe(plain).verdict == "remembered"
    assert ln.feedback(Feedback("resp-a", 0.0, "mallory")).verdict == "foreign_response"
    assert ln.feedback(Feedback("resp-zzz", 0.0, "alice")).verdict == "unknown_response"
    bad = ln.feedback(Feedback("resp-a", 0.1, "alice"))
    assert bad.learned and (bad.exemplar.tier, bad.exemplar.provenance) == ("large", "feedback")
    assert ln.feedback(Feedback("resp-a", 0.1, "alice")).verdict == "unknown_response"  # one vote per answer
    ln.observe(RequestOutcome("resp-b", "t", ("small",), api_key_id="alice", timestamp=clock.t))
    assert ln.feedback(Feedback("resp-b", 0.9, "alice")).exemplar.tier == "small"
    # the top tier's answers take no feedback; and the window is the query log's retention (1 h here)
    ln.observe(RequestOutcome("resp-c", "t", ("small", "large"), confidence=0.1, api_key_id="alice",
                              timestamp=clock.t))
    assert ln.feedback(Feedback("resp-c", 0.0, "alice")).verdict == "unknown_response"
    ln.observe(RequestOutcome("resp-d", "t", ("small",), api_key_id="alice", timestamp=clock.t))
    clock.t += 3601
    assert ln.feedback(Feedback("resp-d", 0.0, "alice")).verdict == "unknown_response"
    with pytest.raises(ValueError, match="within"):
        Feedback("resp-d", 1.5, "alice")


def _decision(tier_index: int, router: str = "knn", fallback: bool = False) -> RouteDecision:
    return RouteDecision(TIERS[tier_index], tier_index, router, 0.7, (0.5,), "r", fallback=fallback)


def test_exploration_tries_the_small_tier_on_a_share_of_what_the_router_sends_up() -> None:
    ids = [f"req-{i}" for i in range(5000)]
    up = _decision(1)
    share = sum(explore(up, i, 0.05, cascading=True) for i in ids) / len(ids)
    assert 0.04 < share < 0.06
    assert explore(up, "req-7", 0.05, cascading=True) == explore(up, "req-7", 0.05, cascading=True)
    # never a request already on the cheapest tier, a tier the client chose, a session's tier, a fallback,
    # or without a cascade to judge the cheap answer
    for decision in (_decision(0), _decision(1, "explicit"), _decision(1, "forced"), _decision(1, "session"),
                     _decision(1, fallback=True)):
        assert not any(explore(decision, i, 0.5, cascading=True) for i in ids[:200])
    assert not any(explore(up, i, 0.5, cascading=False) for i in ids[:200])
    ln = learner(explore_rate=0.5)
    assert any(ln.explore(up, i, cascading=True) for i in ids[:50])
    assert not any(Learner(LearnConfig(explore_rate=0.5), TIERS).explore(up, i, cascading=True) for i in ids[:50])


def test_config_bounds_name_the_field() -> None:
    with pytest.raises(ValidationError, match="explore_rate"):
        LearnConfig(explore_rate=0.9)
    with pytest.raises(ValidationError, match="max_per_key"):
        LearnConfig(max_per_key=0)
    with pytest.raises(ValidationError, match="shadow.version"):
        RouterConfig(shadow={"enabled": True, "candidate": "version"})
    with pytest.raises(ValidationError, match="extra"):
        RouterConfig(learn={"enabeld": True})
