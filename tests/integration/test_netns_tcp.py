"""The tier channel over TCP between two real hosts, and what happens when the link between them is cut.

Two Ray nodes run in network namespaces this test makes (`tests/integration/netns.py`): the head (ingress,
router, Ray Serve's HAProxy) and a worker holding both tiers (the scripted engine), so every token crosses
the veth link over TCP. Mid-stream the link is cut without a FIN or RST. Every open stream must end with an
error event well within 30 s (no wait for `http.request_timeout_s`), and new requests get 503 with Retry-After.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import REPO
from tests.integration import netns

PORT = 8790
RAY_PORT = 6390
STREAMS = 6
REQUEST_TIMEOUT_S = 300.0  # what nothing may wait for


def _config(data_dir: Path) -> dict:
    engine = {"max_num_seqs": 16, "max_num_batched_tokens": 256, "max_model_len": 4096,
              "kv_cache_memory_bytes": 1 << 20}
    tier = {"engine": engine, "resources": {"num_cpus": 0.1, "custom": {"tier_host": 1}}}
    return {
        "data_dir": str(data_dir),
        "tiers": [{"name": "small", "model": "scripted-small", **tier}, {"name": "large", "model": "scripted-large", **tier}],
        "http": {"host": "0.0.0.0", "port": PORT, "request_timeout_s": REQUEST_TIMEOUT_S},
        "ingress": {"num_cpus": 0.1, "resources": {"custom": {"ingress_host": 1}}},
        "router": {"default_router": "heuristic", "num_cpus": 0.1, "store": {"path": str(data_dir / "qdrant")},
                   "resources": {"custom": {"ingress_host": 1}}},
        "ray": {"address": f"{netns.HEAD_IP}:{RAY_PORT}"},
        "query_log": {"enabled": False},
        "capacity": {"poll_interval_s": 0.5},
    }


_DEPLOY = """
import sys, yaml
from serving import launch
from serving.config import parse_config
from serving.engines.scripted import ScriptedEngine
launch.start(parse_config(yaml.safe_load(open(sys.argv[1])), "netns"), engine_cls=ScriptedEngine, wait_s=240)
"""


def _ray_start(hosts: netns.Hosts, ns: str, *args: str, log: Path) -> subprocess.Popen:
    env = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "PATH": "/usr/sbin:/usr/bin:/bin"}  # a private test cluster: no token (one may sit in ~/.ray)
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--num-cpus", "2",
           "--object-store-memory", str(100 << 20), "--disable-usage-stats", *args]
    return hosts.run(ns, ["env", *(f"{k}={v}" for k, v in env.items()), *cmd], stdout=log.open("wb"),
                     stderr=subprocess.STDOUT, cwd=REPO)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    why = netns.available()
    if why:
        pytest.skip(why)
    tmp = tmp_path_factory.mktemp("netns")
    with netns.two_hosts() as hosts:
        _ray_start(hosts, hosts.head, "--head", "--node-ip-address", netns.HEAD_IP, "--port", str(RAY_PORT),
                   "--resources", json.dumps({"ingress_host": 10}), "--temp-dir", "/tmp/tsn-head",
                   "--include-dashboard", "false", log=tmp / "head.log")
        time.sleep(4)
        _ray_start(hosts, hosts.worker, "--address", f"{netns.HEAD_IP}:{RAY_PORT}", "--node-ip-address",
                   netns.WORKER_IP, "--resources", json.dumps({"tier_host": 10}), "--temp-dir", "/tmp/tsn-worker",
                   log=tmp / "worker.log")  # short: Ray's Unix socket paths must stay under 108 bytes
        config = tmp / "tierserve.yaml"
        config.write_text(yaml.safe_dump(_config(tmp / "data")))
        deploy = hosts.run(hosts.head, [sys.executable, "-c", _DEPLOY, str(config)], cwd=REPO,
                           stdout=(tmp / "deploy.log").open("wb"), stderr=subprocess.STDOUT,
                           env={**os.environ, "RAY_ADDRESS": f"{netns.HEAD_IP}:{RAY_PORT}",
                                "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)})
        if deploy.wait(timeout=300) != 0:
            pytest.fail("deploying into the namespaces failed:\n" + (tmp / "deploy.log").read_text()[-3000:])
        yield hosts, f"http://{netns.HEAD_CLIENT_IP}:{PORT}"


def test_tokens_cross_hosts_over_tcp_and_a_cut_link_ends_every_stream_with_an_error(cluster) -> None:
    hosts, url = cluster
    client = httpx.Client(timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=5.0))
    reply = client.post(url + "/v1/completions", json={"model": "small", "prompt": "hi", "max_tokens": 4})
    assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == "alpha beta gamma delta "

    ends: list[tuple[float, list[str]]] = []
    started = threading.Barrier(STREAMS + 1)

    def stream() -> None:
        body = {"model": "small", "prompt": "go", "max_tokens": 3000, "ignore_eos": True, "stream": True}
        tail: list[str] = []
        with client.stream("POST", url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            first = True
            for line in r.iter_lines():
                if first:
                    started.wait(timeout=60)
                    first = False
                if line.startswith("data: "):
                    tail = [*tail[-1:], line.removeprefix("data: ")]
        ends.append((time.monotonic(), tail))

    threads = [threading.Thread(target=stream) for _ in range(STREAMS)]
    for t in threads:
        t.start()
    started.wait(timeout=60)  # every stream has its first tokens
    time.sleep(0.5)
    cut_at = time.monotonic()
    hosts.cut()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a stream hung after the link was cut"
    assert len(ends) == STREAMS
    for ended_at, tail in ends:  # each ends within 30 s: OpenAI's error envelope, then [DONE]
        assert ended_at - cut_at < 30
        assert tail[-1] == "[DONE]"
        error = json.loads(tail[0])["error"]
        assert error["code"] == "replica_lost" and error["type"] == "service_unavailable_error", error
    refused = client.post(url + "/v1/completions", json={"model": "small", "prompt": "hi", "max_tokens": 4})
    assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["type"] == "service_unavailable_error"
