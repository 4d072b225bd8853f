"""Shared-GPU placement through Ray's real scheduler, on a CPU node that declares one logical GPU.

deploy/gpu-7b-34b.yaml's tiers run on the scripted engine (no model, no CUDA): Ray places the small tier (0.30),
the large tier (0.57) and the router deployment (the 0.13 the tiers leave) on the one GPU, as
`serving.config.gpus.pack_gpus` predicts from the same nodes. The router's embedder cannot run CUDA here,
so it runs the bundled MiniLM on CPU inside its GPU share: the share is what this test is about.
What does not fit is refused at `tierserve up` naming the replica and the shares.
"""

from __future__ import annotations

import copy
import socket
from pathlib import Path

import pytest
import yaml

from router.config import EmbedderConfig
from serving import launch
from serving.config import AppConfig, parse_config
from serving.config.gpus import gpu_share_problems, pack_gpus
from serving.engines.scripted import ScriptedEngine

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpu_config(data_dir: Path, **tier_changes: dict) -> dict:
    """deploy/gpu-7b-34b.yaml on this machine: loopback HTTP, a temp data dir, one replica per tier."""
    raw = yaml.safe_load((REPO / "deploy" / "gpu-7b-34b.yaml").read_text())
    raw["data_dir"] = str(data_dir)
    raw["http"] = {"host": "127.0.0.1", "port": _free_port()}
    raw["query_log"] = {"enabled": False}
    for tier in raw["tiers"]:
        tier["deployment"].pop("autoscaling")
        tier["deployment"]["num_replicas"] = 1
        tier["resources"]["num_cpus"] = 0.5  # logical CPUs; this machine has 2
        tier["deployment"].update(tier_changes.get(tier["name"], {}))
    raw["ingress"]["num_cpus"] = 0.1
    return raw


def on_this_machine(raw: dict) -> AppConfig:
    """The config with the router's embedder swapped for the bundled MiniLM on CPU (no CUDA here; the config
    refuses a GPU share without a cuda device, so the swap skips validation on purpose)."""
    config = parse_config(raw, "gpu-7b-34b on logical GPUs")
    router = config.router.model_copy(update={"embedder": EmbedderConfig(), "num_cpus": 0.1})
    return config.model_copy(update={"router": router})


def _replicas() -> dict[str, dict]:
    """Ray's state API: each alive Serve replica of the app -> its node, its resources and its GPU ids."""
    import ray
    from ray.util.state import list_actors

    found = {}
    for actor in list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=1000):
        if not actor.class_name.startswith(f"ServeReplica:{launch.APP_NAME}:"):
            continue
        deployment = actor.class_name.rsplit(":", 1)[1]
        handle = ray.get_actor(actor.name, namespace="serve")
        gpu_ids = ray.get(handle.__ray_call__.remote(lambda _self: ray.get_gpu_ids()), timeout=30)
        found[deployment] = {"node_id": actor.node_id, "gpu_ids": gpu_ids, "resources": actor.required_resources}
    return found


@pytest.fixture
def one_logical_gpu() -> None:
    import ray

    launch.start_local_cluster(lambda: ray.init(num_cpus=4, num_gpus=1, include_dashboard=True,
                                                _node_ip_address="127.0.0.1", object_store_memory=256 << 20))
    try:
        yield
    finally:
        launch.stop()  # the app, Serve and this cluster


def test_both_tiers_and_the_router_share_the_one_gpu(one_logical_gpu: None, tmp_path: Path) -> None:
    import ray

    config = on_this_machine(gpu_config(tmp_path))
    predicted = pack_gpus(config, ray.nodes())
    assert predicted.problems == ()
    launch.start(config, wait_s=240, engine_cls=ScriptedEngine)
    replicas = _replicas()
    print("\nRay placed:", yaml.safe_dump(replicas, sort_keys=True))
    (node_id,) = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    shares = {"tier-small": 0.30, "tier-large": 0.57, "router": 0.13}
    for deployment, share in shares.items():
        placed = replicas[deployment]
        assert placed["node_id"] == node_id, deployment
        assert placed["resources"]["GPU"] == pytest.approx(share, abs=1e-4), deployment  # Ray truncates 0.57 to 0.5699
        assert placed["gpu_ids"] == [0], deployment  # Ray's own assignment: the same, only GPU
    assert "GPU" not in (replicas["ingress"]["resources"] or {})
    # Where the placement check put each replica is where Ray put it.
    (slot,) = [s for s in predicted.slots if s.holds]
    assert (slot.index, sorted(r.field for r in slot.holds)) == (0, ["router", "tiers[large]", "tiers[small]"])
    assert ray.available_resources().get("GPU", 0.0) == pytest.approx(0.0, abs=1e-4)
    # A third tier would not fit on these nodes: named with the GPU's shares before anything is deployed.
    raw = gpu_config(tmp_path)
    raw["tiers"].insert(1, {**copy.deepcopy(raw["tiers"][0]), "name": "medium", "served_model_name": "qwen-medium"})
    (problem,) = gpu_share_problems(on_this_machine(raw), ray.nodes())
    (address,) = [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]]
    assert "needs 0.3 of a GPU" in problem and f"GPU 0 of {address} holds tiers[large] 0.57 + tiers[" in problem


def test_tierserve_up_refuses_a_placement_the_gpus_cannot_hold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`tierserve up` (a local cluster started by launch.start) on a node whose GPUs cannot hold the shares:
    a StartupError naming each replica and its share, not a deployment pending forever."""
    import ray

    assert not ray.is_initialized()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # whatever this machine has, Ray sees no GPU here
    raw = gpu_config(tmp_path, large={"num_replicas": 2})
    with pytest.raises(launch.StartupError) as exc:
        launch.start(on_this_machine(raw), wait_s=60, engine_cls=ScriptedEngine)
    message = str(exc.value)
    assert "tiers[large] replica 2 needs 0.57 of a GPU" in message and "tiers[small] replica 1 needs 0.3" in message
    assert "router replica 1 needs 0.13 of a GPU" in message
    assert not ray.is_initialized()  # the cluster it started is gone again
