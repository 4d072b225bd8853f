"""Capacity decisions: saturation, spills, stale stats and admission with Retry-After."""

from __future__ import annotations

import math

import pytest

from serving.capacity import (
    CapacityConfig,
    admit,
    choose_tier,
    combine_loads,
    is_known,
    retry_after,
    saturation,
)
from serving.types import EngineLoad

NOW = 1_000_000.0
TIERS = ["small", "large"]
THRESHOLDS = [0.5]


def load(tier: str, running: int = 0, waiting: int = 0, kv: float = 0.0, max_num_seqs: int = 8, age: float = 0.1):
    return EngineLoad(tier=tier, running=running, waiting=waiting, kv_cache_usage=kv, max_num_seqs=max_num_seqs,
                      timestamp=NOW - age)


IDLE = {"small": load("small"), "large": load("large")}
SMALL_FULL = {"small": load("small", running=8, waiting=9), "large": load("large", running=2)}
LARGE_FULL = {"small": load("small", running=1), "large": load("large", running=8, waiting=9)}
BOTH_FULL = {"small": load("small", running=8, waiting=9), "large": load("large", running=8, waiting=9)}


def choose(planned: int, score: float, loads, cfg: CapacityConfig | None = None, **kw):
    return choose_tier(planned, score, THRESHOLDS, loads, TIERS, cfg or CapacityConfig(enabled=True), now=NOW, **kw)


class TestSaturation:
    def test_largest_ratio_wins(self):
        cfg = CapacityConfig()  # max_waiting 4, running share 1.0, kv 0.9
        assert saturation(load("small", running=4, waiting=1, kv=0.45), cfg) == pytest.approx(0.5)
        assert saturation(load("small", running=2, waiting=0, kv=0.81), cfg) == pytest.approx(0.9)
        assert saturation(load("small", waiting=3), cfg) == pytest.approx(3 / 5)

    def test_each_limit_saturates_on_its_own(self):
        cfg = CapacityConfig()
        assert saturation(load("small", running=8), cfg) >= 1.0
        assert saturation(load("small", waiting=5), cfg) >= 1.0
        assert saturation(load("small", waiting=4), cfg) < 1.0
        assert saturation(load("small", kv=0.9), cfg) >= 1.0
        assert saturation(load("small", running=7, waiting=4, kv=0.89), cfg) < 1.0

    def test_per_tier_limits_apply_by_load_tier(self):
        cfg = CapacityConfig(tiers={"large": {"max_waiting": 0}})
        assert saturation(load("large", waiting=1), cfg) >= 1.0
        assert saturation(load("small", waiting=1), cfg) < 1.0

    def test_stale_missing_and_malformed_loads_are_unknown(self):
        cfg = CapacityConfig()  # stats_max_age_s 2.0
        assert is_known(load("small", age=2.0), cfg, now=NOW)
        assert not is_known(load("small", age=2.5), cfg, now=NOW)
        assert not is_known(None, cfg, now=NOW)
        assert not is_known(EngineLoad("small", 0, 0, 0.0, 8), cfg, now=NOW)  # never reported: timestamp 0
        assert not is_known(load("small", kv=math.nan), cfg, now=NOW)
        assert not is_known(load("small", running=-1), cfg, now=NOW)

    def test_combine_replicas(self):
        a = EngineLoad("small", running=3, waiting=1, kv_cache_usage=0.2, max_num_seqs=8, ongoing=4, timestamp=10.0)
        b = EngineLoad("small", running=5, waiting=0, kv_cache_usage=0.6, max_num_seqs=8, ongoing=5, timestamp=9.0)
        c = combine_loads([a, b])
        assert (c.running, c.waiting, c.max_num_seqs, c.ongoing, c.timestamp) == (8, 1, 16, 9, 9.0)
        assert c.kv_cache_usage == pytest.approx(0.4)
        with pytest.raises(ValueError, match="different tiers"):
            combine_loads([a, load("large")])


class TestChooseTier:
    def test_disabled_keeps_the_plan_even_when_saturated(self):
        d = choose(0, 0.1, SMALL_FULL, CapacityConfig())
        assert (d.action, d.tier, d.reason) == ("keep", "small", "disabled")

    def test_headroom_keeps_the_plan(self):
        d = choose(0, 0.1, IDLE)
        assert (d.action, d.tier, d.reason, d.planned_saturation) == ("keep", "small", "headroom", 0.0)

    def test_easy_request_spills_up_when_small_saturated(self):
        d = choose(0, 0.1, SMALL_FULL)
        assert (d.action, d.tier_index, d.tier, d.reason) == ("spill_up", 1, "large", "spill_up")
        assert d.planned_saturation == pytest.approx(1.8)  # max(waiting 9 / (4 + 1), running 8 / 8)

    def test_no_spill_up_when_large_lacks_headroom(self):
        loads = {"small": SMALL_FULL["small"], "large": load("large", running=7)}  # 7/8 >= headroom 0.8
        assert choose(0, 0.1, loads).reason == "wait_for_tier"

    def test_no_spill_when_target_at_admission_limit(self):
        cfg = CapacityConfig(enabled=True, tiers={"large": {"max_inflight": 3}})
        assert choose(0, 0.1, SMALL_FULL, cfg, inflight={"large": 3}).action == "keep"
        assert choose(0, 0.1, SMALL_FULL, cfg, inflight={"large": 2}).action == "spill_up"

    def test_borderline_scope_spills_only_near_the_threshold(self):
        cfg = CapacityConfig(enabled=True, spill_up="borderline", borderline_band=0.1)
        assert choose(0, 0.39, SMALL_FULL, cfg).action == "keep"
        assert choose(0, 0.41, SMALL_FULL, cfg).action == "spill_up"
        assert choose(0, 0.49, SMALL_FULL, CapacityConfig(enabled=True, spill_up="off")).action == "keep"

    def test_stale_stats_never_spill(self):
        stale_small = {"small": load("small", running=8, waiting=9, age=5.0), "large": load("large")}
        assert choose(0, 0.1, stale_small).reason == "unknown_load"
        stale_large = {"small": SMALL_FULL["small"], "large": load("large", age=5.0)}
        assert choose(0, 0.1, stale_large).reason == "wait_for_tier"
        assert choose(0, 0.1, {"small": SMALL_FULL["small"]}).reason == "wait_for_tier"
        assert choose(0, 0.1, {}).reason == "unknown_load"

    def test_quality_first_hard_request_waits_for_large(self):
        d = choose(1, 0.9, LARGE_FULL)
        assert (d.action, d.tier, d.reason) == ("keep", "large", "wait_for_tier")

    def test_quality_first_moves_borderline_hard_request_down(self):
        d = choose(1, 0.55, LARGE_FULL)
        assert (d.action, d.tier, d.reason) == ("spill_down", "small", "spill_down_borderline")
        assert choose(1, 0.6, LARGE_FULL).action == "keep"  # 0.6 is not < 0.5 + 0.1

    def test_latency_first_answers_with_small_and_marks_it(self):
        cfg = CapacityConfig(enabled=True, hard_mode="latency_first")
        d = choose(1, 0.95, LARGE_FULL, cfg)
        assert (d.action, d.tier, d.reason) == ("spill_down", "small", "spill_down_latency_first")

    def test_everything_saturated_keeps_the_plan(self):
        cfg = CapacityConfig(enabled=True, hard_mode="latency_first")
        assert choose(1, 0.95, BOTH_FULL, cfg).reason == "wait_for_tier"
        assert choose(0, 0.1, BOTH_FULL, cfg).reason == "wait_for_tier"

    def test_three_tiers_spill_one_step(self):
        loads = {"s": load("s"), "m": load("m", running=8), "l": load("l")}
        d = choose_tier(1, 0.5, [0.3, 0.7], loads, ["s", "m", "l"], CapacityConfig(enabled=True), now=NOW)
        assert (d.tier, d.reason) == ("l", "spill_up")

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match="planned_tier_index 2"):
            choose(2, 0.5, IDLE)
        with pytest.raises(ValueError, match="one per boundary"):
            choose_tier(0, 0.5, [0.3, 0.6], IDLE, TIERS, CapacityConfig(), now=NOW)


class TestAdmit:
    cfg = CapacityConfig(tiers={"small": {"max_inflight": 4}})

    def test_admits_under_the_limit(self):
        a = admit({"small": 3}, "small", self.cfg)
        assert (a.admitted, a.status, a.retry_after_s, a.inflight, a.limit) == (True, None, None, 3, 4)
        assert admit({}, "large", self.cfg).admitted

    def test_rejects_at_the_limit_with_configured_status(self):
        a = admit({"small": 4}, "small", self.cfg)
        assert (a.admitted, a.status, a.retry_after_s) == (False, 503, 2)
        b = admit({"small": 4}, "small", self.cfg.model_copy(update={"reject_status": 429}))
        assert b.status == 429

    def test_retry_after_from_backlog_and_throughput(self):
        # 10 in flight, limit 4: 7 must finish; at 2 req/s -> 3.5 s -> 4.
        assert admit({"small": 10}, "small", self.cfg, throughput_rps=2.0).retry_after_s == 4
        # The engine's waiting queue is the larger backlog: 12 / 2 -> 6.
        busy = load("small", waiting=12)
        assert admit({"small": 4}, "small", self.cfg, load=busy, throughput_rps=2.0).retry_after_s == 6

    def test_retry_after_is_clamped(self):
        cfg = CapacityConfig()
        assert retry_after(1, cfg, throughput_rps=100.0) == 1
        assert retry_after(1000, cfg, throughput_rps=1.0) == 30
        assert retry_after(5, cfg, throughput_rps=0.0) == 2
        assert retry_after(5, cfg, throughput_rps=math.nan) == 2


class TestAdmissionLimitCountsAsSaturated:
    """A tier at its in-flight limit is full even when its engine stats look idle or are stale."""

    def test_at_limit_with_idle_stats_spills_up(self):
        cfg = CapacityConfig(enabled=True, defaults={"max_inflight": 4})
        d = choose(0, 0.1, IDLE, cfg, inflight={"small": 4, "large": 0})
        assert (d.action, d.tier) == ("spill_up", "large")

    def test_at_limit_with_unknown_stats_spills_up(self):
        cfg = CapacityConfig(enabled=True, defaults={"max_inflight": 4})
        loads = {"large": load("large")}  # small never reported
        d = choose(0, 0.1, loads, cfg, inflight={"small": 4})
        assert d.action == "spill_up"

    def test_below_limit_with_unknown_stats_keeps(self):
        cfg = CapacityConfig(enabled=True, defaults={"max_inflight": 4})
        d = choose(0, 0.1, {"large": load("large")}, cfg, inflight={"small": 3})
        assert (d.action, d.reason) == ("keep", "unknown_load")
