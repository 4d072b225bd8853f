"""The Grafana dashboard and the Prometheus alert rules query metrics that exist, with labels they have.

There is no promtool here: PromQL is checked by a small lexer (balanced brackets; every metric name is one
serving/metrics.py declares, or a ray_vllm_* engine metric (vLLM's own, through Ray's metrics agent); label matchers and `by (...)` labels exist on the
metrics they apply to). Rules are also checked for `for`, a severity and a summary, and the drift threshold
is followed from values to the expression.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator

import pytest
import test_helm
import yaml
from test_helm import CHART, NAMESPACE, REPO, SCENARIOS, _one

# The real-helm fixtures of test_helm.py (helm found or fetched once, renders cached per scenario).
helm = test_helm.helm
render = test_helm.render

DASHBOARD = CHART / "dashboards" / "tierserve.json"
METRICS_PY = REPO / "serving" / "metrics.py"

# Metrics the escalation-drift rule and panels use that serving/metrics.py may not declare yet (they were
# being added alongside this chart work). Declared names win over these; test_pending_metrics_agree_with_metrics_py
# checks the labels assumed here against metrics.py once a name is there, and the entry can then go.
PENDING_METRICS: dict[str, tuple[str, ...]] = {
    "tierserve_cascade_decisions_total": ("tier", "outcome"),  # counter; outcome: kept | escalated
    "tierserve_cascade_escalation_target": ("tier",),  # gauge, ratio 0..1
}
# Labels Prometheus adds to every scraped series (target labels of the ServiceMonitor's endpoints).
TARGET_LABELS = {"job", "namespace", "service", "pod", "instance", "endpoint", "container"}

_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
             "group_right", "inf", "nan", "atan2"}  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_IDENT = re.compile(r"(?<![\w.:$])[a-zA-Z_:][a-zA-Z0-9_:]*")
_CLAUSE = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^{}]*)\}")


# ---- what tierserve exports --------------------------------------------------------------------------------


def _declared_metrics() -> dict[str, tuple[str, ...]]:
    """Series names serving/metrics.py exports -> their label names, read from its Counter/Gauge/Histogram calls."""
    series: dict[str, tuple[str, ...]] = {}
    for call in ast.walk(ast.parse(METRICS_PY.read_text())):
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)):
            continue
        kind = call.func.id
        if kind not in ("Counter", "Gauge", "Histogram"):
            continue
        name = ast.literal_eval(call.args[0])
        labels = next((tuple(ast.literal_eval(k.value)) for k in call.keywords if k.arg == "labelnames"), ())
        if kind == "Counter":
            series[name if name.endswith("_total") else f"{name}_total"] = labels
        elif kind == "Histogram":
            series.update({f"{name}_bucket": (*labels, "le"), f"{name}_sum": labels, f"{name}_count": labels})
        else:
            series[name] = labels
    return series


DECLARED = _declared_metrics()
KNOWN = {**PENDING_METRICS, **DECLARED}


# ---- a small PromQL lexer --------------------------------------------------------------------------------


def _balanced(expr: str) -> bool:
    stack, pairs = [], {")": "(", "]": "[", "}": "{"}
    for ch in _STRING.sub('""', expr):
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs and (not stack or stack.pop() != pairs[ch]):
            return False
    return not stack


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (not functions, keywords, labels or durations)."""
    s = _STRING.sub('""', expr)
    s = re.sub(r"\{[^{}]*\}", " ", s)
    s = re.sub(r"\[[^\[\]]*\]", " ", s)
    s = _CLAUSE.sub(" ", s)
    return {
        m.group()
        for m in _IDENT.finditer(s)
        if m.group() not in _KEYWORDS and not s[m.end() :].lstrip().startswith("(")
    }


def _group_after(s: str, start: int) -> str:
    """The balanced (...) group starting at s[start] == "("."""
    depth = 0
    for i in range(start, len(s)):
        depth += {"(": 1, ")": -1}.get(s[i], 0)
        if depth == 0:
            return s[start : i + 1]
    raise AssertionError(f"unbalanced: {s[start:]}")


def label_problems(expr: str) -> list[str]:
    """Label matchers and `by (...)` labels that the selected tierserve metrics do not have."""
    s = _STRING.sub('""', expr)
    problems = []
    for m in _SELECTOR.finditer(s):
        name, matchers = m.groups()
        if name not in KNOWN:
            continue
        for label in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers):
            if label not in KNOWN[name] and label not in TARGET_LABELS:
                problems.append(f"{name} has no label {label!r}")
    for m in re.finditer(r"\bby\s*\(([^()]*)\)\s*", s):
        if m.end() >= len(s) or s[m.end()] != "(":
            problems.append(f"write `agg by (...) (expr)`, not `agg(expr) by (...)`: {expr}")
            continue
        inner = _group_after(s, m.end())
        names = {n for n in metric_names(inner) if n in KNOWN}
        for label in filter(None, (x.strip() for x in m.group(1).split(","))):
            missing = [n for n in names if label not in KNOWN[n] and label not in TARGET_LABELS]
            if missing:
                problems.append(f"by ({label}) over {missing}, which lack it")
    return problems


def expr_problems(expr: str) -> list[str]:
    problems = [] if _balanced(expr) else [f"unbalanced brackets: {expr}"]
    names = metric_names(expr)
    if not names:
        problems.append(f"selects no metric: {expr}")
    for name in names:
        if name not in KNOWN and not name.startswith("ray_vllm_"):
            problems.append(f"unknown metric {name!r} (not in serving/metrics.py, not ray_vllm_*)")
    return problems + label_problems(expr)


def test_the_lexer_catches_mistakes() -> None:
    """The checks above must be able to fail."""
    assert expr_problems('sum by (tier) (rate(tierserve_requests_total{status=~"5.."}[5m]))') == []
    assert expr_problems("rate(tierserve_request_total[5m])")  # typo
    assert expr_problems("sum(rate(tierserve_requests_total[5m])")  # unbalanced
    assert expr_problems('rate(tierserve_router_fallbacks_total{tier="small"}[5m])')  # no such label
    assert expr_problems("sum by (tier) (rate(tierserve_router_fallbacks_total[5m]))")  # nor here
    assert expr_problems("histogram_quantile(0.99, sum by (le) (rate(tierserve_time_to_first_token_seconds[5m])))")
    assert not expr_problems(
        "histogram_quantile(0.99, sum by (tier, le) (rate(tierserve_time_to_first_token_seconds_bucket[5m])))"
    )
    assert metric_names('max by (model_name) (ray_vllm_kv_cache_usage_perc{namespace=~"$ns"}) > 1e3') == {
        "ray_vllm_kv_cache_usage_perc"
    }
    assert metric_names("abs(a - on (tier) b) > 0.1 and on (tier) c >= 100") == {"a", "b", "c"}


def test_metrics_py_is_read() -> None:
    assert DECLARED["tierserve_requests_total"] == ("endpoint", "tier", "status")
    assert DECLARED["tierserve_time_to_first_token_seconds_bucket"] == ("tier", "le")
    assert DECLARED["tierserve_engine_kv_cache_usage_ratio"] == ("tier",)


def test_pending_metrics_agree_with_metrics_py() -> None:
    for name, labels in PENDING_METRICS.items():
        if name in DECLARED:
            assert DECLARED[name] == labels, (
                f"{name} is declared with labels {DECLARED[name]}; the rules expect {labels}"
            )


# ---- the dashboard -------------------------------------------------------------------------------------------


def _panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _exprs(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in _panels(dashboard["panels"]) for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", var["query"]["query"])
            assert m, var["query"]
            exprs.append(m.group(1))
    return exprs


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


def test_dashboard_queries_use_known_metrics_and_labels(dashboard: dict) -> None:
    problems = {expr: errs for expr in _exprs(dashboard) if (errs := expr_problems(expr))}
    assert not problems, yaml.safe_dump(problems, width=200)


def test_dashboard_shows_every_tierserve_metric(dashboard: dict) -> None:
    used = set().union(*(metric_names(e) for e in _exprs(dashboard)))
    families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in KNOWN}
    shown = {f for f in families if any(u == f or u.startswith(f + "_") for u in used)}
    assert families - shown == set(), "metrics with no panel"
    assert any(u.startswith("ray_vllm_") for u in used), "the optional vLLM engine panels are gone"


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


def test_alert_rules_are_complete_and_query_known_metrics(render) -> None:
    rules = _rules(render(*SCENARIOS["ci-monitoring"]))
    assert set(rules) == {
        "TierserveHighErrorRatio", "TierserveRejectingRequests", "TierserveKvCacheNearlyFull",
        "TierserveRouterFallingBack", "TierserveRouterBusy", "TierserveEscalationRateDrift",
        "TierserveCascadeBelowQualityFloor",
    }  # fmt: skip
    for name, rule in rules.items():
        assert re.fullmatch(r"([0-9]+(ms|s|m|h|d|w|y))+", rule["for"]), name
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["labels"]["team"] == "llm-platform", name  # alerts.labels from the scenario
        assert rule["annotations"]["summary"].strip() and rule["annotations"]["description"].strip(), name
        assert _balanced(rule["annotations"]["summary"]), name
        assert expr_problems(rule["expr"]) == [], name
        # Every selector is scoped to this release's series, as the ServiceMonitor labels them.
        selectors = _SELECTOR.findall(rule["expr"])
        assert selectors and all(
            'job="tierserve-serve"' in m and f'namespace="{NAMESPACE}"' in m for _, m in selectors
        ), name
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
