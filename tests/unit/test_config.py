"""The one YAML config: shipped files load, and every bad field names itself, the value and the fix."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from serving.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]
CPU = yaml.safe_load((REPO / "deploy" / "cpu.yaml").read_text())


def _with(path: str, value: object) -> dict:
    """deploy/cpu.yaml with one field replaced; `path` is dotted, list indexes as numbers."""
    cfg = copy.deepcopy(CPU)
    node = cfg
    *parents, leaf = path.split(".")
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        node[int(leaf)] = value
    else:
        node[leaf] = value
    return cfg


def _error(cfg: dict) -> str:
    with pytest.raises(ConfigError) as exc:
        parse_config(cfg, "test.yaml")
    return str(exc.value)


@pytest.mark.parametrize("name", ["cpu.yaml", "gpu-7b-34b.yaml"])
def test_shipped_configs_load(name: str) -> None:
    config = load_config(REPO / "deploy" / name)
    assert [t.name for t in config.tiers] == ["small", "large"]


def test_cpu_config_values_and_defaults() -> None:
    config = load_config(REPO / "deploy" / "cpu.yaml")
    small = config.tier("small")
    assert small.engine.kv_cache_memory_bytes == 256 << 20
    assert small.engine.cpu_threads_bind == "0" and config.tier("large").engine.cpu_threads_bind == "1"
    assert config.http.port == 8000 and config.router.default_router == "knn"
    assert config.cascade.enabled is False and config.cascade.threshold == 0.80


def test_serve_config_points_at_the_builder() -> None:
    serve_cfg = yaml.safe_load((REPO / "deploy" / "serve-cpu.yaml").read_text())
    app = serve_cfg["applications"][0]
    assert app["import_path"] == "serving.app:app_builder"
    assert load_config(REPO / app["args"]["config"]).tier_names == ["small", "large"]


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("tiers.0.engine.max_num_seqs", 0, "tiers.0.engine.max_num_seqs: Input should be greater than or equal to 1 (got 0)"),
        ("tiers.0.engine.dtype", "fp8", "tiers.0.engine.dtype"),
        ("tiers.0.engine.gpu_memory_utilization", 1.5, "(got 1.5)"),
        ("tiers.0.engine.kv_cache_memory_bytes", None, "kv_cache_memory_bytes is required on device 'cpu'"),
        ("tiers.0.name", "Small Tier", "tiers.0.name: String should match pattern"),
        ("tiers.1.name", "small", "tier names must be unique; ['small']"),
        ("tiers.1.name", "auto", "reserved for routing"),
        ("tiers.0.resources.num_gpus", 0.5, "tiers[small].resources.num_gpus must be 0 on device 'cpu'"),
        ("tiers.0.deployment.autoscaling", {"min_replicas": 3, "max_replicas": 2},
         "min_replicas (3) cannot be greater than max_replicas (2)"),
        ("http.port", 70000, "http.port: Input should be less than or equal to 65535 (got 70000)"),
        ("http.colour", "blue", "http.colour: unknown field; remove it or check its spelling."),
        ("device", "tpu", "device: Input should be 'cpu' or 'gpu'"),
        ("tiers", [], "tiers: List should have at least 1 item"),
    ],
)
def test_bad_field_names_field_value_and_fix(path: str, value: object, expected: str) -> None:
    message = _error(_with(path, value))
    assert message.startswith("test.yaml: invalid config")
    assert expected in message


def test_missing_required_field() -> None:
    cfg = copy.deepcopy(CPU)
    del cfg["tiers"][0]["model"]
    assert "tiers.0.model: required field is missing; add it." in _error(cfg)


def test_gpu_tier_needs_a_gpu_share() -> None:
    cfg = _with("device", "gpu")
    assert "num_gpus must be > 0 on device 'gpu'" in _error(cfg)


def test_tensor_parallel_needs_whole_gpus() -> None:
    cfg = yaml.safe_load((REPO / "deploy" / "gpu-7b-34b.yaml").read_text())
    cfg["tiers"][1]["engine"]["tensor_parallel_size"] = 2
    assert "must equal engine.tensor_parallel_size (2)" in _error(cfg)
    cfg["tiers"][1]["resources"]["num_gpus"] = 2
    cfg["tiers"][1]["engine"]["gpu_memory_utilization"] = 0.9
    assert parse_config(cfg).tier("large").resources.num_gpus == 2
    cfg["tiers"][1]["engine"]["tensor_parallel_size"] = 1
    assert "would reserve GPUs the engine never uses" in _error(cfg)


def test_every_problem_is_listed_at_once() -> None:
    cfg = _with("http.port", 0)
    cfg["tiers"][1]["engine"]["max_model_len"] = 1
    message = _error(cfg)
    assert "http.port" in message and "tiers.1.engine.max_model_len" in message


def test_capacity_limit_beyond_ray_serve_capacity_is_refused() -> None:
    cfg = _with("capacity", {"defaults": {"max_inflight": 1000}})
    assert "exceeds its Ray Serve capacity" in _error(cfg)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiers: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_relative_model_paths_resolve_against_the_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TIERSERVE_DATA_DIR", str(tmp_path))
    config = parse_config(CPU)
    assert config.model_path(config.tier("small")) == tmp_path / "models" / "tiny-small"
    monkeypatch.setenv("TIERSERVE_API_KEYS", "k1, k2")
    assert config.api_keys() == {"k1", "k2"}


def test_app_builder_builds_the_whole_graph() -> None:
    from ray.serve import Application

    from serving.app import app_builder

    app = app_builder({"config": str(REPO / "deploy" / "cpu.yaml")})
    assert isinstance(app, Application)
    with pytest.raises(ValueError, match="args.config"):
        app_builder({})


def test_engine_step_budget_covers_every_sequence() -> None:
    cfg = _with("tiers.0.engine.max_num_batched_tokens", 16)
    assert "max_num_batched_tokens (16) must be at least max_num_seqs (32)" in _error(cfg)


@pytest.mark.parametrize("alias", ["auto", "router-x", "large"])
def test_served_model_name_cannot_shadow_routing_or_tiers(alias: str) -> None:
    message = _error(_with("tiers.0.served_model_name", alias))
    assert "reserved for routing" in message or "clashes" in message


def test_shared_gpu_needs_an_explicit_memory_share() -> None:
    cfg = yaml.safe_load((REPO / "deploy" / "gpu-7b-34b.yaml").read_text())
    del cfg["tiers"][0]["engine"]["gpu_memory_utilization"]
    assert "gpu_memory_utilization is required when the tier shares a GPU" in _error(cfg)
