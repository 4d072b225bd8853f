"""Cascades: score a cheap tier's answer and decide whether to escalate it one tier up."""

from serving.cascade.confidence import (
    Confidence,
    consistency_confidence,
    format_ok,
    logprob_confidence,
    modal_answer,
    verify_confidence,
    verify_prompt,
)
from serving.cascade.config import CascadeConfig, CascadeOverride, FormatValidator
from serving.cascade.policy import (
    CascadeDecision,
    CascadePolicy,
    CascadeTrace,
    PrefixDecision,
    TierAttempt,
    answer_sampling,
    cascade_policy,
    consistency_sampling,
    decide,
    decide_on_prefix,
    measure,
    verify_sampling,
)

__all__ = [
    "CascadeConfig",
    "CascadeDecision",
    "CascadeOverride",
    "CascadePolicy",
    "CascadeTrace",
    "Confidence",
    "FormatValidator",
    "PrefixDecision",
    "TierAttempt",
    "answer_sampling",
    "cascade_policy",
    "consistency_confidence",
    "consistency_sampling",
    "decide",
    "decide_on_prefix",
    "format_ok",
    "logprob_confidence",
    "measure",
    "modal_answer",
    "verify_confidence",
    "verify_prompt",
    "verify_sampling",
]
