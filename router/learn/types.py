"""What the ingress tells the learner (a finished request's outcome, a client's feedback) and what it gets back."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Literal

from router.types import Exemplar

Verdict = Literal[
    "learned",  # became an exemplar (written at the next flush)
    "remembered",  # no label, but the response now accepts feedback
    "disabled", "opted_out", "anonymous", "no_label", "near_threshold", "sampled_out", "label_cap", "key_cap",
    "key_share",  # dropped by a rule, named
    "unknown_response", "foreign_response", "expired_response",  # feedback refused
]


def key_id(api_key: str) -> str:
    """The id the learner knows an API key by: the first 16 hex digits of its SHA-256 (never the key)."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RequestOutcome:
    """One finished request, as the ingress saw it (call `Learner.observe` once per answered request)."""

    response_id: str
    """The id the client got back (the completion's `id`): feedback names it."""
    text: str
    """The routing text (system prompt and last user message), the text the router embeds."""
    tier_chain: tuple[str, ...]
    """Tiers that answered, in order (more than one: the cascade escalated)."""
    confidence: float | None = None
    """The cascade's confidence in the first tier's answer; None: no cascade scored it."""
    threshold: float | None = None
    """The threshold that confidence was compared with."""
    api_key_id: str | None = None
    """`key_id(key)` of the request's API key; None: no key."""
    explored: bool = False
    """The router had sent it higher and exploration tried the cheapest tier (`Learner.explore`)."""
    timestamp: float = field(default_factory=time.time)

    @property
    def decided(self) -> bool:
        """A cascade judged the first tier's answer (kept it, or escalated)."""
        return self.confidence is not None and len(self.tier_chain) >= 1

    @property
    def escalated(self) -> bool:
        return len(self.tier_chain) > 1


@dataclass(frozen=True)
class Feedback:
    """A client's score of an answer (`POST /v1/feedback`)."""

    response_id: str
    score: float
    """0 (useless) .. 1 (right); `router.learn.feedback_good_at` splits good from bad."""
    api_key_id: str | None
    timestamp: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if not 0.0 <= self.score <= 1.0:
            raise ValueError(f"feedback score ({self.score}) must be within [0, 1].")


@dataclass(frozen=True)
class LearnResult:
    """What the learner did with an outcome or a feedback."""

    verdict: Verdict
    exemplar: Exemplar | None = None
    """The exemplar learned (queued for the next flush), if any."""

    @property
    def learned(self) -> bool:
        return self.verdict == "learned"
