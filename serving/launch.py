"""Start the app on a local Ray cluster or join an existing one, and wait until every tier is ready."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx

from router.errors import TierserveError
from serving.config import AppConfig
from serving.config.gpus import gpu_share_problems
from serving.config.placement import unmet
from serving.engines.base import Engine

logger = logging.getLogger(__name__)

APP_NAME = "tierserve"


LOCAL_CLUSTER_ENV = {
    # Ray Serve's HAProxy ingress: HAProxy on every node forwards http.port to each ingress replica's own HTTP
    # server (Ray's direct ingress), with no Python proxy hop per streamed chunk. A cluster that tierserve
    # joins, or the Helm chart's, sets it on every node itself.
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    # Serve's controller loop every 0.5 s instead of 0.1 s: on a small machine it took 5% of a core (and the
    # GCS 2% more) from the engines; a failure or a scaling step is acted on up to 0.4 s later.
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    # A stopping ingress replica stays up at least this long so load balancers stop sending to it (Ray's
    # default, 30 s, is for a cluster behind outside balancers: the chart keeps it). Here the only balancer is
    # this machine's HAProxy, which drops the replica within a control loop; requests still in flight get
    # the deployment's graceful_shutdown_timeout_s. Measured: every stop of a local stack took 30 s more.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    # Ray starts its workers at nice 15, below its own daemons; here the workers are the serving path (the
    # ingress, the tier replicas, the engines they start), so any nice-0 process on the node (Ray's GCS,
    # raylet and dashboard agent, a log shipper, a client) took the core from an engine step or a token on its
    # way. Bare vLLM runs at nice 0. The chart sets the same on every node.
    "RAY_worker_niceness": "0",
}
"""Environment a local cluster started by `tierserve up` gets (with `haproxy_threads`)."""

LOCAL_START_TRIES = 3
RAY_STARTUP_TIMEOUT = "timed out during startup"
"""What Ray's error says when the node's raylet did not register in time (`start_local_cluster` tries again)."""


def haproxy_threads(cores: int | None) -> str:
    """HAProxy's thread count on a local cluster: half the machine's cores, at most Ray's default of 4.

    Each HAProxy thread wakes for its share of the streamed chunks, so threads beyond the cores HAProxy can
    have are context switches that the engines pay for. Measured on the 2-core box (32 streams): 4 threads
    took 23-26 ms of CPU per 1,000 streamed tokens, 1 thread 13-16 ms, with the same throughput.
    """
    return str(max(1, min(4, (cores or 2) // 2)))


def http_options(config: AppConfig) -> dict[str, object]:
    """Ray Serve's `http_options` for the config: where the ingress listens, and how long Serve lets a request run
    (a little past `http.request_timeout_s`, so tierserve's own 504 names the setting first)."""
    return {"host": config.http.host, "port": config.http.port,
            "request_timeout_s": config.http.request_timeout_s + 5,
            "keep_alive_timeout_s": int(config.http.keep_alive_s)}


class StartupError(TierserveError):
    """The stack (or a benchmark's server) could not start: a missing model, a server that never got ready."""


def check_models(config: AppConfig) -> None:
    for tier in config.tiers:
        path = config.model_path(tier)
        if not (path / "config.json").is_file():
            raise StartupError(
                f"tiers[{tier.name}].model: no model at {path}. Point it at a Hugging Face model directory, "
                f"or generate the tiny test models with `tierserve models tiny {path.parent}`."
            )


def placement_problems(config: AppConfig, nodes: list[Mapping[str, Any]]) -> list[str]:
    """One line per deployment whose `custom` resources / `node_labels` no alive node of `nodes`
    (as `ray.nodes()` lists them) meets, naming the config field."""
    placements = [(f"tiers[{t.name}].resources", t.resources) for t in config.tiers]
    placements.append(("ingress.resources", config.ingress.resources))
    if config.router.placement == "deployment":
        placements.append(("router.resources", config.router.resources))
    return [f"{field}: {why}" for field, placement in placements if (why := unmet(placement, nodes))]


def start(config: AppConfig, *, wait_s: float = 600.0, engine_cls: type[Engine] | None = None) -> str:
    """Deploy the app; return its base URL once /health says every tier is ready.

    With `ray.address` it joins that cluster (nothing is started here, nothing here is pinned) and leaves
    placement to each deployment's `resources`; else it starts a one-machine cluster.
    """
    import ray
    from ray import serve

    from serving.app import build_app

    joined = config.ray.address is not None
    if engine_cls is None and not joined:  # on a cluster the models live on the nodes that run the tiers
        check_models(config)
    started_here = not ray.is_initialized() and not joined
    if not ray.is_initialized():
        if joined:
            ray.init(address=config.ray.address)
        else:
            env = {**LOCAL_CLUSTER_ENV, "RAY_SERVE_HAPROXY_NBTHREAD": haproxy_threads(os.cpu_count())}
            for name, value in env.items():  # the caller's own values win
                os.environ.setdefault(name, value)
            start_local_cluster(
                lambda: ray.init(
                    num_cpus=config.ray.num_cpus,
                    object_store_memory=config.ray.object_store_memory_bytes,
                    include_dashboard=False,
                    log_to_driver=True,
                    # A one-machine cluster talks over loopback (the tier replicas' data ports included).
                    _node_ip_address="127.0.0.1",
                )
            )
    problems = placement_problems(config, ray.nodes()) + gpu_share_problems(config, ray.nodes())
    if problems and started_here:
        ray.shutdown()
        raise StartupError(
            "the local cluster (this machine alone) cannot host every deployment:\n  " + "\n  ".join(problems)
            + "\nJoin a cluster whose nodes declare them (ray.address or `tierserve up --address`; nodes get "
            "them from `ray start --resources/--labels`) or remove those constraints."
        )
    for problem in problems:  # an autoscaler may still add such a node
        logger.warning("%s; its replicas wait until such a node joins", problem)
    if joined and config.http.host in ("127.0.0.1", "localhost", "::1"):
        logger.warning("http.host %s: each ingress replica listens on its own node's loopback, reachable only "
                       "from that node; set http.host 0.0.0.0 on a cluster", config.http.host)
    serve.start(proxy_location="EveryNode", http_options=http_options(config))
    serve.run(build_app(config, engine_cls=engine_cls), name=APP_NAME, route_prefix="/", blocking=False)
    deadline = time.monotonic() + wait_s
    host = config.http.host
    if host in ("0.0.0.0", "::"):
        # The port is served on the ingress replicas' nodes (proxy or not, an ingress node has it).
        host = _ingress_node_ip(deadline) if joined else "127.0.0.1"
    url = f"http://{host}:{config.http.port}"
    wait_ready(url, deadline - time.monotonic(), problems)
    return url


def start_local_cluster(init: Callable[[], object], tries: int = LOCAL_START_TRIES) -> None:
    """Run `init` (a `ray.init` that starts a one-machine cluster), again when Ray's raylet misses the 30 s
    that Ray gives it to register (fixed in `ray._private.node`; a loaded machine, seen in CI while the
    previous cluster's processes were still exiting). The failed try's processes are killed first: only
    this process's children that were not there before it."""
    import psutil
    import ray

    for attempt in range(1, tries + 1):
        before = {child.pid for child in psutil.Process().children(recursive=True)}
        try:
            init()
            return
        except Exception as exc:
            if RAY_STARTUP_TIMEOUT not in str(exc) or attempt == tries:
                raise
            started = [c for c in psutil.Process().children(recursive=True) if c.pid not in before]
            for child in started:
                child.kill()
            psutil.wait_procs(started, timeout=10)
            ray.shutdown()
            logger.warning("the local Ray cluster did not start (%s); killed its %d processes, trying again "
                           "(%d of %d)", exc, len(started), attempt + 1, tries)


def _ingress_node_ip(deadline: float) -> str:
    """The address of a node running an ingress replica (Ray's state API, served by the head's dashboard)."""
    import ray
    from ray.util.state import list_actors

    while True:
        try:
            actors = list_actors(filters=[("class_name", "=", f"ServeReplica:{APP_NAME}:ingress"),
                                          ("state", "=", "ALIVE")])
        except Exception as exc:  # noqa: BLE001 - no dashboard on the head: fall back to this node
            logger.warning("cannot list the ingress replicas (%s); checking this node's port", exc)
            return ray.util.get_node_ip_address()
        ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
        for actor in actors:
            if actor.node_id in ips:
                return ips[actor.node_id]
        if time.monotonic() >= deadline:
            raise StartupError("no ingress replica started; check `serve status` and ingress.resources.")
        time.sleep(1.0)


def wait_ready(url: str, wait_s: float, problems: Sequence[str] = ()) -> None:
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
    unplaced = "".join(f"\n  {p}" for p in problems)
    raise StartupError(f"tierserve did not become ready within {wait_s:.0f} s at {url}/health: {last}{unplaced}")


def stop(*, app_only: bool = False) -> None:
    """Remove the app and disconnect. `app_only` (a joined cluster): delete only this app and leave Serve
    and the cluster to their owner; else shut Serve and the local cluster down."""
    import ray
    from ray import serve

    try:
        if app_only:
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
    finally:
        if ray.is_initialized():
            ray.shutdown()
