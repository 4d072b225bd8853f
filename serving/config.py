"""The one YAML config: tiers, engines, Ray resources, HTTP, router, cascade and capacity.

Every field carries its bounds in the type and a docstring under it. `load_config(path)` turns any
problem into a `ConfigError` whose message names the field, the bad value and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from router.config import RouterConfig
from router.configbase import StrictModel
from router.errors import ConfigError
from router.placement import Placement
from serving.affinity import engine_cores
from serving.capacity.config import CapacityConfig
from serving.cascade.config import CascadeConfig
from serving.placement import ResourcesConfig
from serving.querylog import QueryLogConfig

DEFAULT_DATA_DIR = "~/.cache/tierserve"


def default_data_dir() -> Path:
    """TIERSERVE_DATA_DIR, else ~/.cache/tierserve."""
    return Path(os.environ.get("TIERSERVE_DATA_DIR") or DEFAULT_DATA_DIR).expanduser()


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
    cores whenever everything else saturates the others (`serving.affinity`, `serving.scheduler_side`)."""
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
    """Ray Serve autoscaling on ongoing requests per replica."""

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    target_ongoing_requests: float = Field(default=16.0, gt=0)
    """Average in-flight requests per replica the autoscaler aims for."""

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingConfig:
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
    """In-flight requests one replica accepts (set it at or above the engine's max_num_seqs)."""
    max_queued_requests: int = Field(default=128, ge=-1)
    """Requests waiting for a replica before Ray Serve rejects (-1: unbounded, not recommended)."""


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


class SessionsConfig(StrictModel):
    """Sticky tiers per conversation (`serving.ingress.sessions`); one map per ingress replica."""

    enabled: bool = True
    """Later turns of a conversation reuse the tier that answered it (an escalation moves the session)."""
    ttl_s: float = Field(default=1800.0, gt=0, le=7 * 86_400)
    """A session is forgotten this long after its last answered turn."""
    max_entries: int = Field(default=100_000, ge=1, le=10_000_000)
    """Sessions one ingress replica remembers (least recently used dropped first; ~200 bytes each)."""


class CostConfig(StrictModel):
    """What a self-hosted operator pays: GPU time. Reports show GPU-seconds per 1k output tokens per tier,
    `resources.num_gpus` x 1000 / measured output tokens/s, and dollars when a GPU-hour price is set.
    CPU tiers (num_gpus 0) have no GPU cost and are reported as "n/a (CPU)"."""

    usd_per_gpu_hour: float | None = Field(default=None, ge=0, le=1000)
    """Price of one GPU-hour (cloud rate or amortized hardware plus power); None: GPU-seconds only."""
    output_tokens_per_s: dict[str, Annotated[float, Field(gt=0)]] = {}
    """Measured output throughput of one replica per tier (`tierserve bench` prints it), e.g. {small: 2400}."""

    def check_tiers(self, names: list[str]) -> None:
        unknown = sorted(set(self.output_tokens_per_s) - set(names))
        if unknown:
            raise ValueError(f"cost.output_tokens_per_s names unknown tiers {unknown}; use tiers from {names}.")


class LimitsConfig(StrictModel):
    """Refused with a 400 (413 for the body) naming the field, before any engine work."""

    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    """Largest request body, in bytes."""
    max_messages: int = Field(default=1024, ge=1)
    """Most messages in one chat request."""
    max_tokens: int = Field(default=32768, ge=1)
    """Largest `max_tokens` / `max_completion_tokens` a request may ask for (the tier's context caps it too)."""
    max_stop: int = Field(default=16, ge=1)
    """Most stop strings in one request."""
    max_stop_chars: int = Field(default=512, ge=1)
    """Longest stop string, in characters."""


class HttpConfig(StrictModel):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    api_keys: list[str] = []
    """Bearer keys accepted on /v1/*. No key anywhere (config, env, file, admin keys) means no auth.
    TIERSERVE_API_KEYS (comma-separated) adds more; so does `api_keys_file`."""
    api_keys_file: str | None = None
    """A file of data-plane keys, one per line (e.g. a mounted Kubernetes Secret); read at start."""
    admin_keys: list[str] = []
    """Bearer keys for /admin/* (they work on /v1/* too); TIERSERVE_ADMIN_KEYS and `admin_keys_file` add
    more. A data-plane key on /admin/* gets 403; with data-plane keys but no admin key, /admin/* is closed."""
    admin_keys_file: str | None = None
    """A file of admin keys, one per line."""
    metrics_auth: bool = False
    """True: /metrics needs a key (data-plane or admin) like /v1/*. /health is always open."""
    limits: LimitsConfig = LimitsConfig()
    request_timeout_s: float = Field(default=300.0, gt=0)
    """Upper bound on one request end to end: past it a 504 (in-band for a stream) and the engine work stops."""
    proxy: bool = False
    """False: each ingress replica serves host:port itself (SO_REUSEPORT), with no hop between the HTTP
    server and the ingress, as bare vLLM's server. True: Ray Serve's HTTP proxy serves the port and forwards
    every request and streamed chunk to an ingress replica (one more process hop per chunk)."""
    keep_alive_s: float = Field(default=5.0, ge=1)
    """Idle keep-alive of client connections (direct serving)."""
    drain_s: float = Field(default=10.0, ge=0)
    """On shutdown, how long open requests may finish before they are cut (direct serving)."""


class IngressConfig(StrictModel):
    num_replicas: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=0.1, ge=0.0)
    max_ongoing_requests: int = Field(default=256, ge=1)
    router_timeout_s: float = Field(default=2.0, gt=0)
    """Longest wait for the router deployment; past it the ingress routes with the heuristic."""
    cpu_affinity: str | None = Field(default=None, pattern=r"^\d+(-\d+)?(,\d+(-\d+)?)*$")
    """CPU only: cores the ingress replicas run on, e.g. "1" or "2-3"; keep them off the busiest engine's
    `cpu_threads_bind` cores (tier replicas move off their own engine's cores by themselves)."""
    resources: Placement = Placement()
    """Where ingress replicas may run (`custom` resources, `node_labels`), e.g. on the CPU nodes. With
    `http.proxy: false` each replica serves `http.host:port` on its own node."""


class RayConfig(StrictModel):
    """The Ray cluster `tierserve up` runs on: a local one it starts, or an existing one (`address`)."""

    address: str | None = None
    """Existing cluster to join (e.g. "auto", "10.0.0.5:6379"; `tierserve up --address` overrides it):
    nothing is started locally and tiers go where their `resources.custom` / `node_labels` say. None starts
    a one-machine cluster. (`serve run`/`serve deploy` ignore it: they use their own address.)"""
    num_cpus: int | None = Field(default=None, ge=1)
    """Logical CPUs of a local cluster (None: the machine's cores); unused with `address`."""
    object_store_memory_bytes: int = Field(default=512 << 20, ge=75 << 20)
    """Object store of a local cluster; unused with `address`."""


class AppConfig(StrictModel):
    """The whole tierserve config."""

    data_dir: str = DEFAULT_DATA_DIR
    """Where generated models, the exemplar store and the query log live (TIERSERVE_DATA_DIR overrides)."""
    device: Literal["cpu", "gpu"] = "cpu"
    """Which vLLM build the engines run on."""
    tiers: list[TierConfig] = Field(min_length=1)
    http: HttpConfig = HttpConfig()
    ingress: IngressConfig = IngressConfig()
    ray: RayConfig = RayConfig()
    router: RouterConfig = RouterConfig()
    cascade: CascadeConfig = CascadeConfig()
    capacity: CapacityConfig = CapacityConfig()
    query_log: QueryLogConfig = QueryLogConfig()
    sessions: SessionsConfig = SessionsConfig()
    cost: CostConfig = CostConfig()

    @model_validator(mode="after")
    def _check_tiers(self) -> AppConfig:
        names = [t.name for t in self.tiers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"tier names must be unique; {dupes} appear more than once.")
        aliases = [t.served_model_name for t in self.tiers if t.served_model_name and t.served_model_name != t.name]
        clash = sorted({a for a in aliases if aliases.count(a) > 1 or a in names})
        if clash:
            raise ValueError(f"served_model_name {clash} clashes with another tier's name or alias; rename it.")
        if any(n == "auto" or n.startswith("router-") for n in names + aliases):
            raise ValueError(
                "tier names and served_model_name 'auto' and 'router-*' are reserved for routing; rename the tier."
            )
        for tier in self.tiers:
            engine = tier.engine
            if self.device == "cpu":
                if engine.kv_cache_memory_bytes is None:
                    raise ValueError(
                        f"tiers[{tier.name}].engine.kv_cache_memory_bytes is required on device 'cpu' "
                        "(vLLM's CPU backend otherwise claims most of RAM); e.g. 268435456 for 256 MiB."
                    )
                if tier.resources.num_gpus:
                    raise ValueError(f"tiers[{tier.name}].resources.num_gpus must be 0 on device 'cpu'.")
            elif tier.resources.num_gpus <= 0:
                raise ValueError(
                    f"tiers[{tier.name}].resources.num_gpus must be > 0 on device 'gpu' "
                    "(use a fraction such as 0.5 to share a GPU)."
                )
            elif tier.resources.num_gpus < 1 and engine.gpu_memory_utilization is None:
                raise ValueError(
                    f"tiers[{tier.name}].engine.gpu_memory_utilization is required when the tier shares a GPU "
                    f"(num_gpus {tier.resources.num_gpus} < 1): vLLM would otherwise claim 0.9 of it; "
                    f"e.g. set it to {tier.resources.num_gpus}."
                )
            elif engine.tensor_parallel_size > 1 and tier.resources.num_gpus != engine.tensor_parallel_size:
                raise ValueError(
                    f"tiers[{tier.name}].resources.num_gpus ({tier.resources.num_gpus}) must equal "
                    f"engine.tensor_parallel_size ({engine.tensor_parallel_size}): a sharded engine needs whole "
                    "GPUs (Ray cannot give one replica fractions of several GPUs)."
                )
            elif tier.resources.num_gpus > 1 and engine.tensor_parallel_size == 1:
                raise ValueError(
                    f"tiers[{tier.name}].resources.num_gpus ({tier.resources.num_gpus}) > 1 with "
                    "tensor_parallel_size 1 would reserve GPUs the engine never uses; set "
                    "tensor_parallel_size to the GPU count or num_gpus to at most 1."
                )
        if self.router.placement == "ingress" and self.ingress.num_replicas > 1 and self.router.store.url is None:
            raise ValueError(
                f"router.placement 'ingress' with ingress.num_replicas ({self.ingress.num_replicas}) > 1 needs a "
                "Qdrant server (router.store.url): embedded Qdrant allows one process per folder. Set store.url, "
                "use one ingress replica, or router.placement 'deployment'."
            )
        self.cascade.check_tiers(names)
        self.cost.check_tiers(names)
        self.capacity.check_tiers(
            names, serve_capacity=self._serve_capacity(), ingress_replicas=self.ingress.num_replicas
        )
        return self

    @model_validator(mode="after")
    def _check_placement(self) -> AppConfig:
        router = self.router
        if router.resources.pinned and (router.placement == "ingress" or router.default_router == "cheapest"):
            where = ("runs inside the ingress replicas (router.placement 'ingress')" if router.placement == "ingress"
                     else "is not deployed (default_router 'cheapest')")
            raise ValueError(
                f"router.resources is set but the router {where}; set ingress.resources instead, or remove it."
            )
        wait = router.max_queue_wait_s
        if wait is not None and wait >= self.ingress.router_timeout_s:
            raise ValueError(
                f"router.max_queue_wait_s ({wait}) must be below ingress.router_timeout_s "
                f"({self.ingress.router_timeout_s}): the ingress stops waiting first, so a busy router would never "
                "answer with its heuristic at once. Lower it (e.g. 0.25), or set it to null to queue up to the timeout."
            )
        return self

    def _serve_capacity(self) -> dict[str, int]:
        """Requests Ray Serve holds per tier before it rejects (omits unbounded queues)."""
        result = {}
        for t in self.tiers:
            d = t.deployment
            if d.max_queued_requests < 0:
                continue
            # Autoscaled tiers may run at min_replicas: admission must fit what is there for sure.
            replicas = max(1, d.autoscaling.min_replicas) if d.autoscaling else d.num_replicas
            result[t.name] = replicas * d.max_ongoing_requests + d.max_queued_requests
        return result

    def tier(self, name: str) -> TierConfig:
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def tier_names(self) -> list[str]:
        return [t.name for t in self.tiers]

    def resolved_data_dir(self) -> Path:
        return Path(os.environ.get("TIERSERVE_DATA_DIR") or self.data_dir).expanduser()

    def model_path(self, tier: TierConfig) -> Path:
        path = Path(tier.model).expanduser()
        return path if path.is_absolute() else self.resolved_data_dir() / path

    def api_keys(self) -> set[str]:
        """Data-plane keys: config, TIERSERVE_API_KEYS, `http.api_keys_file`."""
        return _keys(self.http.api_keys, "TIERSERVE_API_KEYS", self.http.api_keys_file, "http.api_keys_file")

    def admin_keys(self) -> set[str]:
        """Admin keys: config, TIERSERVE_ADMIN_KEYS, `http.admin_keys_file`."""
        return _keys(self.http.admin_keys, "TIERSERVE_ADMIN_KEYS", self.http.admin_keys_file, "http.admin_keys_file")


def _keys(listed: list[str], env_var: str, file: str | None, field: str) -> set[str]:
    keys = {k.strip() for k in listed if k.strip()}
    keys |= {k.strip() for k in os.environ.get(env_var, "").split(",") if k.strip()}
    if file:
        path = Path(file).expanduser()
        try:
            keys |= {line.strip() for line in path.read_text().splitlines() if line.strip()}
        except OSError as exc:
            raise ConfigError(f"{field}: cannot read {path} ({exc.strerror}); mount the key file there or unset {field}.") from None
    return keys


def _format_error(err: dict) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown field; remove it or check its spelling."
    if err["type"] == "missing":
        return f"{loc}: required field is missing; add it."
    value = err.get("input")
    shown = "" if isinstance(value, dict | list) else f" (got {value!r})"
    return f"{loc}: {msg}{shown}"


def parse_config(data: dict, source: str = "<config>") -> AppConfig:
    """Validate a config mapping; raise ConfigError listing every problem by field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of fields, got {type(data).__name__}.")
    try:
        return AppConfig.model_validate(data)
    except ValidationError as exc:
        lines = [_format_error(e) for e in exc.errors()]
        raise ConfigError(f"{source}: invalid config:\n  " + "\n  ".join(lines)) from None


def load_config(path: str | os.PathLike) -> AppConfig:
    """Load and validate one YAML config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; pass --config with an existing YAML file.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(data or {}, str(path))
