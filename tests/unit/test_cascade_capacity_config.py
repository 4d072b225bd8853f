"""`cascade:` and `capacity:` config sections: defaults, and errors that name the field and the fix."""

from __future__ import annotations

import pytest

from router.errors import ConfigError
from serving.capacity import CapacityConfig
from serving.cascade import CascadeConfig
from serving.config import parse_config

BASE = {"tiers": [{"name": "small", "model": "m", "engine": {"kv_cache_memory_bytes": 1 << 28}}]}


def parse(**sections):
    return parse_config({**BASE, **sections})


def error(**sections) -> str:
    with pytest.raises(ConfigError) as exc:
        parse(**sections)
    return str(exc.value)


class TestDefaults:
    def test_config_without_sections_is_valid_and_conservative(self):
        cfg = parse()
        assert cfg.cascade.enabled is False
        assert cfg.cascade.threshold == 0.80
        assert cfg.cascade.method == "logprob"
        assert cfg.cascade.streaming.holdback_tokens == 16
        assert cfg.capacity.enabled is False
        assert cfg.capacity.defaults.max_inflight == 256  # bounded, and what a replica holds by default:
        tier = cfg.tiers[0].deployment
        assert tier.max_ongoing_requests + tier.max_queued_requests == cfg.capacity.defaults.max_inflight
        assert cfg.capacity.reject_status == 503

    def test_full_sections_parse(self):
        cfg = parse(
            cascade={
                "enabled": True,
                "method": "verify",
                "threshold": 0.7,
                "tier_thresholds": {"small": 0.9},
                "logprob": {"aggregate": "tail", "tail_fraction": 0.1},
                "consistency": {"n": 3, "temperature": 1.0, "normalize": "text"},
                "verify": {"yes_tokens": ["yes", "correct"], "no_tokens": ["no"]},
                "format": {"json_schema": {"type": "object"}},
                "streaming": {"mode": "buffer", "holdback_tokens": 8},
                "max_escalations": 2,
            },
            capacity={
                "enabled": True,
                "poll_interval_s": 0.25,
                "tiers": {"small": {"max_inflight": 8}},
                "hard_mode": "latency_first",
                "reject_status": 429,
            },
        )
        assert cfg.cascade.verify.yes_tokens == ("yes", "correct")
        assert cfg.capacity.limits_for("small").max_inflight == 8


    def test_per_tier_limits_inherit_unset_fields_from_defaults(self):
        section = {"defaults": {"max_waiting": 2, "max_inflight": 16}, "tiers": {"small": {"max_inflight": 8}}}
        cfg = parse(capacity=section)
        small = cfg.capacity.limits_for("small")
        assert (small.max_inflight, small.max_waiting) == (8, 2)
        assert cfg.capacity.limits_for("large").max_inflight == 16


class TestCascadeErrors:
    @pytest.mark.parametrize(
        ("section", "field"),
        [
            ({"threshold": 1.5}, "cascade.threshold"),
            ({"method": "vibes"}, "cascade.method"),
            ({"tresh": 0.5}, "cascade.tresh: unknown field"),
            ({"logprob": {"tail_fraction": 0}}, "cascade.logprob.tail_fraction"),
            ({"logprob": {"aggregate": "median"}}, "cascade.logprob.aggregate"),
            ({"consistency": {"n": 1}}, "cascade.consistency.n"),
            ({"streaming": {"holdback_tokens": 0}}, "cascade.streaming.holdback_tokens"),
            ({"max_escalations": 0}, "cascade.max_escalations"),
        ],
    )
    def test_bounds_name_the_field(self, section, field):
        assert field in error(cascade=section)

    def test_tier_threshold_out_of_range(self):
        msg = error(cascade={"tier_thresholds": {"small": 2.0}})
        assert "cascade.tier_thresholds" in msg and "tier_thresholds[small] is 2.0" in msg

    def test_template_without_placeholders(self):
        msg = error(cascade={"verify": {"prompt_template": "Is {answer} right?"}})
        assert "cascade.verify.prompt_template" in msg and "{question}" in msg

    def test_overlapping_yes_no_tokens(self):
        msg = error(cascade={"verify": {"yes_tokens": ["Yes"], "no_tokens": [" yes", "no"]}})
        assert "cascade.verify" in msg and "overlap on ['yes']" in msg

    def test_blank_yes_token(self):
        assert "non-blank" in error(cascade={"verify": {"yes_tokens": [" "]}})

    def test_format_needs_exactly_one_validator(self):
        assert "exactly one of json_schema and regex" in error(cascade={"format": {}})
        assert "exactly one" in error(cascade={"format": {"regex": "a", "json_schema": {}}})

    def test_bad_regex_and_schema(self):
        msg = error(cascade={"format": {"regex": "(unclosed"}})
        assert "cascade.format" in msg and "'(unclosed' does not compile" in msg
        assert "not a valid JSON Schema" in error(cascade={"format": {"json_schema": {"type": "thing"}}})

    def test_unknown_tier_in_thresholds(self):
        with pytest.raises(ValueError, match=r"cascade.tier_thresholds names unknown tiers \['lrage'\]"):
            CascadeConfig(tier_thresholds={"lrage": 0.5}).check_tiers(["small", "large"])
        CascadeConfig(tier_thresholds={"large": 0.5}).check_tiers(["small", "large"])


class TestCapacityErrors:
    @pytest.mark.parametrize(
        ("section", "field"),
        [
            ({"poll_interval_s": 0}, "capacity.poll_interval_s"),
            ({"reject_status": 500}, "capacity.reject_status"),
            ({"hard_mode": "yolo"}, "capacity.hard_mode"),
            ({"spill_up": "some"}, "capacity.spill_up"),
            ({"defaults": {"max_inflight": 0}}, "capacity.defaults.max_inflight"),
            ({"tiers": {"small": {"max_kv_cache_usage": 1.2}}}, "capacity.tiers.small.max_kv_cache_usage"),
            ({"tiers": {"small": {"max_queue": 3}}}, "capacity.tiers.small.max_queue: unknown field"),
        ],
    )
    def test_bounds_name_the_field(self, section, field):
        assert field in error(capacity=section)

    def test_stale_bound_below_poll_interval(self):
        msg = error(capacity={"poll_interval_s": 2.0, "stats_max_age_s": 3.0})
        assert "stats_max_age_s (3.0) must be at least twice poll_interval_s (2.0)" in msg and "4.0" in msg

    def test_retry_after_order(self):
        msg = error(capacity={"retry_after_min_s": 5, "retry_after_default_s": 2})
        assert "retry_after_min_s (5) <= retry_after_default_s (2)" in msg

    def test_check_tiers_names_unknown_tier_and_serve_limit(self):
        with pytest.raises(ValueError, match=r"capacity.tiers names unknown tiers \['big'\]"):
            CapacityConfig(tiers={"big": {}}).check_tiers(["small", "large"])
        cfg = CapacityConfig(tiers={"small": {"max_inflight": 100}})
        with pytest.raises(ValueError, match=r"tier small \(100\) x 2 ingress replicas exceeds .* \(192\); lower"):
            cfg.check_tiers(["small"], serve_capacity={"small": 192}, ingress_replicas=2)
        cfg.check_tiers(["small"], serve_capacity={"small": 200}, ingress_replicas=2)
