"""`router.placement: ingress`: the kNN router runs inside the ingress replica (no Ray hop), on the scripted tiers."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from serving import launch
from serving.config import parse_config
from serving.engines.scripted import ScriptedEngine

PORT = 8770


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tier = {"engine": {"kv_cache_memory_bytes": 1 << 20}, "resources": {"num_cpus": 0.1}}
    raw = {
        "data_dir": str(tmp_path_factory.mktemp("data")),
        "tiers": [{"name": "small", "model": "s", **tier}, {"name": "large", "model": "l", **tier}],
        "http": {"host": "127.0.0.1", "port": PORT},
        "ingress": {"num_cpus": 0.1},
        "ray": {"num_cpus": 4},
        "router": {"placement": "ingress", "default_router": "knn"},
    }
    url = launch.start(parse_config(raw, "router-in-ingress"), wait_s=300, engine_cls=ScriptedEngine)
    try:
        yield url
    finally:
        launch.stop()


def test_auto_is_routed_by_knn_in_the_ingress(app: str) -> None:
    from ray import serve

    assert "router" not in serve.status().applications["tierserve"].deployments  # no router deployment
    easy = {"model": "auto", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 2}
    hard = {"model": "auto", "max_tokens": 2, "messages": [{"role": "user", "content":
            "Prove that every bounded monotone sequence of real numbers converges, citing the completeness axiom."}]}
    r_easy = httpx.post(app + "/v1/chat/completions", json=easy, timeout=60)
    r_hard = httpx.post(app + "/v1/chat/completions", json=hard, timeout=60)
    assert r_easy.headers["x-tierserve-router"] == r_hard.headers["x-tierserve-router"] == "knn"
    assert r_easy.headers["x-tierserve-tier"] == "small" and r_hard.headers["x-tierserve-tier"] == "large"
    assert float(r_easy.headers["x-tierserve-overhead-ms"]) < 1000
    route = httpx.post(app + "/v1/route", json=hard, timeout=60).json()
    assert route["tier"] == "large" and route["router"] == "knn" and not route["fallback"]
