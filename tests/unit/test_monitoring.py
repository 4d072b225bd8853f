"""The Grafana dashboard and the alert rules: their structure, and that they cover what tierserve exports.

PromQL itself is checked by Prometheus: `promtool check rules` parses the rules and every dashboard query and
`promtool test rules` fires each alert (test_promtool.py); a real Prometheus scraping the live stack answers
every panel's query (tests/e2e/test_prometheus.py). Here: datasources, ids and layout of the panels, a panel
for every metric serving/metrics.py declares, the panels the monitoring issue asked for, rules with `for`, a
severity and a summary, scoped to the release's series, and thresholds followed from values.
"""

from __future__ import annotations

import ast
import json
import re

import pytest
import test_helm
from test_helm import NAMESPACE, REPO, SCENARIOS, _one

from tests.dashboards import DASHBOARD
from tests.dashboards import panels as _panels

# The real-helm fixtures of test_helm.py (helm found or fetched once, renders cached per scenario).
helm = test_helm.helm
render = test_helm.render

METRICS_PY = REPO / "serving" / "metrics.py"
_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^{}]*)\}")


def declared_metrics() -> dict[str, tuple[str, ...]]:
    """Metric families serving/metrics.py declares (as exported: counters end in _total) -> their label names."""
    families: dict[str, tuple[str, ...]] = {}
    for call in ast.walk(ast.parse(METRICS_PY.read_text())):
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)):
            continue
        if call.func.id not in ("Counter", "Gauge", "Histogram"):
            continue
        name = ast.literal_eval(call.args[0])
        if call.func.id == "Counter" and not name.endswith("_total"):
            name += "_total"
        families[name] = next((tuple(ast.literal_eval(k.value)) for k in call.keywords if k.arg == "labelnames"), ())
    return families


def test_metrics_py_is_read() -> None:
    declared = declared_metrics()
    assert declared["tierserve_requests_total"] == ("endpoint", "tier", "status")
    assert declared["tierserve_time_to_first_token_seconds"] == ("tier",)
    assert declared["tierserve_engine_kv_cache_usage_ratio"] == ("tier",)


# ---- the dashboard -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in _panels(dashboard["panels"]) for t in p.get("targets", [])]


def test_every_panel_has_a_datasource_and_queries(dashboard: dict) -> None:
    assert dashboard["uid"] == "tierserve" and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = [p for p in _panels(dashboard["panels"]) if p["type"] != "row"]
    assert len(panels) >= 20
    ids = [p["id"] for p in _panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"] == panel["datasource"], panel["title"]
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys() and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24


def test_dashboard_shows_every_tierserve_metric(dashboard: dict) -> None:
    text = "\n".join(_exprs(dashboard))
    unshown = [f for f in declared_metrics() if not re.search(rf"\b{f}(_bucket|_sum|_count)?\b", text)]
    assert unshown == [], "metrics with no panel"
    assert "ray_vllm_" in text, "the optional vLLM engine panels are gone"


def test_dashboard_has_the_issue_panels(dashboard: dict) -> None:
    by_title = {
        p["title"]: [t["expr"] for t in p["targets"]] for p in _panels(dashboard["panels"]) if p["type"] != "row"
    }
    ttft = next(exprs for title, exprs in by_title.items() if "first token" in title and "vLLM" not in title)
    assert any(
        e.startswith("histogram_quantile(0.5, sum by (tier, le) (rate(tierserve_time_to_first_token_seconds_bucket")
        for e in ttft
    )
    assert any(
        e.startswith("histogram_quantile(0.99, sum by (tier, le) (rate(tierserve_time_to_first_token_seconds_bucket")
        for e in ttft
    )
    wanted = {  # words in a panel title -> a metric that panel must query
        "request rate": "tierserve_requests_total",
        "tokens/s": "tierserve_tokens_total",
        "end-to-end latency": "tierserve_request_latency_seconds_bucket",
        "kv-cache": "tierserve_engine_kv_cache_usage_ratio",
        "running / waiting": "tierserve_engine_waiting_requests",
        "routing decisions": "tierserve_routing_decisions_total",
        "routing overhead": "tierserve_routing_overhead_seconds_bucket",
        "router fallbacks": "tierserve_router_fallbacks_total",
        "cascade escalations": "tierserve_cascade_escalations_total",
        "escalation rate": "tierserve_cascade_escalation_target",
        "capacity moves": "tierserve_capacity_moves_total",
        "rejections": "tierserve_rejections_total",
        "client aborts": "tierserve_client_aborts_total",
    }
    for words, metric in wanted.items():
        titles = [t for t in by_title if words in t.lower() and "vllm" not in t.lower()]
        assert titles, f"no panel titled like {words!r}"
        assert any(metric in e for t in titles for e in by_title[t]), f"{titles} do not query {metric}"


def test_dashboard_configmap_ships_the_file(render) -> None:
    objects = render(*SCENARIOS["ci-monitoring"])
    configmap = _one(objects, "ConfigMap", "tierserve-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "LLM"}
    (name,) = configmap["data"]
    assert name.endswith(".json") and json.loads(configmap["data"][name]) == json.loads(DASHBOARD.read_text())
    assert not [o for o in render(*SCENARIOS["default"]) if o["metadata"]["name"] == "tierserve-dashboard"]


# ---- the alert rules -------------------------------------------------------------------------------------------


def _rules(objects: list[dict]) -> dict[str, dict]:
    rule = _one(objects, "PrometheusRule")
    return {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}


def test_alert_rules_are_complete_and_scoped_to_the_release(render) -> None:
    rules = _rules(render(*SCENARIOS["ci-monitoring"]))
    assert set(rules) == {
        "TierserveHighErrorRatio", "TierserveRejectingRequests", "TierserveKvCacheNearlyFull",
        "TierserveRouterFallingBack", "TierserveRouterBusy", "TierserveEscalationRateDrift",
        "TierserveCascadeBelowQualityFloor",
    }  # fmt: skip
    declared = declared_metrics()
    for name, rule in rules.items():
        assert re.fullmatch(r"([0-9]+(ms|s|m|h|d|w|y))+", rule["for"]), name
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["labels"]["team"] == "llm-platform", name  # alerts.labels from the scenario
        assert rule["annotations"]["summary"].strip() and rule["annotations"]["description"].strip(), name
        # Every selector is a tierserve metric scoped to this release's series, as the ServiceMonitor labels them.
        selectors = _SELECTOR.findall(rule["expr"])
        assert selectors and all(
            'job="tierserve-serve"' in m and f'namespace="{NAMESPACE}"' in m for _, m in selectors
        ), name
        assert all(metric in declared for metric, _ in selectors), name
    monitor = _one(render(*SCENARIOS["ci-monitoring"]), "ServiceMonitor")
    assert "jobLabel" not in monitor["spec"]  # so job = the Serve Service's name, which the rules select on


def test_rules_follow_the_thresholds_in_values(render) -> None:
    values = {"metrics": {"prometheusRule": {"enabled": True}},
              "alerts": {"escalationDriftPoints": 15, "escalationWindow": "2h", "escalationMinDecisions": 40,
                         "kvCacheUsage": 0.9, "errorRatio": 0.02, "selector": 'job="llm", cluster="eu-1"'}}  # fmt: skip
    rules = _rules(render([], values))
    drift = rules["TierserveEscalationRateDrift"]["expr"]
    assert re.search(r"\)\s*> 0\.15\s*\)", drift), drift
    assert "[2h]" in drift and ">= 40" in drift
    assert 'outcome="escalated"' in drift and "tierserve_cascade_escalation_target" in drift
    assert "abs(" in drift and "- on (tier) max by (tier) (tierserve_cascade_escalation_target" in drift
    assert rules["TierserveKvCacheNearlyFull"]["expr"].rstrip().endswith("> 0.9")
    assert rules["TierserveHighErrorRatio"]["expr"].rstrip().endswith("> 0.02")
    assert all('{job="llm", cluster="eu-1"' in r["expr"] for r in rules.values())


def test_no_rules_unless_enabled(render) -> None:
    assert not [o for o in render(*SCENARIOS["default"]) if o["kind"] == "PrometheusRule"]
