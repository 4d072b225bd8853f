"""The router deployment on a real local Ray Serve: concurrent requests are batched, admin calls work."""

from __future__ import annotations

import os

import pytest

from router.config import RouterConfig
from router.exemplars import load_default_exemplars
from router.types import Exemplar, RouteInput

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from router.deployment import RouterDeployment  # noqa: E402
from serving.launch import start_local_cluster  # noqa: E402

TIERS = ["small", "large"]


@pytest.fixture(scope="module")
def handle(tmp_path_factory):
    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if k in os.environ}
    start_local_cluster(lambda: ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env},
                                         log_to_driver=False))
    try:
        serve.start(proxy_location="Disabled")  # handles only: no HTTP port to clash with a running stack
        # No busy fallback: this test is about batching, and a loaded CI machine must not turn it into heuristics.
        cfg = RouterConfig(batch_wait_timeout_s=0.05, batch_max_size=32, max_queue_wait_s=None)
        app = serve.deployment(RouterDeployment, max_ongoing_requests=64, ray_actor_options={"num_cpus": 1}).bind(
            cfg, TIERS, str(tmp_path_factory.mktemp("data"))
        )
        yield serve.run(app, name="router-test", route_prefix=None)
    finally:
        serve.shutdown()
        ray.shutdown()


def test_concurrent_requests_are_batched_and_routed(handle):
    texts = [
        "Extract the street name from this delivery note.",
        "Convert these three dates to ISO format.",
        "Prove that the square root of 3 is irrational and generalize to any non-square integer.",
        "Analyze the enforceability of this indemnity clause under English and New York law.",
    ] * 5
    responses = [handle.route.remote(RouteInput(text)) for text in texts]
    decisions = [r.result(timeout_s=120) for r in responses]
    assert [d.tier for d in decisions] == ["small", "small", "large", "large"] * 5
    assert max(d.batch_size for d in decisions) > 1
    assert all(d.router == "knn" and not d.fallback for d in decisions)
    assert all(d.overhead_ms >= d.embed_ms > 0 for d in decisions)


def test_admin_add_count_and_health(handle):
    before = handle.count.remote().result(timeout_s=60)
    assert before == len(load_default_exemplars())
    added = handle.add_exemplars.remote([Exemplar("Rank these suppliers by on-time delivery rate.", "small")])
    assert added.result(timeout_s=60) == 1
    assert handle.count.remote().result(timeout_s=60) == before + 1
    assert handle.fallbacks.remote().result(timeout_s=60) == {}
