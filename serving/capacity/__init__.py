"""Capacity: load-aware tier choice (spill) and admission limits (429/503 with Retry-After)."""

from serving.capacity.config import CapacityConfig, TierLimits
from serving.capacity.policy import (
    Admission,
    CapacityDecision,
    admit,
    choose_tier,
    combine_loads,
    is_known,
    retry_after,
    saturation,
)

__all__ = [
    "Admission",
    "CapacityConfig",
    "CapacityDecision",
    "TierLimits",
    "admit",
    "choose_tier",
    "combine_loads",
    "is_known",
    "retry_after",
    "saturation",
]
