"""Scoring: neighbours -> difficulty -> tier, without models or stores."""

from __future__ import annotations

import math

import numpy as np
import pytest

from router.scoring import (
    difficulty_from_neighbors,
    label_difficulty,
    tier_for_score,
    tiers_for_scores,
    with_threshold,
)


def score(sims, labels, weighting="uniform", temperature=0.05):
    return difficulty_from_neighbors(
        np.array(sims, dtype=float), np.array(labels, dtype=float), weighting=weighting, temperature=temperature
    )


def test_uniform_is_the_mean_of_neighbour_labels():
    out = score([[0.9, 0.8, 0.7, 0.6]], [[1, 1, 0, 0]])
    assert out.tolist() == [0.5]


def test_similarity_weighting_favours_closer_neighbours():
    # Closest is large (1.0); a uniform vote would be 1/3.
    out = score([[0.9, 0.3, 0.3]], [[1, 0, 0]], weighting="similarity")
    assert out[0] == pytest.approx(0.9 / 1.5)


def test_similarity_weighting_ignores_negative_similarities():
    out = score([[0.5, -0.4]], [[0, 1]], weighting="similarity")
    assert out[0] == 0.0


def test_similarity_weighting_all_negative_falls_back_to_uniform():
    out = score([[-0.1, -0.2]], [[0, 1]], weighting="similarity")
    assert out[0] == pytest.approx(0.5)


def test_softmax_low_temperature_follows_the_nearest_neighbour():
    out = score([[0.80, 0.70, 0.69]], [[1, 0, 0]], weighting="softmax", temperature=0.01)
    assert out[0] > 0.99
    warm = score([[0.80, 0.70, 0.69]], [[1, 0, 0]], weighting="softmax", temperature=10.0)
    assert warm[0] == pytest.approx(1 / 3, abs=0.01)


def test_softmax_is_stable_for_tiny_temperatures():
    out = score([[0.99, 0.1]], [[0, 1]], weighting="softmax", temperature=1e-6)
    assert out.tolist() == [0.0]


def test_rows_are_scored_independently():
    out = score([[0.9, 0.9], [0.9, 0.9], [0.9, 0.9]], [[0, 0], [1, 1], [0, 0.5]])
    assert out.tolist() == [0.0, 1.0, 0.25]


def test_nan_marks_missing_neighbours_and_empty_rows_score_nan():
    out = score([[0.9, np.nan, np.nan], [np.nan, np.nan, np.nan]], [[1, np.nan, np.nan], [np.nan] * 3])
    assert out[0] == 1.0
    assert math.isnan(out[1])


def test_scores_stay_in_unit_interval_for_random_inputs():
    rng = np.random.default_rng(0)
    sims = rng.uniform(-1, 1, size=(200, 10))
    labels = rng.choice([0.0, 0.5, 1.0], size=(200, 10))
    for weighting in ("uniform", "similarity", "softmax"):
        out = difficulty_from_neighbors(sims, labels, weighting=weighting, temperature=0.05)
        assert out.shape == (200,)
        assert np.all((out >= 0) & (out <= 1))


def test_bad_shapes_and_options_are_rejected():
    with pytest.raises(ValueError, match="shape"):
        difficulty_from_neighbors(np.zeros((2, 3)), np.zeros((2, 2)), weighting="uniform", temperature=1)
    with pytest.raises(ValueError, match="weighting"):
        difficulty_from_neighbors(np.zeros((1, 1)), np.zeros((1, 1)), weighting="cosine", temperature=1)
    with pytest.raises(ValueError, match="temperature"):
        difficulty_from_neighbors(np.zeros((1, 1)), np.zeros((1, 1)), weighting="softmax", temperature=0)


def test_label_difficulty_follows_tier_cost_order():
    assert label_difficulty("small", ["small", "large"]) == 0.0
    assert label_difficulty("large", ["small", "large"]) == 1.0
    assert label_difficulty("medium", ["small", "medium", "large"]) == 0.5
    assert label_difficulty("b", ["a", "b", "c", "d", "e"]) == 0.25


def test_seed_labels_work_with_other_tier_names_and_medium_sits_in_the_middle():
    assert label_difficulty("medium", ["small", "large"]) == 0.5
    assert label_difficulty("large", ["cheap", "pricey"]) == 1.0
    assert label_difficulty("small", ["only"]) == 0.0


def test_unknown_label_names_the_label_and_the_fix():
    with pytest.raises(ValueError, match=r"'hard'.*--label-map"):
        label_difficulty("hard", ["small", "large"])


def test_tier_for_score_boundaries_go_up():
    assert tier_for_score(0.49, [0.5]) == 0
    assert tier_for_score(0.5, [0.5]) == 1
    assert [tier_for_score(s, [1 / 3, 2 / 3]) for s in (0.0, 0.4, 0.7, 1.0)] == [0, 1, 2, 2]
    assert tier_for_score(0.9, []) == 0


def test_vectorized_tiers_match_the_scalar_function():
    scores = np.linspace(0, 1, 101)
    thresholds = [0.25, 0.6]
    assert tiers_for_scores(scores, thresholds).tolist() == [tier_for_score(s, thresholds) for s in scores]


def test_per_request_threshold_replaces_the_top_boundary():
    assert with_threshold((0.5,), 0.62) == (0.62,)
    assert with_threshold((0.3, 0.7), 0.9) == (0.3, 0.9)
    assert with_threshold((0.3, 0.7), 0.2) == (0.2, 0.2)
    with pytest.raises(ValueError, match="within"):
        with_threshold((0.5,), 1.5)
