"""tierserve joining an existing two-node Ray cluster, with replicas placed by custom resources and labels.

The cluster is Ray's own `ray.cluster_utils.Cluster` on this machine: a head node standing for the CPU
nodes (`cpu_group` resource, label tierserve/group=cpu) and a worker standing for a GPU node (`gpu_group`,
tierserve/group=gpu). `launch.start` joins it through `ray.address`, as `tierserve up --address` does. The
small tier is pinned by a custom resource, the large one by a node label, the router and the ingress to the
head. Then the worker's raylet and its processes are killed mid-load and the node comes back.

The engines are `ScriptedEngine` (no vLLM); the router is the heuristic one (no kNN store is queried).
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import ray
import ray.cloudpickle
from ray import serve
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from serving import launch
from serving.config import parse_config
from serving.engines.scripted import ScriptedEngine

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the replicas import this test engine by value

CPU_NODE = {"resources": {"cpu_group": 100.0}, "labels": {"tierserve/group": "cpu"}}
GPU_NODE = {"resources": {"gpu_group": 100.0}, "labels": {"tierserve/group": "gpu"}}
CLIENT_TIMEOUT_S = 20.0  # past http.request_timeout_s (5 s): a request still open then counts as hung


class ScriptedTestEngine(ScriptedEngine):
    tokens_per_s = 100.0
    answer_tokens = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_args(kind: dict) -> dict:
    return {"num_cpus": 2, "object_store_memory": 100 << 20, **kind}


def _config(address: str, port: int, data_dir: Path) -> dict:
    engine = {"max_num_seqs": 16, "max_num_batched_tokens": 256, "max_model_len": 512, "kv_cache_memory_bytes": 1 << 20}
    return {
        "data_dir": str(data_dir),
        "tiers": [
            {"name": "small", "model": "scripted-small", "engine": engine,
             "resources": {"num_cpus": 0.1, "custom": {"gpu_group": 0.01}}},
            {"name": "large", "model": "scripted-large", "engine": engine,
             "resources": {"num_cpus": 0.1, "node_labels": {"tierserve/group": "gpu"}}},
        ],
        "http": {"host": "0.0.0.0", "port": port, "request_timeout_s": 5.0},
        "ingress": {"num_cpus": 0.1, "resources": {"custom": {"cpu_group": 0.01}}},
        "router": {"default_router": "heuristic", "num_cpus": 0.1, "store": {"path": str(data_dir / "qdrant")},
                   "resources": {"node_labels": {"tierserve/group": "cpu"}}},
        "ray": {"address": address},
        "query_log": {"enabled": False},
        "capacity": {"enabled": True, "poll_interval_s": 0.2, "stats_max_age_s": 1.0},
    }


@dataclass
class Stack:
    cluster: Cluster
    gpu_node: object
    url: str
    timings: dict[str, float] = field(default_factory=dict)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_SERVE_ENABLE_HA_PROXY", "1")  # a cluster started for tierserve, as the chart starts one
        yield from _stack(tmp_path_factory)


def _stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    head = _node_args(CPU_NODE) | {"include_dashboard": True, "dashboard_port": _free_port(),
                                   "dashboard_agent_listen_port": _free_port()}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        gpu_node = cluster.add_node(**_node_args(GPU_NODE))
        config = parse_config(_config(cluster.address, _free_port(), tmp_path_factory.mktemp("multinode")), "multinode")
        started = time.monotonic()
        url = launch.start(config, wait_s=150, engine_cls=ScriptedTestEngine)
        result = Stack(cluster, gpu_node, url, {"deploy_s": time.monotonic() - started})
        yield result
        print("\nMULTINODE " + json.dumps(result.timings, default=str, indent=1))
    finally:
        try:
            if ray.is_initialized():
                launch.stop(app_only=True)
        finally:
            cluster.shutdown()


def _placement() -> dict[str, set[str]]:
    """Node ids of the alive replicas of each deployment of the app, from Ray's state API."""
    actors = list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
    nodes: dict[str, set[str]] = {}
    for a in actors:
        if a.class_name.startswith("ServeReplica:tierserve:"):
            nodes.setdefault(a.class_name.rsplit(":", 1)[1], set()).add(a.node_id)
    return nodes


def _deployment_statuses() -> dict[str, str]:
    app = serve.status().applications.get("tierserve")
    return {name: d.status.value for name, d in app.deployments.items()} if app else {}


def test_each_deployment_runs_where_the_config_pins_it(stack: Stack) -> None:
    head_id, gpu_id = stack.cluster.head_node.node_id, stack.gpu_node.node_id
    placement = _placement()
    stack.timings["placement"] = {k: sorted(v) for k, v in placement.items()}
    stack.timings["nodes"] = {"head (cpu_group)": head_id, "worker (gpu_group)": gpu_id}
    assert placement == {"tier-small": {gpu_id}, "tier-large": {gpu_id}, "router": {head_id}, "ingress": {head_id}}
    # The node table carries the labels the placement matched on.
    labels = {n["NodeID"]: n.get("Labels", {}) for n in ray.nodes() if n["Alive"]}
    assert labels[gpu_id]["tierserve/group"] == "gpu" and labels[head_id]["tierserve/group"] == "cpu"
    # The app answers on both tiers through the ingress on the head node (0.0.0.0 resolved to its node).
    for tier in ("small", "large"):
        r = httpx.post(stack.url + "/v1/completions", json={"model": tier, "prompt": "hi", "max_tokens": 3}, timeout=10)
        assert r.status_code == 200 and r.headers["x-tierserve-tier"] == tier, r.text


@dataclass
class _Load:
    """Requests in a loop from a few threads, each outcome stamped: status code, or 'hung' / 'error'."""

    url: str
    outcomes: list[tuple[float, str, object, float]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    errors: Counter = field(default_factory=Counter)

    def run(self, worker: int) -> None:
        tiers = ("small", "large", "auto")
        with httpx.Client(timeout=CLIENT_TIMEOUT_S) as client:
            i = 0
            while not self.stop.is_set():
                model = tiers[(worker + i) % len(tiers)]
                i += 1
                t = time.monotonic()
                try:
                    r = client.post(self.url + "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 8})
                    outcome: object = r.status_code
                    if r.status_code != 200:
                        error = r.json()["error"]  # the OpenAI envelope, never a bare error
                        retry = r.headers.get("retry-after")
                        self.errors[f"{r.status_code} {model} {error['code']} retry-after={retry}: {error['message'][:90]}"] += 1
                except httpx.TimeoutException:
                    outcome = "hung"
                except httpx.HTTPError as exc:
                    outcome = f"error {type(exc).__name__}"
                self.outcomes.append((t, model, outcome, time.monotonic() - t))
                time.sleep(0.02)


def _wait(what: str, predicate, timeout_s: float, every_s: float = 0.25) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        time.sleep(every_s)
    return time.monotonic() - start


def test_losing_the_gpu_node_mid_load_is_reported_answered_and_recovered(stack: Stack) -> None:
    load = _Load(stack.url)
    threads = [threading.Thread(target=load.run, args=(w,), daemon=True) for w in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(2.0)
        assert load.outcomes and all(o == 200 for _, _, o, _ in load.outcomes), Counter(o for _, _, o, _ in load.outcomes)

        killed = time.monotonic()
        stack.cluster.remove_node(stack.gpu_node)  # the raylet and every process of the node, mid-load
        stack.timings["remove_node_s"] = time.monotonic() - killed
        tiers_down = lambda: all(_deployment_statuses().get(f"tier-{t}") != "HEALTHY" for t in ("small", "large"))
        stack.timings["serve_reports_tiers_unhealthy_s"] = _wait("Serve reports the lost tiers", tiers_down, 60) + stack.timings["remove_node_s"]
        statuses = _deployment_statuses()
        stack.timings["statuses_while_down"] = statuses
        assert statuses["ingress"] == "HEALTHY" and statuses["router"] == "HEALTHY"
        time.sleep(3.0)  # keep loading the app while the tiers have nowhere to run
        health = httpx.get(stack.url + "/health", timeout=10)
        assert health.status_code == 503 and health.json()["tiers"] == {"small": False, "large": False}

        back = time.monotonic()
        node = stack.cluster.add_node(**_node_args(GPU_NODE))
        stack.gpu_node = node
        stack.timings["add_node_s"] = time.monotonic() - back
        stack.timings["health_ready_after_add_s"] = _wait(
            "/health ready again", lambda: httpx.get(stack.url + "/health", timeout=10).status_code == 200, 90
        ) + stack.timings["add_node_s"]
        recovered_at = time.monotonic()
        served = lambda: any(t > recovered_at and o == 200 for t, _, o, _ in load.outcomes)
        _wait("a request answered after recovery", served, 20)
        time.sleep(1.0)
    finally:
        load.stop.set()
        for t in threads:
            t.join(timeout=CLIENT_TIMEOUT_S + 5)

    stack.timings["recovery_from_kill_s"] = recovered_at - killed
    placement = _placement()
    stack.timings["placement_after"] = {k: sorted(v) for k, v in placement.items()}
    assert placement["tier-small"] == placement["tier-large"] == {node.node_id}
    assert placement["ingress"] == placement["router"] == {stack.cluster.head_node.node_id}

    counts = Counter(str(o) for _, _, o, _ in load.outcomes)
    outage = Counter(str(o) for t, _, o, _ in load.outcomes if killed <= t < recovered_at)
    stack.timings["outcomes_total"] = dict(counts)
    stack.timings["outcomes_during_outage"] = dict(outage)
    stack.timings["error_answers"] = dict(load.errors)
    stack.timings["slowest_answer_during_outage_s"] = max(d for t, _, _, d in load.outcomes if killed <= t < recovered_at)
    assert "hung" not in counts and not any(k.startswith("error") for k in counts), counts
    assert set(counts) <= {"200", "503"}, counts  # answered, or an explicit 503 (never a 5xx of another kind)
    assert outage["503"] > 0  # the loss was visible to clients, as retryable 503s
    assert not [e for e in load.errors if "retry-after=None" in e], load.errors
    after = Counter(str(o) for t, _, o, _ in load.outcomes if t >= recovered_at)
    assert after and set(after) == {"200"}, after
