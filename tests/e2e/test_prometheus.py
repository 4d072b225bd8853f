"""A real Prometheus scrapes the live stack; every dashboard panel's query returns data through its HTTP API.

Prometheus (Debian's package, started here in its own temp dir on a free port, scraping every second) scrapes
the ingress's `/metrics` as the chart's ServiceMonitor would (job `tierserve-serve`, namespace `llm`) and the Ray
metrics agent of the node, where the small tier's vLLM metrics arrive (the e2e config turns `vllm_metrics` on).
The test sends every kind of traffic (named tiers, streams, model=auto, a cascade escalation, a burst that spills
and gets 503s, 4xx errors, a client that drops a stream), then asks Prometheus every query of every panel with
Grafana's variables filled in, until each returns a series with a value. The chart's alert rules are loaded too
and must evaluate on the live series without error.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from tests.dashboards import dashboard_queries
from tests.e2e.conftest import ADMIN_KEY, API_KEY
from tests.unit.test_helm import CHART, NAMESPACE, RELEASE, _find_helm

pytestmark = pytest.mark.e2e
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
JOB = f"{RELEASE}-serve"
"""The job label the chart's ServiceMonitor gives the Serve service's series (the rules select on it)."""
SCRAPE_S = 1
DATA_WAIT_S = 60.0
"""How long the panels may take to show the traffic: Ray's agent exports worker metrics every few seconds."""

NO_DATA_HERE: dict[str, str] = {
    "vLLM preemptions / A": (
        "vLLM preempts only when an engine runs out of KV-cache blocks, which the e2e engines' 256 MiB caches never "
        "do on the tiny models, and its Ray counters skip inc(0), so Ray's agent exports no series until one happens"
    ),
    "Escalation rate vs target by tier / B": (
        "tierserve_cascade_escalation_target is set only for tiers with a calibrated target "
        "(cascade.target_escalation_rate or tier_target_escalation_rates, written by `tierserve calibrate "
        "--cascade`); the e2e config has none, and a made-up target would prove nothing"
    ),
    "Escalation rate vs target by tier / C": (
        "tierserve_cascade_escalation_floor likewise: set only for tiers with cascade.min_escalation_rate "
        "(`tierserve calibrate --cascade --max-quality-loss`), which the e2e config does not set"
    ),
    "Learner verdicts and explorations / B": (
        "exploration draws router.learn.explore_rate (2%) of the learning keys' requests routed above the "
        "cheapest tier; this traffic uses a key that opts out of learning, so that it cannot change the store the "
        "routing tests read (tests/unit/test_ingress_learning.py counts explorations)"
    ),
    "Learning calls failed or dropped / A": (
        "counts the router's learner or shadow calls that failed or were dropped, which a healthy stack never has"
    ),
}
"""Panel queries (title / refId) that cannot return data against the e2e stack, and why."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_metrics_port() -> int:
    """The metrics export port of the Ray node this test process is connected to (the stack's own)."""
    import ray

    if not ray.is_initialized():
        pytest.skip("the stack runs in another process (TIERSERVE_TEST_URL): its Ray node is not known here")
    (node,) = [n for n in ray.nodes() if n["Alive"]]
    return int(node["MetricsExportPort"])


def _rule_groups() -> list[dict]:
    """The chart's alert rules as a release with the defaults renders them."""
    helm, reasons = _find_helm()
    if helm is None:
        pytest.skip("no helm to render the alert rules: " + "; ".join(reasons))
    out = subprocess.run(
        [str(helm), "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
         "--set", "metrics.prometheusRule.enabled=true", "--show-only", "templates/prometheusrule.yaml"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    return yaml.safe_load(out)["spec"]["groups"]


@pytest.fixture(scope="module")
def prometheus(stack: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("no prometheus: install Debian's prometheus package (deploy/system-deps.sh, run by `make test`)")
    workdir = tmp_path_factory.mktemp("prometheus")
    target = stack["url"].removeprefix("http://")
    labels = {"namespace": NAMESPACE}
    (workdir / "rules.yaml").write_text(yaml.safe_dump({"groups": _rule_groups()}, sort_keys=False, width=1000))
    config = {
        "global": {"scrape_interval": f"{SCRAPE_S}s", "scrape_timeout": f"{SCRAPE_S}s", "evaluation_interval": "1s"},
        "rule_files": ["rules.yaml"],
        "scrape_configs": [
            {"job_name": JOB, "static_configs": [{"targets": [target], "labels": labels}]},
            {"job_name": "ray", "static_configs": [{"targets": [f"127.0.0.1:{_ray_metrics_port()}"], "labels": labels}]},
        ],
    }  # fmt: skip
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    proc = subprocess.Popen(
        [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=(workdir / "prometheus.log").open("w"), stderr=subprocess.STDOUT, cwd=workdir,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_targets(url, proc, workdir)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _wait_for_targets(url: str, proc: subprocess.Popen, workdir: Path) -> None:
    """Until both targets have been scraped successfully once."""
    deadline = time.monotonic() + 30
    health: dict = {}
    while time.monotonic() < deadline:
        assert proc.poll() is None, (workdir / "prometheus.log").read_text()[-2000:]
        try:
            targets = httpx.get(f"{url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
            health = {t["labels"]["job"]: (t["health"], t["lastError"]) for t in targets}
            if len(health) == 2 and all(h == "up" for h, _ in health.values()):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"Prometheus did not scrape both targets: {health}")


# ---- traffic of every kind ---------------------------------------------------------------------------------


def _send_every_kind(base_url: str, client: openai.OpenAI) -> None:
    # Twice, a few scrapes apart: a series first created by this traffic needs a sample before its increase.
    _send_each_kind_once(base_url, client)
    time.sleep(3 * SCRAPE_S)
    _send_each_kind_once(base_url, client)
    statuses = asyncio.run(_burst(base_url, n=100, gap_s=0.01))
    assert 503 in statuses and 200 in statuses, (statuses, _routers(base_url))  # past both tiers' admission limits


def _send_each_kind_once(base_url: str, client: openai.OpenAI) -> None:
    msg = [{"role": "user", "content": "Extract the invoice number from: INV-2231, due 3 May."}]
    # An exemplar-store outage (released for 2 s, as `tierserve exemplars import` does): the heuristic routes.
    released = httpx.post(base_url + "/admin/router/release-store", json={"seconds": 2}, headers=ADMIN, timeout=30)
    assert released.status_code == 200, released.text
    fallback = client.chat.completions.with_raw_response.create(model="auto", messages=msg, max_tokens=4)
    assert fallback.headers["x-tierserve-router"] == "heuristic-fallback"
    for tier in ("small", "large"):  # plain and streamed answers from each tier
        client.chat.completions.create(model=tier, messages=msg, max_tokens=8)
        list(client.chat.completions.create(model=tier, messages=msg, max_tokens=8, stream=True))
    deadline = time.monotonic() + 30  # the store reopens once its 2 s are over: then kNN decides, and caches
    while client.chat.completions.with_raw_response.create(model="auto", messages=msg, max_tokens=8).headers[
            "x-tierserve-router"] != "knn":
        assert time.monotonic() < deadline, "kNN routing back after the store's release"
        time.sleep(0.5)
    list(client.chat.completions.create(model="auto", messages=msg, max_tokens=8, stream=True))  # a cache hit
    escalated = client.chat.completions.create(
        model="small", messages=msg, max_tokens=8, extra_body={"tierserve": {"cascade": True, "cascade_threshold": 1.0}}
    )
    assert escalated.model_extra["tierserve"]["escalated"] is True
    for bad in ({"model": "gpt-17", "messages": msg}, {"model": "small", "messages": msg, "temperature": 3}):
        assert httpx.post(base_url + "/v1/chat/completions", json=bad, headers=AUTH, timeout=60).status_code in (400, 404)
    _drop_a_stream(base_url)
    # vLLM's CPU backend caches prefixes in blocks of 128 tokens: a prompt of 2+ blocks sent twice hits.
    long_prompt = " ".join(["the quarterly report lists revenue by region and product line"] * 15)
    for _ in range(2):
        client.completions.create(model="small", prompt=long_prompt, max_tokens=1)


def _drop_a_stream(base_url: str) -> None:
    body = {"model": "large", "prompt": "Once", "max_tokens": 500, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as http, http.stream("POST", base_url + "/v1/completions", json=body, headers=AUTH) as r:
        lines = r.iter_lines()
        assert any(next(lines).startswith("data: ") for _ in range(6))
    # leaving the block closed the connection mid-stream: the ingress counts a client abort


def _routers(base_url: str) -> list[str]:
    return [line for line in httpx.get(base_url + "/metrics").text.splitlines()
            if line.startswith(("tierserve_routing_decisions_total", "tierserve_capacity_moves_total"))]


async def _burst(base_url: str, n: int, gap_s: float) -> list[int]:
    """`n` auto requests within n x gap_s seconds: small saturates, some spill to large, the rest get 503."""

    async def one(http: httpx.AsyncClient, i: int) -> int:
        await asyncio.sleep(i * gap_s)
        body = {"model": "auto", "max_tokens": 64, "ignore_eos": True,
                "messages": [{"role": "user", "content": f"Is 'user{i}@example.com' a valid email address?"}]}  # fmt: skip
        return (await http.post(base_url + "/v1/chat/completions", json=body, headers=AUTH, timeout=300)).status_code

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=256)) as http:
        return list(await asyncio.gather(*(one(http, i) for i in range(n))))


# ---- what Prometheus answers -------------------------------------------------------------------------------


def _query(url: str, expr: str) -> list[dict]:
    r = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert body["status"] == "success", f"{expr}: {body}"
    return body["data"]["result"]


def _has_value(result: list[dict]) -> bool:
    """At least one series with a number to draw (histogram_quantile gives NaN where a window saw nothing)."""
    return any(math.isfinite(float(series["value"][1])) for series in result)


def test_every_dashboard_panel_shows_the_traffic(prometheus: str, base_url: str, client: openai.OpenAI) -> None:
    started = time.monotonic()
    _send_every_kind(base_url, client)
    # Every rate window reaches back to before the traffic, so each counter has a sample from before it.
    window = f"{math.ceil(time.monotonic() - started + DATA_WAIT_S + 10)}s"
    queries = dashboard_queries(namespace=NAMESPACE, job=JOB, rate_interval=window)
    where_known = {where for where, _ in queries}
    assert set(NO_DATA_HERE) <= where_known, f"allow-listed panels that no longer exist: {set(NO_DATA_HERE) - where_known}"
    waiting = dict(queries)
    results: dict[str, list[dict]] = {}
    deadline = time.monotonic() + DATA_WAIT_S
    while True:
        for where, expr in list(waiting.items()):
            results[where] = _query(prometheus, expr)
            if _has_value(results[where]) and where not in NO_DATA_HERE:
                del waiting[where]
        if set(waiting) <= set(NO_DATA_HERE) or time.monotonic() > deadline:
            break
        time.sleep(SCRAPE_S)
    empty = {where: dict(queries)[where] for where in waiting if where not in NO_DATA_HERE}
    assert not empty, "panels with no data after every kind of traffic:\n" + json.dumps(empty, indent=1)
    shown = {where: len(r) for where, r in results.items() if where not in NO_DATA_HERE}
    print(f"\n{len(shown)} panel queries returned data: " + json.dumps(shown, indent=1))
    for where in NO_DATA_HERE:  # an allow-listed query that starts returning data should leave the list
        assert not _has_value(results[where]), f"{where} returns data now: take it off NO_DATA_HERE"


def test_the_alert_rules_evaluate_on_the_live_series(prometheus: str) -> None:
    deadline = time.monotonic() + 10
    while True:
        groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        if rules and all(rule.get("lastEvaluation", "").startswith("2") and rule["health"] != "unknown" for rule in rules):
            break
        assert time.monotonic() < deadline, rules
        time.sleep(0.5)
    assert {rule["name"] for rule in rules} == {rule["alert"] for g in _rule_groups() for rule in g["rules"]}
    bad = {rule["name"]: rule.get("lastError") for rule in rules if rule["health"] != "ok"}
    assert not bad, bad
