"""Capacity state at the ingress: in-flight counts, recent throughput, and the calls into the pure policy."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence

from router.config import resolve_thresholds
from serving.capacity import CapacityDecision, admit, choose_tier
from serving.capacity.config import CapacityConfig
from serving.channel.errors import Overloaded
from serving.channel.tiers import TierClient
from serving.metrics import Metrics


class CapacityController:
    """Holds per-tier in-flight counts; every tier call runs between `acquire(tier)` and `release(tier)`."""

    def __init__(self, cfg: CapacityConfig, tier_names: Sequence[str], tiers: TierClient, metrics: Metrics) -> None:
        self.cfg = cfg
        self.tier_names = list(tier_names)
        self.tiers = tiers
        self.metrics = metrics
        self.inflight = {name: 0 for name in tier_names}
        self._done: dict[str, deque[float]] = {name: deque() for name in tier_names}

    def place(self, tier: str, score: float | None, thresholds: Sequence[float]) -> CapacityDecision:
        """Keep the routed tier or move it by load (pure policy on the cached load view)."""
        loads = self.tiers.loads(max_age_s=self.cfg.stats_max_age_s)
        if len(thresholds) != len(self.tier_names) - 1:  # a decision without boundaries: the evenly spaced ones
            thresholds = resolve_thresholds((), len(self.tier_names))
        return choose_tier(
            self.tier_names.index(tier),
            0.5 if score is None else score,
            thresholds,
            loads,
            self.tier_names,
            self.cfg,
            now=time.time(),
            inflight=self.inflight,
        )

    def throughput_rps(self, tier: str) -> float | None:
        window = self.cfg.stats_window_s
        done = self._done[tier]
        now = time.monotonic()
        while done and now - done[0] > window:
            done.popleft()
        return len(done) / window if done else None

    def has_room(self, tier: str) -> bool:
        """Whether `tier` would admit one more request now (no side effects)."""
        return self.inflight[tier] < self.cfg.limits_for(tier).max_inflight

    def check(self, tier: str) -> None:
        """Raise Overloaded (429/503 + Retry-After) when the tier is at its admission limit."""
        verdict = admit(
            self.inflight,
            tier,
            self.cfg,
            load=self.tiers.loads(max_age_s=self.cfg.stats_max_age_s).get(tier),
            throughput_rps=self.throughput_rps(tier),
        )
        if not verdict.admitted:
            self.metrics.rejections.labels(tier, str(verdict.status)).inc()
            raise Overloaded.make(
                f"Tier '{tier}' is at its limit of {verdict.limit} requests in flight; retry after "
                f"{verdict.retry_after_s} s.",
                retry_after_s=verdict.retry_after_s or self.cfg.retry_after_default_s,
                status_code=verdict.status or self.cfg.reject_status,
            )

    def acquire(self, tier: str) -> None:
        """Admit one call to `tier` (or raise Overloaded); pair with `release`."""
        self.check(tier)
        self.inflight[tier] += 1
        self.metrics.inflight.labels(tier).set(self.inflight[tier])

    def release(self, tier: str) -> None:
        self.inflight[tier] -= 1
        self.metrics.inflight.labels(tier).set(self.inflight[tier])
        self._done[tier].append(time.monotonic())
