"""Exact top-k search: ties at the cut, and the re-rank that makes an approximate first pass exact."""

from __future__ import annotations

import numpy as np

from router.knn import nearest_neighbors, rerank_within_bound


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def test_ties_at_the_kth_place_keep_the_lowest_indices() -> None:
    rng = np.random.default_rng(3)
    exemplars = _unit(rng.standard_normal((500, 32)))
    query = exemplars[:1].copy()
    sims = (query @ exemplars.T)[0]
    fourth = int(np.argsort(-sims)[3])
    # Five exact copies of the 4th-best exemplar, spread over the index range: with k=4 only the lowest may win.
    copies = [450, 20, 300, 7, 499]
    exemplars[copies] = exemplars[fourth]
    want = sorted([fourth, *copies])[0]
    _, idx = nearest_neighbors(query, exemplars, 4)
    assert idx[0][3] == want
    # Every k: ties (five copies) are listed lowest index first and the cut takes the lowest ones.
    for k in range(1, 12):
        _, idx = nearest_neighbors(query, exemplars, k)
        tied = [i for i in idx[0] if i in {fourth, *copies}]
        assert tied == sorted({fourth, *copies})[: len(tied)]


def test_rerank_within_bound_gives_the_exact_neighbours_from_a_noisy_first_pass() -> None:
    rng = np.random.default_rng(4)
    exemplars = _unit(rng.standard_normal((3000, 64)) + 2.0)  # clustered: many close similarities
    exemplars[2500] = exemplars[10]  # an exact tie
    queries = _unit(np.concatenate([exemplars[[10, 77]], rng.standard_normal((6, 64)) + 2.0]))
    exact = queries @ exemplars.T
    bound = np.full(len(queries), 0.02)
    noisy = exact + rng.uniform(-0.02, 0.02, exact.shape)  # within the bound, never beyond
    for k in (1, 5, 10):
        kth = -np.sort(-noisy, axis=1)[:, k - 1]
        sims, idx = rerank_within_bound(queries, exemplars, noisy, kth_approx=kth, bound=bound, k=k)
        want_sims, want_idx = nearest_neighbors(queries, exemplars, k)
        assert np.array_equal(idx, want_idx)
        assert np.allclose(sims, want_sims, atol=1e-6)
    _, idx = rerank_within_bound(queries[:1], exemplars, noisy[:1], kth_approx=-np.sort(-noisy[:1], axis=1)[:, 2],
                                 bound=bound[:1], k=3)
    assert list(idx[0][:2]) == [10, 2500]


def test_a_bound_too_small_for_the_noise_can_miss_a_neighbour() -> None:
    """The re-rank is exact because of the bound: with noise beyond it the answer can differ (so the test above
    tests something)."""
    rng = np.random.default_rng(5)
    exemplars = _unit(rng.standard_normal((3000, 64)) + 2.0)
    queries = _unit(rng.standard_normal((20, 64)) + 2.0)
    exact = queries @ exemplars.T
    noisy = exact + rng.uniform(-0.05, 0.05, exact.shape)
    kth = -np.sort(-noisy, axis=1)[:, 9]
    _, idx = rerank_within_bound(queries, exemplars, noisy, kth_approx=kth, bound=np.zeros(len(queries)), k=10)
    _, want_idx = nearest_neighbors(queries, exemplars, 10)
    assert not np.array_equal(idx, want_idx)


def test_a_first_pass_without_usable_scores_falls_back_to_the_full_product() -> None:
    rng = np.random.default_rng(6)
    exemplars = _unit(rng.standard_normal((200, 16)))
    queries = _unit(rng.standard_normal((2, 16)))
    approx = np.full((2, 200), np.nan)  # e.g. a NaN from the first pass: no candidate passes the bound
    sims, idx = rerank_within_bound(queries, exemplars, approx, kth_approx=np.full(2, np.nan), bound=np.ones(2), k=5)
    want_sims, want_idx = nearest_neighbors(queries, exemplars, 5)
    assert np.array_equal(idx, want_idx) and np.allclose(sims, want_sims)
