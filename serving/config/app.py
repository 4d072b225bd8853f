"""The whole config (`AppConfig`), its smaller sections, and loading it from YAML with errors that name the field."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from router.config import RouterConfig
from router.configbase import StrictModel
from router.errors import ConfigError
from serving.capacity.config import CapacityConfig
from serving.cascade.config import CascadeConfig
from serving.config.http import HttpConfig, IngressConfig, RayConfig
from serving.config.plan import PlanConfig
from serving.config.tier import (
    TierConfig,
)
from serving.querylog import QueryLogConfig

DEFAULT_DATA_DIR = "~/.cache/tierserve"


def default_data_dir() -> Path:
    """TIERSERVE_DATA_DIR, else ~/.cache/tierserve."""
    return Path(os.environ.get("TIERSERVE_DATA_DIR") or DEFAULT_DATA_DIR).expanduser()


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
    plan: PlanConfig | None = None
    """What the GPU numbers were planned for (`tierserve plan --config FILE` reads it); None: not planned."""

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
        if self.plan is not None:
            self.plan.check_tiers({t.name: t.engine.max_model_len for t in self.tiers})
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
