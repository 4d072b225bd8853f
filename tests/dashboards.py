"""The chart's Grafana dashboard as tests read it: its panels and every query with Grafana's variables filled in."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parents[1] / "helm" / "tierserve" / "dashboards" / "tierserve.json"


def panels(items: list[dict]) -> Iterator[dict]:
    """Every panel, rows' nested panels included."""
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def dashboard_queries(*, namespace: str, job: str, rate_interval: str) -> list[tuple[str, str]]:
    """(where, query) for every panel target and query variable, with Grafana's variables filled in as Grafana
    would for one selected namespace and job. `where` is "panel title / refId" or "variable NAME"."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = [(f"{p['title']} / {t['refId']}", t["expr"]) for p in panels(dashboard["panels"]) for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", var["query"]["query"])
            assert m, var["query"]
            found.append((f"variable {var['name']}", m.group(1)))
    fill = {"$__rate_interval": rate_interval, "$namespace": namespace, "$job": job}
    filled = []
    for where, expr in found:
        for var, value in fill.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"{where}: a Grafana variable the tests do not fill: {expr}"
        filled.append((where, expr))
    return filled
