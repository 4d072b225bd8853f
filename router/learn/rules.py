"""The learning rules, as pure functions: which label an outcome or a feedback teaches, whether it is sampled,
whether the caps let it in, and whether a routed request explores the cheapest tier.

Sampling and exploration hash the request's id instead of drawing a random number: the same request always
gets the same answer (replays and tests are reproducible), and across requests the shares hold.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from router.learn.config import LearnConfig
from router.learn.types import RequestOutcome, Verdict
from router.types import RouteDecision


def unit_hash(value: str, salt: str) -> float:
    """A number in [0, 1) fixed by `value` and `salt`, spread evenly across values."""
    digest = hashlib.blake2b(f"{salt}\x00{value}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def sampled(response_id: str, rate: float, salt: str = "learn") -> bool:
    """Keep this response with probability `rate` (deterministic per id)."""
    return rate >= 1.0 or unit_hash(response_id, salt) < rate


def outcome_label(outcome: RequestOutcome, tier_names: Sequence[str], margin: float = 0.0
                  ) -> tuple[str | None, Verdict | None]:
    """The tier a decided cascade says this text needs: the answering tier when its answer was kept, the next
    tier up when it escalated. (None, why) when the outcome teaches nothing."""
    if not outcome.decided or not outcome.tier_chain or outcome.tier_chain[0] not in tier_names:
        return None, "no_label"
    first = outcome.tier_chain[0]
    index = list(tier_names).index(first)
    if index >= len(tier_names) - 1:  # the top tier is never judged
        return None, "no_label"
    if outcome.threshold is not None and abs(outcome.confidence - outcome.threshold) < margin:
        return None, "near_threshold"
    return (tier_names[index + 1] if outcome.escalated else first), None


def feedback_label(answer_tier: str, score: float, tier_names: Sequence[str], good_at: float) -> str | None:
    """The tier a feedback score says this text needs: a good answer from a tier below the top labels that
    tier, a bad one the tier above; feedback on the top tier's answers says nothing about routing."""
    if answer_tier not in tier_names:
        return None
    index = list(tier_names).index(answer_tier)
    if index >= len(tier_names) - 1:
        return None
    return answer_tier if score >= good_at else tier_names[index + 1]


def sample_rate(cfg: LearnConfig, *, escalated: bool, feedback: bool) -> float:
    if feedback:
        return cfg.sample_feedback
    return cfg.sample_escalated if escalated else cfg.sample_accepted


@dataclass(frozen=True)
class WindowCounts:
    """Exemplars learned in the current window: in all, per label, per API key id (None: no key)."""

    total: int = 0
    per_label: Mapping[str, int] | None = None
    per_key: Mapping[str | None, int] | None = None


def admit(counts: WindowCounts, label: str, api_key_id: str | None, cfg: LearnConfig) -> Verdict | None:
    """None when the caps let one more exemplar of `label` from `api_key_id` in; else the cap it hits.

    Anonymous traffic (no key) counts as one key: without keys nothing tells clients apart."""
    if (counts.per_label or {}).get(label, 0) >= cfg.max_per_label:
        return "label_cap"
    from_key = (counts.per_key or {}).get(api_key_id, 0)
    if from_key >= cfg.max_per_key:
        return "key_cap"
    if counts.total >= cfg.key_share_after and (from_key + 1) / (counts.total + 1) > cfg.max_key_share:
        return "key_share"
    return None


def gate(outcome_key: str | None, cfg: LearnConfig) -> Verdict | None:
    """None when a request's key may teach at all; else why not (learning off, the key opted out, no key)."""
    if not cfg.enabled:
        return "disabled"
    if outcome_key is None:
        return None if cfg.learn_anonymous else "anonymous"
    return "opted_out" if outcome_key in cfg.opt_out_key_ids else None


def explore(decision: RouteDecision, request_id: str, rate: float, *, cascading: bool) -> bool:
    """Whether a request the router sent above the cheapest tier should try the cheapest tier first anyway.

    Only router decisions explore (never a tier the client named, nor a conversation's tier), and only where
    a cascade will judge the cheap answer, so the client still gets the tier above when it is not good enough.
    """
    if not cascading or rate <= 0 or decision.tier_index == 0:
        return False
    if decision.router in ("explicit", "forced", "session") or decision.fallback:
        return False
    return unit_hash(request_id, "explore") < rate
