"""Threshold calibration on hand-made scores, and writing the threshold into a config file."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from router.eval.calibrate import threshold_for_pgr, threshold_for_share
from serving.cli.calibrate import write_threshold
from serving.config import load_config


def test_share_threshold_sits_between_neighbours():
    scores = [0.9, 0.1, 0.5, 0.7, 0.3]
    c = threshold_for_share(scores, 0.4)  # top 2 of 5: 0.9 and 0.7
    assert c.threshold == pytest.approx(0.6)
    assert c.strong_share == pytest.approx(0.4)
    assert threshold_for_share(scores, 0.0).strong_share == 0.0
    assert threshold_for_share(scores, 1.0).strong_share == 1.0


def test_share_threshold_on_continuous_scores_is_exact():
    scores = np.random.default_rng(0).random(1000)
    for target in (0.1, 0.3, 0.55):
        c = threshold_for_share(scores, target)
        assert np.mean(scores >= c.threshold) == pytest.approx(target)


def test_pgr_threshold_is_the_cheapest_that_reaches_the_target():
    # sorted by score: gains (strong - weak) are 1, 0, 1, -1, 1; total gap = 2/5
    scores = [0.9, 0.8, 0.7, 0.6, 0.5]
    strong = [1, 1, 1, 0, 1]
    weak = [0, 1, 0, 1, 0]
    c = threshold_for_pgr(scores, strong, weak, 0.5)
    assert c.strong_share == pytest.approx(0.2) and c.pgr == pytest.approx(0.5)
    c = threshold_for_pgr(scores, strong, weak, 0.9)  # needs the top 3 (PGR 1.0)
    assert c.threshold == pytest.approx(0.65) and c.pgr == pytest.approx(1.0)
    with pytest.raises(ValueError, match="undefined"):
        threshold_for_pgr(scores, weak, strong, 0.5)


def test_pgr_threshold_never_cuts_between_tied_scores():
    c = threshold_for_pgr([0.5, 0.5, 0.1], [1, 1, 1], [0, 0, 0], 0.3)
    assert c.strong_share == pytest.approx(2 / 3)


def _config(tmp_path, thresholds=None):
    tier = {"engine": {"kv_cache_memory_bytes": 268435456}}
    data = {"tiers": [{"name": "small", "model": "m1", **tier}, {"name": "large", "model": "m2", **tier}]}
    if thresholds is not None:
        data["router"] = {"thresholds": thresholds}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_write_threshold_updates_and_validates(tmp_path):
    path = _config(tmp_path)
    write_threshold(path, 0.4123456789)
    assert load_config(path).router.thresholds == [0.412346]
    assert (tmp_path / "cfg.yaml.bak").is_file()
    with pytest.raises(ValueError, match="thresholds"):
        write_threshold(path, 1.5)
    assert load_config(path).router.thresholds == [0.412346]  # a bad value never reaches the file


def test_write_threshold_refuses_a_single_tier(tmp_path):
    path = tmp_path / "one.yaml"
    path.write_text(yaml.safe_dump({"tiers": [{"name": "small", "model": "m"}]}))
    with pytest.raises(ValueError, match="two tiers"):
        write_threshold(path, 0.5)
