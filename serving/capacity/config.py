"""Capacity section of the YAML config: load-aware tier choice and admission limits."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from pydantic import Field, model_validator

from router.configbase import StrictModel

SpillUpScope = Literal["off", "borderline", "all"]
HardMode = Literal["quality_first", "latency_first"]


class TierLimits(StrictModel):
    """When one tier counts as saturated, and how many requests it admits."""

    max_waiting: int = Field(default=4, ge=0)
    """Saturated when more requests than this wait in the engine's queue (vLLM `num_requests_waiting`)."""
    max_running_share: float = Field(default=1.0, gt=0.0, le=1.0)
    """Saturated when running / max_num_seqs reaches this (1.0: the batch is full)."""
    max_kv_cache_usage: float = Field(default=0.90, gt=0.0, le=1.0)
    """Saturated when this share of KV-cache blocks is in use (preemptions start near 1.0)."""
    max_inflight: int = Field(default=256, ge=1)
    """Requests this ingress replica sends to the tier at once (running and waiting in its engines); more are
    rejected with `reject_status` and Retry-After.
    Keep max_inflight x ingress replicas within the tier's Ray Serve capacity (replicas x
    max_ongoing_requests + max_queued_requests) so tierserve answers before Ray Serve's own backpressure."""


class CapacityConfig(StrictModel):
    """Load-aware routing and admission control.

    `enabled` turns on load-aware tier choice (spilling a request to a neighbouring tier). Admission
    limits (`max_inflight`, 429/503 with Retry-After) always apply: no tier gets an unbounded queue.
    """

    enabled: bool = False
    """Move requests off a saturated tier (spill); off: every request stays on its routed tier."""
    poll_interval_s: float = Field(default=0.5, gt=0.0, le=60.0)
    """How often the ingress refreshes its cached per-tier load."""
    stats_window_s: float = Field(default=2.0, gt=0.0, le=300.0)
    """Window over which throughput (completed requests per second) is measured for Retry-After."""
    stats_max_age_s: float = Field(default=2.0, gt=0.0, le=600.0)
    """Load older than this is unknown, and unknown load never causes a spill (the routed tier is kept)."""
    defaults: TierLimits = TierLimits()
    """Limits for every tier not listed in `tiers`."""
    tiers: dict[str, TierLimits] = {}
    """Per-tier limits by tier name; fields not given there come from `defaults`."""
    spill_up: SpillUpScope = "all"
    """Which requests routed to a saturated tier may move one tier up when that one has headroom:
    `all`, only `borderline` ones (score within `borderline_band` below the boundary), or none (`off`)."""
    borderline_band: float = Field(default=0.1, ge=0.0, le=1.0)
    """Distance from a routing threshold within which a score counts as borderline."""
    headroom_below: float = Field(default=0.8, gt=0.0, le=1.0)
    """A tier takes spilled requests only while its saturation (1.0 = saturated) is below this."""
    hard_mode: HardMode = "quality_first"
    """Requests routed to a saturated tier that cannot move up. `quality_first`: wait for that tier
    (bounded by `max_inflight`); only borderline ones (score within `borderline_band` above the boundary)
    move down. `latency_first`: move down whenever the lower tier has headroom; the response is marked."""
    reject_status: Literal[429, 503] = 503
    """Status past a tier's `max_inflight`: 503 (server overloaded) or 429 (too many requests)."""
    retry_after_min_s: int = Field(default=1, ge=1)
    """Lowest Retry-After sent."""
    retry_after_default_s: int = Field(default=2, ge=1)
    """Retry-After when no recent throughput is known."""
    retry_after_max_s: int = Field(default=30, ge=1)
    """Highest Retry-After sent."""

    @model_validator(mode="after")
    def _consistent(self) -> CapacityConfig:
        if self.stats_max_age_s < 2 * self.poll_interval_s:
            raise ValueError(
                f"stats_max_age_s ({self.stats_max_age_s}) must be at least twice poll_interval_s "
                f"({self.poll_interval_s}), else fresh polls look stale; raise it to {2 * self.poll_interval_s}."
            )
        if not self.retry_after_min_s <= self.retry_after_default_s <= self.retry_after_max_s:
            raise ValueError(
                f"retry_after_min_s ({self.retry_after_min_s}) <= retry_after_default_s "
                f"({self.retry_after_default_s}) <= retry_after_max_s ({self.retry_after_max_s}) must hold; "
                "reorder the values."
            )
        return self

    def limits_for(self, tier: str) -> TierLimits:
        """The tier's limits: `defaults` updated with the fields set under `tiers[tier]`."""
        override = self.tiers.get(tier)
        if override is None:
            return self.defaults
        return self.defaults.model_copy(update=override.model_dump(exclude_unset=True))

    def check_tiers(
        self, tier_names: Sequence[str], *, serve_capacity: Mapping[str, int] | None = None, ingress_replicas: int = 1
    ) -> None:
        """Raise ValueError for unknown tier names, or an admission limit Ray Serve would hit first.

        `serve_capacity`: per tier, replicas x max_ongoing_requests + max_queued_requests (omit
        unbounded tiers).
        """
        unknown = sorted(set(self.tiers) - set(tier_names))
        if unknown:
            raise ValueError(f"capacity.tiers names unknown tiers {unknown}; use one of {list(tier_names)}.")
        for name, capacity in (serve_capacity or {}).items():
            limit = self.limits_for(name).max_inflight
            if limit * ingress_replicas > capacity:
                raise ValueError(
                    f"capacity max_inflight for tier {name} ({limit}) x {ingress_replicas} ingress replicas exceeds "
                    f"its Ray Serve capacity ({capacity}); lower max_inflight to {capacity // ingress_replicas} "
                    "or raise the tier's max_ongoing_requests/max_queued_requests."
                )
