"""Router config: defaults, bounds and cross-field errors as a user sees them through load_config."""

from __future__ import annotations

import pytest

from router.config import RouterConfig, resolve_thresholds
from router.errors import ConfigError
from serving.config import parse_config

TIERS = [
    {"name": "small", "model": "m", "engine": {"kv_cache_memory_bytes": 1 << 28}},
    {"name": "large", "model": "l", "engine": {"kv_cache_memory_bytes": 1 << 28}},
]


def config(router: dict | None = None):
    data = {"tiers": TIERS}
    if router is not None:
        data["router"] = router
    return parse_config(data, "test.yaml")


def test_config_without_router_section_routes_knn_with_bundled_minilm():
    cfg = config()
    assert cfg.router.default_router == "knn"
    assert cfg.router.embedder.kind == "minilm" and cfg.router.embedder.model_path is None
    assert cfg.router.embedder.resolved_pooling == "mean"
    assert cfg.router.store.path is None and cfg.router.store.url is None
    assert cfg.router.thresholds_for(len(cfg.tiers)) == (0.5,)


def test_empty_thresholds_are_evenly_spaced_for_three_tiers():
    assert resolve_thresholds([], 3) == pytest.approx((1 / 3, 2 / 3))


def test_threshold_count_must_match_tiers():
    cfg = RouterConfig(thresholds=[0.3, 0.6])
    assert cfg.thresholds_for(3) == (0.3, 0.6)
    with pytest.raises(ValueError, match=r"2 values .* 2 tiers need 1"):
        cfg.thresholds_for(2)


def test_thresholds_must_ascend():
    with pytest.raises(ConfigError, match=r"router: thresholds \(\[0.7, 0.3\]\) must be strictly ascending"):
        config({"thresholds": [0.7, 0.3]})


def test_threshold_out_of_range_names_the_field():
    with pytest.raises(ConfigError, match=r"router\.thresholds\.0: .*less than or equal to 1"):
        config({"thresholds": [1.5]})


def test_bge_m3_needs_a_model_path():
    with pytest.raises(ConfigError, match="embedder.model_path is required when embedder.kind is 'bge-m3'"):
        config({"embedder": {"kind": "bge-m3"}})
    cfg = config({"embedder": {"kind": "bge-m3", "model_path": "/models/bge-m3"}})
    assert cfg.router.embedder.resolved_pooling == "cls"


def test_store_path_and_url_are_exclusive_and_api_key_needs_url():
    with pytest.raises(ConfigError, match="store.path .* and store.url .* are exclusive"):
        config({"store": {"path": "/tmp/q", "url": "http://qdrant:6333"}})
    with pytest.raises(ConfigError, match="api_key only applies to a Qdrant server"):
        config({"store": {"api_key": "secret"}})


def test_several_replicas_need_a_qdrant_server():
    with pytest.raises(ConfigError, match=r"num_replicas \(2\) > 1 needs a Qdrant server"):
        config({"num_replicas": 2})
    assert config({"num_replicas": 2, "store": {"url": "http://qdrant:6333"}}).router.num_replicas == 2


def test_unknown_fields_and_bad_enums_are_rejected():
    with pytest.raises(ConfigError, match="router.knn.kk: unknown field"):
        config({"knn": {"kk": 3}})
    with pytest.raises(ConfigError, match="router.knn.weighting"):
        config({"knn": {"weighting": "cosine"}})
    with pytest.raises(ConfigError, match="router.default_router"):
        config({"default_router": "bert"})


def test_bounds_are_enforced():
    with pytest.raises(ConfigError, match="router.knn.k"):
        config({"knn": {"k": 0}})
    with pytest.raises(ConfigError, match="router.embedder.num_threads"):
        config({"embedder": {"num_threads": 0}})


def test_heuristic_length_window_must_be_ordered_and_rule_names_unique():
    with pytest.raises(ConfigError, match=r"short_chars \(500\) must be less than heuristic.long_chars \(400\)"):
        config({"heuristic": {"short_chars": 500, "long_chars": 400}})
    rule = {"name": "x", "patterns": ["a"], "weight": 0.1}
    with pytest.raises(ConfigError, match=r"\['x'\] appear more than once"):
        config({"heuristic": {"rules": [rule, rule]}})
