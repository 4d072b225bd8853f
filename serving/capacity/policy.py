"""Capacity decisions: which tier a routed request runs on under load, and whether it is admitted.

    tier = choose_tier(route.tier_index, route.score, route.thresholds, loads, tier_names, cfg, now=now)
    admission = admit(inflight, tier.tier, cfg, load=loads.get(tier.tier), throughput_rps=...)

`choose_tier` only moves requests; `admit` is the one place that rejects (429/503 + Retry-After).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeGuard

from serving.capacity.config import CapacityConfig
from serving.types import EngineLoad

CapacityAction = Literal["keep", "spill_up", "spill_down"]
CapacityReason = Literal[
    "disabled",  # capacity routing is off
    "unknown_load",  # the routed tier's load is missing or stale: never spill on a guess
    "headroom",  # the routed tier is not saturated
    "spill_up",  # saturated; moved to the next tier up, which has headroom
    "spill_down_borderline",  # saturated (quality_first); a borderline request moved down
    "spill_down_latency_first",  # saturated (latency_first); moved down, answered by a cheaper tier
    "wait_for_tier",  # saturated, no eligible neighbour with headroom: stays, bounded by admission
]


@dataclass(frozen=True)
class CapacityDecision:
    """The tier a request runs on, relative to the one the router planned."""

    action: CapacityAction
    tier_index: int
    tier: str
    planned_tier_index: int
    reason: CapacityReason
    planned_saturation: float | None = None
    """Saturation of the planned tier (1.0 = saturated); None when its load was unknown."""


@dataclass(frozen=True)
class Admission:
    """Whether a request may go to `tier` now; if not, the status and Retry-After to answer with."""

    admitted: bool
    tier: str
    inflight: int
    limit: int
    status: Literal[429, 503] | None = None
    retry_after_s: int | None = None


def saturation(load: EngineLoad, cfg: CapacityConfig) -> float:
    """How full the tier is against its limits: the largest of the three ratios, 1.0 = saturated.

    Ratios: waiting / (max_waiting + 1), (running / max_num_seqs) / max_running_share,
    kv_cache_usage / max_kv_cache_usage.
    """
    limits = cfg.limits_for(load.tier)
    waiting = load.waiting / (limits.max_waiting + 1)
    running = load.running / max(load.max_num_seqs, 1) / limits.max_running_share
    kv = load.kv_cache_usage / limits.max_kv_cache_usage
    return max(waiting, running, kv)


def is_known(load: EngineLoad | None, cfg: CapacityConfig, *, now: float) -> TypeGuard[EngineLoad]:
    """Load that can be trusted: reported within `stats_max_age_s` of `now` and well-formed.

    A load never reported (timestamp 0), a stale one, or one with a negative or non-finite field is
    unknown, and decisions treat unknown load as "do not spill".
    """
    if load is None or load.timestamp <= 0 or now - load.timestamp > cfg.stats_max_age_s:
        return False
    values = (load.running, load.waiting, load.kv_cache_usage, load.max_num_seqs)
    return all(math.isfinite(v) and v >= 0 for v in values)


def combine_loads(loads: Sequence[EngineLoad]) -> EngineLoad:
    """One tier's load from its replicas: counts add up, KV usage averages, the oldest timestamp wins."""
    if not loads:
        raise ValueError("no replica loads to combine")
    tiers = {load.tier for load in loads}
    if len(tiers) != 1:
        raise ValueError(f"loads of different tiers {sorted(tiers)} cannot be combined.")
    return EngineLoad(
        tier=loads[0].tier,
        running=sum(x.running for x in loads),
        waiting=sum(x.waiting for x in loads),
        kv_cache_usage=sum(x.kv_cache_usage for x in loads) / len(loads),
        max_num_seqs=sum(x.max_num_seqs for x in loads),
        ongoing=sum(x.ongoing for x in loads),
        timestamp=min(x.timestamp for x in loads),
    )


def choose_tier(
    planned_tier_index: int,
    score: float,
    thresholds: Sequence[float],
    loads: Mapping[str, EngineLoad],
    tier_names: Sequence[str],
    cfg: CapacityConfig,
    *,
    now: float,
    inflight: Mapping[str, int] | None = None,
) -> CapacityDecision:
    """Keep the routed tier, or spill one tier up or down when it is saturated.

    `thresholds` are the router's ascending boundaries (thresholds[i] between tier i and i + 1).
    A saturated tier spills up first (never costs quality) if `spill_up` allows, then down per
    `hard_mode`. A target needs fresh load below `headroom_below` and, with `inflight` given, room
    under its `max_inflight`. Missing or stale load on either side means no spill.
    """
    n = len(tier_names)
    if not 0 <= planned_tier_index < n:
        raise ValueError(f"planned_tier_index {planned_tier_index} is out of range for tiers {list(tier_names)}.")
    if len(thresholds) != n - 1:
        raise ValueError(f"{len(thresholds)} thresholds given for {n} tiers; pass one per boundary ({n - 1}).")

    def result(action: CapacityAction, index: int, reason: CapacityReason, sat: float | None) -> CapacityDecision:
        return CapacityDecision(action, index, tier_names[index], planned_tier_index, reason, sat)

    planned = tier_names[planned_tier_index]
    load = loads.get(planned)
    if not cfg.enabled:
        return result("keep", planned_tier_index, "disabled", None)
    # A tier at its admission limit is full whatever its (possibly stale) engine stats say.
    at_limit = inflight is not None and inflight.get(planned, 0) >= cfg.limits_for(planned).max_inflight
    if not at_limit and not is_known(load, cfg, now=now):
        return result("keep", planned_tier_index, "unknown_load", None)
    sat = max(saturation(load, cfg) if is_known(load, cfg, now=now) else 0.0, 1.0 if at_limit else 0.0)
    if sat < 1.0:
        return result("keep", planned_tier_index, "headroom", sat)

    def has_headroom(index: int) -> bool:
        name = tier_names[index]
        target = loads.get(name)
        if not is_known(target, cfg, now=now) or saturation(target, cfg) >= cfg.headroom_below:
            return False
        return inflight is None or inflight.get(name, 0) < cfg.limits_for(name).max_inflight

    up = planned_tier_index + 1
    if up < n and cfg.spill_up != "off":
        eligible = cfg.spill_up == "all" or score >= thresholds[planned_tier_index] - cfg.borderline_band
        if eligible and has_headroom(up):
            return result("spill_up", up, "spill_up", sat)
    down = planned_tier_index - 1
    if down >= 0 and has_headroom(down):
        if cfg.hard_mode == "latency_first":
            return result("spill_down", down, "spill_down_latency_first", sat)
        if score < thresholds[down] + cfg.borderline_band:
            return result("spill_down", down, "spill_down_borderline", sat)
    return result("keep", planned_tier_index, "wait_for_tier", sat)


def admit(
    inflight: Mapping[str, int],
    tier: str,
    cfg: CapacityConfig,
    *,
    load: EngineLoad | None = None,
    throughput_rps: float | None = None,
) -> Admission:
    """Admit a request to `tier` while its in-flight count is under `max_inflight`; else reject.

    Retry-After estimates when the backlog ahead drains: backlog = max(requests over the limit + 1,
    the engine's waiting queue), divided by recent throughput (completed requests per second),
    rounded up and clamped to [retry_after_min_s, retry_after_max_s]. Without a throughput:
    `retry_after_default_s`.
    """
    limit = cfg.limits_for(tier).max_inflight
    current = inflight.get(tier, 0)
    if current < limit:
        return Admission(True, tier, current, limit)
    wait_s = retry_after(current - limit + 1, cfg, load=load, throughput_rps=throughput_rps)
    return Admission(False, tier, current, limit, cfg.reject_status, wait_s)


def retry_after(
    over_limit: int, cfg: CapacityConfig, *, load: EngineLoad | None = None, throughput_rps: float | None = None
) -> int:
    """Whole seconds until a slot is likely free (see `admit`)."""
    if throughput_rps is None or not math.isfinite(throughput_rps) or throughput_rps <= 0:
        return cfg.retry_after_default_s
    backlog = max(over_limit, load.waiting if load is not None else 0, 1)
    seconds = math.ceil(backlog / throughput_rps)
    return min(max(seconds, cfg.retry_after_min_s), cfg.retry_after_max_s)
