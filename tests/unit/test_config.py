"""The one YAML config: shipped files load, and every bad field names itself, the value and the fix."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from router.errors import ConfigError
from serving.config import load_config, parse_config

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
        ("router.max_queue_wait_s", 5.0, "router.max_queue_wait_s (5.0) must be below ingress.router_timeout_s (2.0)"),
        ("router.max_queue_wait_s", 0, "router.max_queue_wait_s: Input should be greater than 0"),
        ("tiers.0.engine.cpu_threads_bind", "0,x", "tiers.0.engine.cpu_threads_bind: cpu list '0,x': 'x' is not a core"),
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


def test_removed_relative_cost_names_its_replacement() -> None:
    message = _error(_with("tiers.1.relative_cost", 5.0))
    assert "tiers.1: relative_cost was removed" in message
    assert "cost.output_tokens_per_s.<tier>" in message and "cost.usd_per_gpu_hour" in message


def test_cost_and_sessions_sections_default_off_the_price_and_on_the_sessions() -> None:
    config = parse_config(CPU)
    assert config.cost.usd_per_gpu_hour is None and config.cost.output_tokens_per_s == {}
    assert config.sessions.enabled and config.sessions.max_entries == 100_000


# ---- placement on a multi-node cluster (tiers[].resources, router.resources, ingress.resources) ----------


def _pinned() -> dict:
    cfg = copy.deepcopy(CPU)
    cfg["tiers"][0]["resources"]["custom"] = {"gpu_group": 0.01}
    cfg["tiers"][1]["resources"]["node_labels"] = {"tierserve/group": "in(gpu,gpu-spot)", "zone": "!us-east-1a"}
    cfg["router"]["resources"] = {"node_labels": {"tierserve/group": "cpu"}}
    cfg["ingress"]["resources"] = {"custom": {"cpu_group": 0.01}}
    return cfg


def test_placement_becomes_ray_actor_options_that_ray_accepts() -> None:
    from ray import serve

    from serving.app import _tier_deployment_options
    from serving.config.placement import actor_options

    config = parse_config(_pinned())
    small = _tier_deployment_options(config, config.tier("small"))["ray_actor_options"]
    large = _tier_deployment_options(config, config.tier("large"))["ray_actor_options"]
    assert small["resources"] == {"gpu_group": 0.01} and "label_selector" not in small
    assert large["label_selector"] == {"tierserve/group": "in(gpu,gpu-spot)", "zone": "!us-east-1a"}
    assert small["num_cpus"] == 0.8 and "resources" not in large
    for options in (small, large):  # the wire server on the replica's main loop, as the ingress's handler
        assert options["runtime_env"]["env_vars"]["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "0"
    assert actor_options(config.router.resources) == {"label_selector": {"tierserve/group": "cpu"}}
    assert actor_options(config.ingress.resources) == {"resources": {"cpu_group": 0.01}}
    assert config.ray.address is None and actor_options(parse_config(CPU).tier("small").resources) == {}

    class Replica:
        pass

    for options in (small, large):  # the installed Ray's own option checks
        serve.deployment(Replica).options(ray_actor_options=options)
    with pytest.raises(ValueError, match="label"):  # ...which do refuse a bad selector
        serve.deployment(Replica).options(ray_actor_options={"label_selector": {"-bad-": "x"}})


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("tiers.0.resources.custom", {"GPU": 1}, "'GPU' is a built-in Ray resource, not a custom one; use num_gpus instead."),
        ("tiers.0.resources.custom", {"memory": 1}, "'memory' is a built-in Ray resource, not a custom one; Ray sets it"),
        ("tiers.0.resources.custom", {"gpu group": 0.01}, "resource name 'gpu group' must be 1-128 letters"),
        ("tiers.0.resources.custom", {"gpu_group": 0}, "gpu_group: 0.0 is not a usable amount; use at least 0.0001"),
        ("tiers.0.resources.custom", {"gpu_group": 0.00001}, "gpu_group: 1e-05 is not a usable amount"),
        ("tiers.1.resources.node_labels", {"-group": "gpu"}, "label key '-group' is not a valid node label"),
        ("tiers.1.resources.node_labels", {"group": "gpu nodes"}, "group: 'gpu nodes' is not a label selector value"),
        ("tiers.1.resources.node_labels", {"group": "in()"}, "use a label value (e.g. gpu), `!value`, `in(a,b)`"),
        ("ingress.resources", {"nodes": "gpu"}, "ingress.resources.nodes: unknown field"),
        ("ingress.resources.custom", {"CPU": 1}, "ingress.resources.custom: Value error, 'CPU' is a built-in"),
        ("router.resources.node_labels", {"group": "!!cpu"}, "router.resources.node_labels"),
    ],
)
def test_bad_placement_names_field_value_and_fix(path: str, value: object, expected: str) -> None:
    message = _error(_with(path, value))
    expected = expected.replace("Value error, ", "")
    assert expected in message, message
    assert path.rsplit(".", 1)[0] in message  # the field is named


def test_router_placement_without_a_router_deployment_is_refused() -> None:
    cfg = _pinned()
    cfg["router"]["placement"] = "ingress"
    assert "router.resources is set but the router runs inside the ingress replicas" in _error(cfg)
    assert "set ingress.resources instead" in _error(cfg)
    cfg["router"]["placement"], cfg["router"]["default_router"] = "deployment", "cheapest"
    assert "router.resources is set but the router is not deployed (default_router 'cheapest')" in _error(cfg)


def test_placement_problems_name_the_deployments_no_node_can_host() -> None:
    from serving.launch import placement_problems

    config = parse_config(_pinned())
    head = {"Alive": True, "Resources": {"CPU": 2.0, "cpu_group": 100.0}, "Labels": {"tierserve/group": "cpu"}}
    gpu = {"Alive": True, "Resources": {"CPU": 2.0, "gpu_group": 100.0},
           "Labels": {"tierserve/group": "gpu", "zone": "us-east-1b"}}
    assert placement_problems(config, [head, gpu]) == []
    # This machine alone (a local cluster): both tiers are unplaceable, the router and ingress fit.
    assert placement_problems(config, [head]) == [
        "tiers[small].resources: no alive node of 1 offers resources {'gpu_group': 0.01}",
        ("tiers[large].resources: no alive node of 1 offers labels {'tierserve/group': 'in(gpu,gpu-spot)', "
         "'zone': '!us-east-1a'}"),
    ]
    # A dead node does not count; a node in the excluded zone does not match `!us-east-1a`.
    assert len(placement_problems(config, [head, gpu | {"Alive": False}])) == 2
    east = gpu | {"Labels": {"tierserve/group": "gpu-spot", "zone": "us-east-1a"}}
    assert placement_problems(config, [head, east]) == [
        ("tiers[large].resources: no alive node of 2 offers labels {'tierserve/group': 'in(gpu,gpu-spot)', "
         "'zone': '!us-east-1a'}")
    ]
    assert placement_problems(parse_config(CPU), [head]) == []  # unpinned: anywhere


def test_up_address_flag_joins_instead_of_starting(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from serving import launch
    from serving.cli import serve as cli_serve

    seen = {}
    monkeypatch.setattr(launch, "start", lambda config: seen.setdefault("config", config) and "http://x:1")
    monkeypatch.setattr(launch, "stop", lambda **kw: seen.setdefault("stop", kw))
    monkeypatch.setattr(cli_serve, "ensure_tiny_models", lambda config: seen.setdefault("tiny", True))
    monkeypatch.setattr(cli_serve.threading.Event, "wait", lambda self, timeout=None: True)
    parser = argparse.ArgumentParser()
    cli_serve.register(parser.add_subparsers())
    args = parser.parse_args(["up", "--config", str(REPO / "deploy" / "cpu.yaml"), "--address", "10.0.0.5:6379"])
    assert args.func(args) == 0
    assert seen["config"].ray.address == "10.0.0.5:6379"
    assert "tiny" not in seen  # the cluster's nodes hold their own models
    assert seen["stop"] == {"app_only": True}  # Ctrl-C removes the app, not the cluster's Serve
