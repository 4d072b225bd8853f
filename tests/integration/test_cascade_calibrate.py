"""`tierserve calibrate --cascade` end to end: labelled plaut-msp data (train chooses, test checks) and the
query log's recorded confidences (older records choose, the latest check)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import yaml

from router.eval.datasets import default_data_dir
from serving.cli import main
from serving.config import load_config
from serving.querylog import QueryLog, QueryRecord

DATA = default_data_dir()
PLAUT = DATA / "cascades" / "plaut-msp" / "llama3_8b_to_70b.jsonl"
needs_plaut = pytest.mark.skipif(not PLAUT.is_file(), reason=f"plaut-msp data not found at {PLAUT}")


def _config(tmp_path):
    tier = {"engine": {"kv_cache_memory_bytes": 268435456}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"tiers": [{"name": "small", "model": "m1", **tier},
                                              {"name": "large", "model": "m2", **tier}],
                                    "cascade": {"enabled": True, "threshold": 0.8}}))
    return path


@needs_plaut
@pytest.mark.parametrize("target", [0.2, 0.3, 0.5])
def test_threshold_for_a_rate_holds_on_the_test_split_and_is_written(tmp_path, capsys, target):
    cfg = _config(tmp_path)
    rc = main(["calibrate", "--cascade", "--dataset", "plaut-msp", "--target-escalation-rate", str(target),
               "--config", str(cfg), "--write", "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    cascade = load_config(cfg).cascade
    threshold = cascade.tier_thresholds["small"]
    assert cascade.target_rate_for("small") == target
    assert (tmp_path / "cfg.yaml.bak").is_file()
    test = pd.read_json(PLAUT, lines=True).query("split == 'test'")
    held_out = float(np.mean(test["weak_confidence"] < threshold))  # checked independently of the CLI
    assert held_out == pytest.approx(target, abs=0.02)
    assert f"held out (1947): {held_out:.1%} escalated, target {target:.1%} (within" in out


@needs_plaut
def test_threshold_for_a_quality_target(tmp_path, capsys):
    rc = main(["calibrate", "--cascade", "--dataset", "plaut-msp", "--target-pgr", "0.5", "--tier", "small",
               "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    pgr = float(re.search(r"held out \(1947\): .*PGR ([0-9.]+)", out).group(1))
    assert pgr == pytest.approx(0.5, abs=0.08)
    rate = float(re.search(r"→ ([0-9.]+)% escalated", out).group(1))
    assert 25 < rate < 45  # README: the confidence cascade needs ~35% strong calls for half the gap


def _log(tmp_path, confidences):
    log = QueryLog(tmp_path / "log")
    for i, c in enumerate(confidences):
        up = bool(c < 0.5)
        log.append(QueryRecord(request_id=str(i), router="knn", tier="large" if up else "small",
                               tier_chain=("small", "large") if up else ("small",), escalated=up,
                               confidences=(float(c),), cascade_thresholds=(0.5,), timestamp=1.7e9 + 60 * i))
    log.close()
    return tmp_path / "log"


def test_from_the_query_log_with_a_held_out_tail(tmp_path, capsys):
    conf = np.random.default_rng(0).beta(4, 2, 3000)
    log = _log(tmp_path, conf)
    cfg = _config(tmp_path)
    rc = main(["calibrate", "--cascade", "--from-querylog", str(log), "--target-escalation-rate", "0.25",
               "--config", str(cfg), "--write"])
    assert rc == 0
    out = capsys.readouterr().out
    threshold = load_config(cfg).cascade.tier_thresholds["small"]
    assert np.mean(conf[:2100] < threshold) == pytest.approx(0.25, abs=0.001)
    assert np.mean(conf[2100:] < threshold) == pytest.approx(0.25, abs=0.03)
    assert "held out (900)" in out


def test_too_discrete_scores_warn_for_cascades_and_routers(tmp_path, capsys):
    conf = np.random.default_rng(1).choice([0.2, 0.6, 0.9], size=600, p=[0.45, 0.35, 0.2])
    log = _log(tmp_path, conf)
    assert main(["calibrate", "--cascade", "--from-querylog", str(log), "--target-escalation-rate", "0.3"]) == 0
    err = capsys.readouterr().err
    assert "too discrete to hit 30.0%" in err
    # a kNN router with k=10 and uniform weights logs scores in steps of 0.05
    scores = np.random.default_rng(2).binomial(10, 0.3, 600) / 10 * 0.5 + 0.25
    router_log = QueryLog(tmp_path / "rlog")
    for i, s in enumerate(scores):
        router_log.append(QueryRecord(request_id=str(i), router="knn", tier="small", score=float(s),
                                      timestamp=1.7e9 + i))
    router_log.close()
    assert main(["calibrate", "--from-querylog", str(tmp_path / "rlog"), "--router", "knn",
                 "--target-strong-share", "0.3"]) == 0
    captured = capsys.readouterr()
    share = float(re.search(r"→ ([0-9.]+)% strong", captured.out).group(1))
    achievable = [np.mean(scores >= v) * 100 for v in np.unique(scores)]
    assert share == pytest.approx(min(achievable, key=lambda a: abs(a - 30.0)), abs=0.05)  # the nearest tie
    assert abs(share - 30.0) > 2.0 and "too discrete to hit 30.0%" in captured.err
