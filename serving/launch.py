"""Start the app on a local (or existing) Ray cluster and wait until every tier is ready."""

from __future__ import annotations

import logging
import time

import httpx

from serving.config import AppConfig
from serving.engines.base import Engine
from serving.errors import StartupError

logger = logging.getLogger(__name__)


def check_models(config: AppConfig) -> None:
    for tier in config.tiers:
        path = config.model_path(tier)
        if not (path / "config.json").is_file():
            raise StartupError(
                f"tiers[{tier.name}].model: no model at {path}. Point it at a Hugging Face model directory, "
                f"or generate the tiny test models with `tierserve models tiny {path.parent}`."
            )


def start(config: AppConfig, *, wait_s: float = 600.0, engine_cls: type[Engine] | None = None) -> str:
    """Deploy the app; return its base URL once /health says every tier is ready."""
    import ray
    from ray import serve

    from serving.app import build_app

    if engine_cls is None:
        check_models(config)
    if not ray.is_initialized():
        if config.ray.address:
            ray.init(address=config.ray.address)
        else:
            ray.init(
                num_cpus=config.ray.num_cpus,
                object_store_memory=config.ray.object_store_memory_bytes,
                include_dashboard=False,
                log_to_driver=True,
                # A one-machine cluster talks over loopback (the tier replicas' data ports included).
                _node_ip_address="127.0.0.1",
            )
    serve.start(
        # http.proxy false: the ingress replicas serve the port themselves, no proxy actors.
        proxy_location="EveryNode" if config.http.proxy else "Disabled",
        http_options={
            "host": config.http.host,
            "port": config.http.port,
            "request_timeout_s": config.http.request_timeout_s,
        },
    )
    serve.run(build_app(config, engine_cls=engine_cls), name="tierserve", route_prefix="/", blocking=False)
    host = "127.0.0.1" if config.http.host in ("0.0.0.0", "::") else config.http.host
    url = f"http://{host}:{config.http.port}"
    wait_ready(url, wait_s)
    return url


def wait_ready(url: str, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    last = ""
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/health", timeout=5)
            if r.status_code == 200:
                return
            last = r.text
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(1.0)
    raise StartupError(f"tierserve did not become ready within {wait_s:.0f} s at {url}/health: {last}")


def stop() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        if ray.is_initialized():
            ray.shutdown()
