"""`build_app(config)`: the whole Ray Serve application, built in one place."""

from __future__ import annotations

import logging
import secrets
from typing import Any

from ray import serve
from ray.serve import Application

from serving.channel.autoscale import POLICY as AUTOSCALE_POLICY
from serving.config import AppConfig, TierConfig, load_config
from serving.config.cores import engine_cores
from serving.config.placement import actor_options
from serving.engines.base import Engine
from serving.engines.vllm import engine_env

logger = logging.getLogger(__name__)


def _other_engine_cores(config: AppConfig, tier: TierConfig) -> list[int]:
    """Cores the other tiers' CPU engines bind: the processes around this tier's engine avoid them where a node
    has cores no engine binds (`serving.cpu.affinity.placement_cores`)."""
    cores: set[int] = set()
    for other in config.tiers:
        if other is not tier and other.engine.cpu_threads_bind:
            cores |= engine_cores(other.engine.cpu_threads_bind) or set()
    return sorted(cores)


ONE_LOOP = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
"""The ingress's and the tier replicas' own code runs on the replica's main event loop, not on a second loop in
a thread of its own: the ingress's completion handler beside its HTTP server, a tier replica's wire server beside
Serve's own tasks, with no handoff between threads for each token. Measured for the tier replicas on the 2-core
box (one stream, 3 alternating rounds): time per token 2.18 / 2.01 / 2.10 ms against 2.53 / 3.92 / 2.51 ms in
the thread, 387-435 against 247-340 tok/s; at 32 streams no difference showed through the noise."""


def _tier_deployment_options(config: AppConfig, tier: TierConfig) -> dict[str, Any]:
    d = tier.deployment
    options: dict[str, Any] = {
        "name": f"tier-{tier.name}",
        "max_ongoing_requests": d.max_ongoing_requests,
        "max_queued_requests": d.max_queued_requests,
        "ray_actor_options": {
            "num_cpus": tier.resources.num_cpus,
            "num_gpus": tier.resources.num_gpus,
            "runtime_env": {"env_vars": {**engine_env(tier, config.device), **ONE_LOOP}},
            **actor_options(tier.resources),  # custom resources / node labels: which nodes may host it
        },
        "health_check_period_s": 10,
        "health_check_timeout_s": 30,
        "graceful_shutdown_timeout_s": 10,
        "logging_config": {"enable_access_log": False},  # the ingress polls status 4x a second
    }
    if d.autoscaling is not None:
        a = d.autoscaling
        options["autoscaling_config"] = {
            "min_replicas": a.min_replicas,
            "max_replicas": a.max_replicas,
            "target_ongoing_requests": a.target_ongoing_requests,
            "upscale_delay_s": a.upscale_delay_s,
            "downscale_delay_s": a.downscale_delay_s,
            "metrics_interval_s": a.metrics_interval_s,
            "look_back_period_s": a.look_back_period_s,
            # Requests bypass Ray handles: the replicas report them (TierServer.record_autoscaling_stats).
            "policy": {"policy_function": AUTOSCALE_POLICY},
        }
    else:
        options["num_replicas"] = d.num_replicas
    return options


def build_app(config: AppConfig, *, engine_cls: type[Engine] | None = None) -> Application:
    """Tier deployments (one per tier) and the ingress that routes between them.

    `engine_cls` replaces vLLM in every tier (e.g. `ScriptedEngine` to measure the plumbing alone).
    """
    from serving.channel.replica import TierServer
    from serving.engines.vllm import VllmEngine
    from serving.ingress.app import Ingress

    wire_token = secrets.token_hex(16)  # the tier replicas' data ports answer only this app's ingress
    tier_apps = {}
    for tier in config.tiers:
        model_path = config.model_path(tier)
        deployment = serve.deployment(TierServer).options(**_tier_deployment_options(config, tier))
        tier_apps[tier.name] = deployment.bind(
            tier, str(model_path), config.device, wire_token, engine_cls=engine_cls or VllmEngine,
            other_engine_cpus=_other_engine_cores(config, tier),
        )

    router_app = None
    if config.router.default_router != "cheapest" and config.router.placement == "deployment":
        from router.deployment import RouterDeployment

        router_app = (
            serve.deployment(RouterDeployment)
            .options(
                name="router",
                num_replicas=config.router.num_replicas,  # >1 needs router.store.url (checked in config)
                max_ongoing_requests=1024,
                logging_config={"enable_access_log": False},
                ray_actor_options={
                    "num_cpus": config.router.num_cpus,
                    "num_gpus": config.router.num_gpus,
                    "runtime_env": {"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}},
                    **actor_options(config.router.resources),
                },
            )
            # Learned exemplars hold prompts: they expire with the query log's retention.
            .bind(config.router, config.tier_names, str(config.resolved_data_dir()),
                  retention_s=config.query_log.retention_s)
        )

    ingress = serve.deployment(Ingress).options(
        name="ingress",
        num_replicas=config.ingress.num_replicas,
        max_ongoing_requests=config.ingress.max_ongoing_requests,
        ray_actor_options={
            "num_cpus": config.ingress.num_cpus,
            "runtime_env": {"env_vars": ONE_LOOP},
            **actor_options(config.ingress.resources),
        },
    )
    return ingress.bind(config, tier_apps, router_app, wire_token=wire_token)


def app_builder(args: dict[str, Any]) -> Application:
    """Entry point for `serve run` / RayService: `import_path: serving.app:app_builder`, `args: {config: FILE}`."""
    path = args.get("config")
    if not path:
        raise ValueError("serving.app:app_builder needs args.config: the path of a tierserve YAML config.")
    return build_app(load_config(path))
