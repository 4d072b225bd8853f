"""Calibration on the real MMLU split: a threshold chosen on train hits its strong-call share on test."""

from __future__ import annotations

import re

import numpy as np
import pytest
import yaml

from router.eval.calibrate import threshold_for_pgr, threshold_for_share
from router.eval.datasets import default_data_dir, load_dataset
from router.eval.runner import build_routers
from serving.cli import main
from serving.config import load_config

DATA = default_data_dir()
pytestmark = pytest.mark.skipif(
    not (DATA / "routellm").is_dir(), reason=f"shared routing data not found at {DATA} (set TIERSERVE_EVAL_DATA)"
)


@pytest.fixture(scope="module")
def mmlu():
    """MMLU with train scores (used to calibrate) and test scores (used to check) of two routers."""
    ds = load_dataset("mmlu", DATA)
    trained = build_routers(ds.train, ["heuristic", "random"], None, progress=False)
    test_prompts = ds.test["prompt"].tolist()
    test_scores = {name: r.score(test_prompts).values for name, r in trained.routers.items()}
    return ds, trained.train_scores, test_scores


@pytest.mark.parametrize("router", ["heuristic", "random"])
@pytest.mark.parametrize("target", [0.2, 0.3, 0.5])
def test_share_calibrated_on_train_holds_on_test(mmlu, router, target):
    _, train_scores, test_scores = mmlu
    cal = threshold_for_share(train_scores[router], target)
    assert cal.strong_share == pytest.approx(target, abs=0.005)
    assert np.mean(test_scores[router] >= cal.threshold) == pytest.approx(target, abs=0.02)


def test_pgr_calibration_reaches_its_target_on_train_and_roughly_on_test(mmlu):
    ds, train_scores, test_scores = mmlu
    train, test = ds.train, ds.test
    cal = threshold_for_pgr(train_scores["heuristic"], train["strong"], train["weak"], 0.5)
    assert cal.pgr >= 0.5
    scores = test_scores["heuristic"]
    strong, weak = test["strong"].to_numpy(float), test["weak"].to_numpy(float)
    pgr = (np.where(scores >= cal.threshold, strong, weak).mean() - weak.mean()) / (strong.mean() - weak.mean())
    assert pgr == pytest.approx(0.5, abs=0.1)


def test_cli_writes_the_calibrated_threshold(tmp_path, capsys):
    engine = {"engine": {"kv_cache_memory_bytes": 268435456}}
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"router": {"default_router": "heuristic"},
                                   "tiers": [{"name": "small", "model": "a", **engine},
                                             {"name": "large", "model": "b", **engine}]}))
    rc = main(["calibrate", "--dataset", "gsm8k", "--data-dir", str(DATA), "--router", "heuristic",
               "--target-strong-share", "0.3", "--config", str(cfg), "--write", "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    share = float(re.search(r"train \(637\): threshold [0-9.]+ → ([0-9.]+)% strong", out).group(1))
    assert share == pytest.approx(30.0, abs=1.0)  # heuristic scores tie, so not exactly 30
    assert "check on test (670)" in out
    [threshold] = load_config(cfg).router.thresholds
    assert 0.0 < threshold < 1.0
