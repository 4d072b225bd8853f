"""The chart's alert rules and the dashboard's queries, checked by Prometheus' own promtool.

- `promtool check rules` parses the rendered PrometheusRule's groups with the real PromQL parser.
- `promtool check rules` also parses every dashboard query (Grafana's variables filled in), as recording rules.
- `promtool test rules` runs tests/promtool/<AlertName>.yaml for every alert: each file feeds series that should
  fire the alert and series that should not, and states the alert's labels and rendered annotations.
The live check (every panel's query returns data from a real Prometheus scraping the stack) is
tests/e2e/test_prometheus.py.

promtool comes with Debian's `prometheus` package (deploy/system-deps.sh installs it; `make test` runs that).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import test_helm
import yaml
from test_helm import REPO, _one

from tests.dashboards import dashboard_queries

helm = test_helm.helm
render = test_helm.render

PROMTOOL_TESTS = REPO / "tests" / "promtool"
RULES_ENABLED = {"metrics": {"prometheusRule": {"enabled": True}}}
"""The chart's defaults with the rules on: the thresholds and selector the test files are written for."""


@pytest.fixture(scope="session")
def promtool() -> Path:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("no promtool: install Debian's prometheus package (deploy/system-deps.sh, run by `make test`)")
    return Path(path)


def _run(promtool: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(promtool), *args], check=False, cwd=cwd, capture_output=True, text=True, timeout=60)


def rule_groups(render, values: dict | None = None) -> list[dict]:
    """The rendered PrometheusRule's groups: what a Prometheus rule file holds."""
    return _one(render([], values or RULES_ENABLED), "PrometheusRule")["spec"]["groups"]


def alert_names(groups: list[dict]) -> set[str]:
    return {rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule}


def write_rules(directory: Path, groups: list[dict]) -> Path:
    path = directory / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False, width=1000))
    return path


def test_the_rendered_rules_pass_promtool_check(promtool: Path, render, tmp_path: Path) -> None:
    groups = rule_groups(render)
    write_rules(tmp_path, groups)
    proc = _run(promtool, "check", "rules", "rules.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(alert_names(groups))} rules found" in proc.stdout


def test_promtool_check_refuses_a_broken_rule(promtool: Path, render, tmp_path: Path) -> None:
    """The check above can fail: the same rules with one bracket dropped are refused."""
    groups = rule_groups(render)
    rule = groups[0]["rules"][0]
    rule["expr"] = rule["expr"].replace(")", "", 1)
    write_rules(tmp_path, groups)
    proc = _run(promtool, "check", "rules", "rules.yaml", cwd=tmp_path)
    assert proc.returncode != 0
    assert "parse error" in proc.stdout + proc.stderr


def test_every_dashboard_query_parses(promtool: Path, tmp_path: Path) -> None:
    """Each panel's query and each variable's query, as Grafana sends them, through the real PromQL parser."""
    queries = dashboard_queries(namespace="llm", job="tierserve-serve", rate_interval="1m")
    rules = [{"record": f"dashboard:query_{i}", "expr": expr} for i, (_, expr) in enumerate(queries)]
    (tmp_path / "dashboard.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = _run(promtool, "check", "rules", "dashboard.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rules)} rules found" in proc.stdout


# ---- promtool test rules: one file per alert ------------------------------------------------------------


def _test_files() -> dict[str, Path]:
    return {path.stem: path for path in sorted(PROMTOOL_TESTS.glob("*.yaml"))}


def test_every_alert_has_its_promtool_test_file(render) -> None:
    alerts = alert_names(rule_groups(render))
    files = _test_files()
    assert not alerts - set(files), f"alerts without tests/promtool/<AlertName>.yaml: {sorted(alerts - set(files))}"
    assert not set(files) - alerts, f"tests/promtool files naming no alert of the chart: {sorted(set(files) - alerts)}"


@pytest.mark.parametrize("name", list(_test_files()))
def test_each_file_fires_its_alert_and_stays_silent_where_it_should(name: str) -> None:
    spec = yaml.safe_load(_test_files()[name].read_text())
    assert spec["rule_files"] == ["rules.yaml"], "the test renders the chart's rules into rules.yaml"
    cases = [case for group in spec["tests"] for case in group.get("alert_rule_test", [])]
    assert {case["alertname"] for case in cases} == {name}, f"{name}.yaml tests other alerts"
    fires = [group for group in spec["tests"] if any(c.get("exp_alerts") for c in group.get("alert_rule_test", []))]
    silent = [group for group in spec["tests"] if all(not c.get("exp_alerts") for c in group["alert_rule_test"])]
    assert fires, f"{name}.yaml never expects the alert to fire"
    assert silent, f"{name}.yaml has no input that must leave the alert silent"
    for case in cases:
        for alert in case.get("exp_alerts") or []:  # what an on-call engineer reads
            assert alert["exp_annotations"]["summary"] and alert["exp_annotations"]["description"], name


@pytest.mark.parametrize("name", list(_test_files()))
def test_promtool_unit_tests_pass(promtool: Path, render, tmp_path: Path, name: str) -> None:
    write_rules(tmp_path, rule_groups(render))
    shutil.copy(_test_files()[name], tmp_path / f"{name}.yaml")
    proc = _run(promtool, "test", "rules", f"{name}.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_promtool_unit_tests_fail_when_the_thresholds_move(promtool: Path, render, tmp_path: Path) -> None:
    """The unit tests can fail: with every threshold out of reach, no alert they expect fires."""
    out_of_reach = {
        **RULES_ENABLED,
        "alerts": {"errorRatio": 0.99, "rejectionsPerSecond": 1000, "kvCacheUsage": 0.999,
                   "routerFallbackRatio": 0.99, "routerBusyRatio": 0.99, "escalationDriftPoints": 90,
                   "qualityFloorMarginPoints": 90},
    }  # fmt: skip
    write_rules(tmp_path, rule_groups(render, out_of_reach))
    for name, path in _test_files().items():
        shutil.copy(path, tmp_path / path.name)
        proc = _run(promtool, "test", "rules", path.name, cwd=tmp_path)
        assert proc.returncode != 0, f"{name}: promtool passed with the alert out of reach:\n{proc.stdout}"
        out = proc.stdout + proc.stderr
        assert re.search(rf"alertname: {name}, time: .*\n\s*exp:\[\s*0:.*got:\[\]", out, re.DOTALL), out
