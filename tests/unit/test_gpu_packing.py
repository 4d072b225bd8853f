"""GPU shares against the cluster's GPUs (`serving.config.gpus.pack_gpus`): the shipped GPU config fits one
GPU with the router in the leftover, what cannot fit is named with every GPU's shares, and the planner's shares
pack the way the placement check packs them."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from serving.config import parse_config
from serving.config.gpus import gpu_share_problems, pack_gpus

REPO = Path(__file__).resolve().parents[2]
GPU_YAML = yaml.safe_load((REPO / "deploy" / "gpu-7b-34b.yaml").read_text())


def node(address: str = "10.0.0.1", gpus: int = 1, alive: bool = True, **resources: float) -> dict:
    """A node as `ray.nodes()` lists it."""
    return {"NodeID": address.replace(".", ""), "NodeManagerAddress": address, "Alive": alive,
            "Resources": {"CPU": 16.0, "GPU": float(gpus), **resources}, "Labels": {}}  # fmt: skip


def gpu_config(**changes) -> dict:
    raw = copy.deepcopy(GPU_YAML)
    for tier in raw["tiers"]:  # fixed replica counts: what must be placed at start
        tier["deployment"].pop("autoscaling")
        tier["deployment"]["num_replicas"] = 1
    raw.update(changes)
    return raw


def test_the_shipped_config_fits_one_gpu_with_the_router_in_the_leftover() -> None:
    packing = pack_gpus(parse_config(gpu_config()), [node()])
    assert packing.problems == ()
    (gpu,) = packing.slots
    assert sorted((r.field, r.share) for r in gpu.holds) == [("router", 0.13), ("tiers[large]", 0.57), ("tiers[small]", 0.3)]
    assert gpu.used == pytest.approx(1.0, abs=1e-3)  # Ray takes 0.57 as 0.5699


def test_its_autoscaled_tiers_start_at_min_replicas() -> None:
    assert gpu_share_problems(parse_config(GPU_YAML), [node()]) == []


def test_a_third_tier_is_refused_naming_it_and_each_gpus_shares() -> None:
    raw = gpu_config()
    raw["tiers"].append({**copy.deepcopy(raw["tiers"][0]), "name": "medium", "served_model_name": None})
    (problem,) = gpu_share_problems(parse_config(raw), [node()])
    assert problem.startswith("tiers[")  # the smallest share is packed last; which tier misses depends on order
    assert "needs 0.3 of a GPU (num_gpus 0.3)" in problem
    assert "GPU 0 of 10.0.0.1 holds tiers[large] 0.57 + tiers[" in problem and "(0.13 free)" in problem
    assert "tierserve plan" in problem


def test_a_second_replica_is_refused_and_fits_on_a_second_gpu() -> None:
    raw = gpu_config()
    raw["tiers"][1]["deployment"]["num_replicas"] = 2
    (problem,) = gpu_share_problems(parse_config(raw), [node()])
    assert problem.startswith("tiers[large] replica 2 needs 0.57 of a GPU")
    packing = pack_gpus(parse_config(raw), [node(gpus=2)])
    assert packing.problems == ()
    assert len(packing.placed("tiers[large]")) == 2  # one replica on each GPU


def test_no_gpu_anywhere_and_dead_nodes() -> None:
    problems = gpu_share_problems(parse_config(gpu_config()), [node(gpus=0), node("10.0.0.2", alive=False)])
    assert [p.split(" needs ")[0] for p in problems] == ["tiers[large] replica 1", "tiers[small] replica 1",
                                                         "router replica 1"]  # fmt: skip
    assert all(p.endswith("no alive node has a GPU; run it where Ray sees GPUs (`ray start --num-gpus`).")
               for p in problems)  # fmt: skip


def test_whole_gpus_for_a_sharded_tier() -> None:
    raw = gpu_config()
    raw["tiers"][1]["engine"].update(tensor_parallel_size=2, gpu_memory_utilization=0.9)
    raw["tiers"][1]["resources"]["num_gpus"] = 2
    (problem,) = gpu_share_problems(parse_config(raw), [node(gpus=1), node("10.0.0.2", gpus=1)])
    assert "tiers[large] replica 1 needs 2 whole GPUs on one node" in problem  # two one-GPU nodes are not enough
    packing = pack_gpus(parse_config(raw), [node(gpus=3)])
    assert packing.problems == ()
    assert [s.index for s in packing.placed("tiers[large]")] == [0, 1]
    assert {r.field for s in packing.slots if s.index == 2 for r in s.holds} == {"tiers[small]", "router"}


def test_pinned_replicas_only_go_to_nodes_offering_the_resource() -> None:
    raw = gpu_config()
    raw["tiers"][0]["resources"]["custom"] = {"gpu_group": 0.01}
    assert "meets its custom resources" in gpu_share_problems(parse_config(raw), [node()])[0]
    assert gpu_share_problems(parse_config(raw), [node(gpu_group=1000)]) == []


def test_cpu_configs_take_no_gpu() -> None:
    raw = yaml.safe_load((REPO / "deploy" / "cpu.yaml").read_text())
    assert pack_gpus(parse_config(raw), [node(gpus=0)]).problems == ()


# ---- the planner and the placement agree ---------------------------------------------------------------------


@pytest.mark.parametrize("gpu", ["h100-80gb", "h200-141gb", "a100-80gb"])
def test_the_planners_shares_pack_on_the_gpus_it_counts(gpu: str) -> None:
    """What `tierserve plan` prints, merged into the config, is placed on exactly `gpus_needed` GPUs of one node."""
    import argparse

    from serving.cli.plan import build_requests, router_request
    from serving.plan.memory import GPU_TYPES, plan

    config = parse_config(gpu_config())
    args = argparse.Namespace(model=[], tp=None, context=None, concurrency=None, seq_len=None)
    requests, _ = build_requests(args, config)
    result = plan(requests, gpu_bytes=GPU_TYPES[gpu], router=router_request(config),
                  reserve=config.plan.reserve)  # fmt: skip
    raw = gpu_config()
    for tier in raw["tiers"]:
        tier["resources"]["num_gpus"] = result.tier(tier["name"]).num_gpus
        tier["engine"]["gpu_memory_utilization"] = result.tier(tier["name"]).gpu_memory_utilization
    raw["router"]["num_gpus"] = result.router.num_gpus
    packing = pack_gpus(parse_config(raw), [node(gpus=result.gpus_needed)])
    assert packing.problems == ()
    assert sum(1 for s in packing.slots if s.holds) == result.gpus_needed
    # Ray's shares are memory shares: each GPU's replicas hold no more memory than the GPU has.
    for slot in packing.slots:
        assert slot.used <= 1.0 + 1e-9
