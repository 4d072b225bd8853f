"""deploy/gpu-7b-34b.yaml: it loads, and its GPU memory arithmetic holds on the smallest target GPU."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from serving.config import AppConfig, load_config

REPO = Path(__file__).resolve().parents[2]
GPU_CONFIG = REPO / "deploy" / "gpu-7b-34b.yaml"

GIB = 1 << 30
H100_80GB_BYTES = 81559 * (1 << 20)  # what CUDA reports for an H100 80 GB
MAX_TOTAL_SHARE = 0.9  # the rest is CUDA contexts and allocator slack


@dataclass(frozen=True)
class ModelFootprint:
    """What a model needs on the GPU besides its KV cache."""

    weights_bytes: int
    overhead_bytes: int
    """Peak activations at max_num_batched_tokens plus CUDA graphs."""
    kv_bytes_per_token: int
    """2 (K, V) x layers x kv_heads x head_dim x 2 bytes."""


FOOTPRINTS = {
    "/models/Qwen2.5-7B-Instruct": ModelFootprint(
        weights_bytes=int(14.2 * GIB), overhead_bytes=int(2.2 * GIB), kv_bytes_per_token=2 * 28 * 4 * 128 * 2
    ),
    "/models/Qwen2.5-32B-Instruct-AWQ": ModelFootprint(
        weights_bytes=int(18.1 * GIB), overhead_bytes=int(3.2 * GIB), kv_bytes_per_token=2 * 64 * 8 * 128 * 2
    ),
}


@pytest.fixture(scope="module")
def config() -> AppConfig:
    return load_config(GPU_CONFIG)


def test_loads_as_a_gpu_config_with_two_tiers(config: AppConfig) -> None:
    assert config.device == "gpu"
    assert config.tier_names == ["small", "large"]
    assert all(t.model in FOOTPRINTS for t in config.tiers)


def test_shares_of_one_gpu_leave_headroom(config: AppConfig) -> None:
    shares = [t.engine.gpu_memory_utilization for t in config.tiers]
    assert None not in shares
    assert sum(shares) <= MAX_TOTAL_SHARE
    # Ray packs replicas by num_gpus; equal to the memory share, it can never oversubscribe a GPU's memory.
    for tier in config.tiers:
        assert tier.resources.num_gpus == tier.engine.gpu_memory_utilization, tier.name
        assert tier.engine.tensor_parallel_size == 1, tier.name


@pytest.mark.parametrize("tier_name", ["small", "large"])
def test_each_tier_fits_its_share_of_an_h100(config: AppConfig, tier_name: str) -> None:
    tier = config.tier(tier_name)
    fp = FOOTPRINTS[tier.model]
    engine = tier.engine
    budget = engine.gpu_memory_utilization * H100_80GB_BYTES
    kv = engine.kv_cache_memory_bytes
    assert kv is not None, "set kv_cache_memory_bytes: engines sharing a GPU must not size it by profiling"
    assert fp.weights_bytes + fp.overhead_bytes + kv <= budget
    kv_tokens = kv // fp.kv_bytes_per_token
    assert kv_tokens >= engine.max_model_len, "one full-length request must fit in the KV cache"
    # At ~1k tokens per sequence the batch width must be backed by KV blocks, not just allowed.
    assert engine.max_num_seqs * 1024 <= kv_tokens


def test_replicas_accept_a_full_batch(config: AppConfig) -> None:
    for tier in config.tiers:
        assert tier.deployment.max_ongoing_requests >= tier.engine.max_num_seqs, tier.name
        scaling = tier.deployment.autoscaling
        assert scaling is not None and scaling.target_ongoing_requests < tier.engine.max_num_seqs, tier.name


def test_cpu_lists_parse_and_name_a_bad_part() -> None:
    import pytest

    from serving.config.cores import parse_cpus

    assert parse_cpus("0-3,6") == {0, 1, 2, 3, 6} and parse_cpus("1") == {1}
    with pytest.raises(ValueError, match="'x'"):
        parse_cpus("0,x")
