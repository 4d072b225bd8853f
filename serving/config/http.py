"""The HTTP edge (keys, limits, timeouts), the ingress replicas and the Ray cluster `tierserve up` runs on."""

from __future__ import annotations

from pydantic import Field, model_validator

from router.configbase import StrictModel
from router.placement import Placement


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
    keep_alive_s: float = Field(default=5.0, ge=1)
    """Idle keep-alive of client connections on the ingress replicas' HTTP servers (Ray Serve's
    `http_options.keep_alive_timeout_s`)."""

    @model_validator(mode="before")
    @classmethod
    def _removed_fields(cls, data: object) -> object:
        if isinstance(data, dict):
            for name in ("proxy", "drain_s"):
                if name in data:
                    raise ValueError(
                        f"http.{name} was removed: Ray Serve's own ingress serves the port in every mode now (HAProxy "
                        "in front of each ingress replica's HTTP server, which drains on shutdown by itself); delete it."
                    )
        return data


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
    """Where ingress replicas may run (`custom` resources, `node_labels`), e.g. on the CPU nodes. Ray Serve's
    HAProxy on every node forwards `http.port` to them, wherever they run."""


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
