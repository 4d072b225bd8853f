"""One tier's settings: its model, the vLLM engine (continuous batching, KV cache), Ray resources and replicas."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from router.configbase import StrictModel
from serving.config.cores import engine_cores
from serving.config.placement import ResourcesConfig


class EngineConfig(StrictModel):
    """vLLM engine settings for one tier: continuous batching and the KV cache."""

    max_num_seqs: int = Field(default=32, ge=1, le=4096)
    """Maximum number of sequences batched in one engine step (continuous batching width)."""
    max_num_batched_tokens: int = Field(default=2048, ge=16)
    """Token budget of one engine step (prefill chunks plus decodes)."""
    max_model_len: int = Field(default=512, ge=16)
    """Context length: prompt plus completion tokens. Longer prompts get a 400."""
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """Weight and activation dtype."""
    tensor_parallel_size: int = Field(default=1, ge=1, le=64)
    """GPUs one replica shards the model over (1 on CPU)."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of shared prompt prefixes (system prompts, few-shot headers)."""
    gpu_memory_utilization: float | None = Field(default=None, gt=0.0, le=1.0)
    """GPU only: share of each GPU's memory this engine may take (weights + KV cache).
    Tiers sharing a GPU must add up to at most 1."""
    kv_cache_memory_bytes: int | None = Field(default=None, ge=1 << 20)
    """KV-cache size in bytes. Required on CPU (else vLLM asks for most of RAM); optional on GPU."""
    enforce_eager: bool = False
    """Skip CUDA graphs / torch.compile: faster start, slower steps. True keeps CPU start at ~20 s."""
    cpu_threads_bind: str | None = None
    """CPU only: cores for this engine's OpenMP threads (VLLM_CPU_OMP_THREADS_BIND), e.g. "0" or "0-3", "0-3|4-7"
    with one group per tensor-parallel rank, or vLLM's "auto" / "nobind". The tier replica moves off these cores
    and vLLM's scheduler process goes with it; where no core is free of every engine, it moves to the first rank's
    cores whenever everything else saturates the others (`serving.cpu.affinity`, `serving.cpu.scheduler_side`)."""
    seed: int = 0
    """Engine RNG seed."""
    vllm_metrics: bool = False
    """Also record vLLM's own engine metrics (`vllm:*`: iterations, KV cache, preemptions, prefix-cache hits,
    per-request latencies) through Ray's metrics agent, scraped at each node's Ray metrics port. Off by default:
    vLLM observes histograms for every token (measured: the largest per-token cost in the tier replica)."""

    @field_validator("cpu_threads_bind")
    @classmethod
    def _bind_parses(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                engine_cores(value)
            except ValueError as exc:
                raise ValueError(f'{exc}; use cores like "0" or "0-3", "0-3|4-7" for tensor-parallel ranks, '
                                 f'or "auto"') from None
        return value

    @model_validator(mode="after")
    def _batch_fits_sequences(self) -> EngineConfig:
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least max_num_seqs "
                f"({self.max_num_seqs}): every running sequence needs a token per step; raise it or lower max_num_seqs."
            )
        return self


class AutoscalingConfig(StrictModel):
    """Ray Serve's autoscaler on the requests each tier replica reports it holds (`serving.channel.autoscale`):
    enough replicas to hold them at `target_ongoing_requests` each, within the bounds, after the delays."""

    min_replicas: int = Field(default=1, ge=0)
    """Fewest replicas (at least 1: the data plane has no queue to hold requests while a model loads)."""
    max_replicas: int = Field(default=1, ge=1)
    target_ongoing_requests: float = Field(default=16.0, gt=0)
    """Average in-flight requests per replica the autoscaler aims for (e.g. the engine's max_num_seqs / 2)."""
    upscale_delay_s: float = Field(default=15.0, ge=0)
    """How long the load must call for more replicas before one is added."""
    downscale_delay_s: float = Field(default=300.0, ge=0)
    """How long the load must call for fewer replicas before one is removed."""
    metrics_interval_s: float = Field(default=2.0, gt=0, le=60)
    """How often each replica reports its requests to Serve's controller."""
    look_back_period_s: float = Field(default=10.0, gt=0, le=600)
    """Window the reports are averaged over."""

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingConfig:
        if self.min_replicas < 1:
            raise ValueError(
                "min_replicas 0 (scale to zero) is not supported for a tier: requests reach replicas over their data "
                "ports, with no queue to wait in for the minutes a replica takes to load its model; use 1 or more."
            )
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) cannot be greater than max_replicas ({self.max_replicas})."
            )
        return self


class DeploymentConfig(StrictModel):
    """Ray Serve deployment settings of one tier."""

    num_replicas: int = Field(default=1, ge=1)
    """Fixed replica count; ignored when `autoscaling` is set."""
    autoscaling: AutoscalingConfig | None = None
    max_ongoing_requests: int = Field(default=64, ge=1)
    """Requests one replica runs at once (set it at or above the engine's max_num_seqs; the rest wait in the
    engine's queue). The autoscaler's `target_ongoing_requests` is measured against the same count."""
    max_queued_requests: int = Field(default=192, ge=-1)
    """Requests one replica holds beyond `max_ongoing_requests` before it refuses more with 503 and Retry-After
    (-1: unbounded, not recommended). The ingress's admission limit (`capacity`) normally answers first."""


class TierConfig(StrictModel):
    """One model tier. Tiers are listed cheapest first."""

    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]
    """Tier name; clients may pass it as `model`."""
    model: str
    """Path to a Hugging Face model directory. Relative paths resolve against `data_dir`."""
    served_model_name: str | None = None
    """Name reported in responses; defaults to the tier name."""
    engine: EngineConfig = EngineConfig()
    resources: ResourcesConfig = ResourcesConfig()
    deployment: DeploymentConfig = DeploymentConfig()

    @model_validator(mode="before")
    @classmethod
    def _removed_fields(cls, data: object) -> object:
        if isinstance(data, dict) and "relative_cost" in data:
            raise ValueError(
                "relative_cost was removed: cost is now GPU-seconds per 1k output tokens, from the tier's "
                "resources.num_gpus and its measured throughput; delete relative_cost and set "
                "cost.output_tokens_per_s.<tier> (`tierserve bench` measures it) and cost.usd_per_gpu_hour."
            )
        return data
