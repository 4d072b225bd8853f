"""Every alert rule test under tests/promtool/ (`<AlertName>.yaml`) passes `promtool test rules` against the
chart's rendered rule group, and the group passes `promtool check rules`. Uses test_helm.py's real helm."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import test_helm
import yaml
from test_helm import CHART, NAMESPACE, RELEASE, REPO

helm = test_helm.helm
TESTS = sorted((REPO / "tests" / "promtool").glob("*.yaml"))


@pytest.fixture(scope="module")
def rules_dir(helm: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("promtool") is None:
        pytest.skip("no promtool (Debian package prometheus; deploy/system-deps.sh installs it)")
    out = subprocess.run([str(helm), "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--set",
                          "metrics.prometheusRule.enabled=true", "--show-only", "templates/prometheusrule.yaml"],
                         capture_output=True, text=True, check=True).stdout
    folder = tmp_path_factory.mktemp("promtool")
    (folder / "rules.yaml").write_text(yaml.safe_dump(yaml.safe_load(out)["spec"]))
    check = subprocess.run(["promtool", "check", "rules", str(folder / "rules.yaml")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    return folder


@pytest.mark.parametrize("test_file", TESTS, ids=[t.stem for t in TESTS])
def test_alert_fires_and_stays_silent_as_its_promtool_test_says(rules_dir: Path, test_file: Path) -> None:
    rules = yaml.safe_load((rules_dir / "rules.yaml").read_text())
    alerts = {r.get("alert") for g in rules["groups"] for r in g["rules"]}
    assert test_file.stem in alerts, f"{test_file.name} names no alert of the chart ({sorted(alerts)})"
    shutil.copy(test_file, rules_dir / test_file.name)
    run = subprocess.run(["promtool", "test", "rules", test_file.name], cwd=rules_dir, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stdout + run.stderr
