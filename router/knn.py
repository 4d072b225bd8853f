"""Exact top-k cosine neighbours by matrix product: the one kNN search of the embedded store's in-memory
matrix (`router.store`) and of evaluation over a train split."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Search = Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray]]
"""(unit queries, unit exemplars, k) -> (similarities, indices), both (n, min(k, len(exemplars))), best first,
ties by exemplar index: `nearest_neighbors`, or `router.embed.onnx_search.OnnxSearch` on the embedder's pool."""


def nearest_neighbors(
    queries: np.ndarray, exemplars: np.ndarray, k: int, *, exclude_self: bool = False, chunk: int = 2048
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k cosine neighbours of unit vectors: (similarities, indices), both (n, k), best first.

    Equal similarities keep the exemplars' order (lower index first), so results do not depend on how
    `argpartition` happened to arrange them. `exclude_self` drops each query's own row (queries ==
    exemplars), for leave-one-out scoring on train. Fewer than k exemplars: all of them.
    """
    k_eff = max(0, min(k, len(exemplars) - (1 if exclude_self else 0)))
    dtype = np.result_type(queries.dtype, exemplars.dtype, np.float32)
    sims_out = np.empty((len(queries), k_eff), dtype=dtype)
    idx_out = np.empty((len(queries), k_eff), dtype=np.int64)
    if k_eff == 0:
        return sims_out, idx_out
    for start in range(0, len(queries), chunk):
        sims = queries[start : start + chunk] @ exemplars.T
        if exclude_self:
            rows = np.arange(len(sims))
            sims[rows, start + rows] = -np.inf
        if k_eff < sims.shape[1]:
            top = np.argpartition(-sims, k_eff - 1, axis=1)[:, :k_eff]
            _lowest_index_at_the_cut(sims, top)
        else:
            top = np.broadcast_to(np.arange(sims.shape[1]), sims.shape)
        top_sims = np.take_along_axis(sims, top, axis=1)
        order = np.lexsort((top, -top_sims), axis=1)  # best first; ties by exemplar index
        idx_out[start : start + chunk] = np.take_along_axis(top, order, axis=1)
        sims_out[start : start + chunk] = np.take_along_axis(top_sims, order, axis=1)
    return sims_out, idx_out


def _lowest_index_at_the_cut(sims: np.ndarray, top: np.ndarray) -> None:
    """Where exemplars tie at the k-th similarity, keep the lowest indices in `top` (argpartition picks any)."""
    top_sims = np.take_along_axis(sims, top, axis=1)
    kth = top_sims.min(axis=1, keepdims=True)
    for row in np.flatnonzero((sims == kth).sum(axis=1) > (top_sims == kth).sum(axis=1)):
        above = np.flatnonzero(sims[row] > kth[row])
        top[row] = np.concatenate([above, np.flatnonzero(sims[row] == kth[row])[: top.shape[1] - len(above)]])


def rerank_within_bound(
    queries: np.ndarray, exemplars: np.ndarray, approx: np.ndarray, *, kth_approx: np.ndarray, bound: np.ndarray,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """`nearest_neighbors`' answer from approximate similarities `approx` (n, rows) that are within `bound` (n,)
    of the float32 ones, `kth_approx` (n,) being each query's k-th largest approximate similarity.

    Why no neighbour is missed: the k rows at or above `kth_approx` have a similarity >= kth_approx - bound, so
    the true k-th best is at least that; a true top-k row therefore has an approximate similarity >=
    kth_approx - 2 * bound. Those candidates (a few dozen, typically) are scored in float32 and ranked, ties by
    exemplar index. (Scored by a matrix-vector product, two within float32 rounding of each other may come in
    the other order than `nearest_neighbors`' matrix product gives them.)
    """
    k_eff = max(0, min(k, len(exemplars)))
    sims_out = np.empty((len(queries), k_eff), dtype=np.float32)
    idx_out = np.empty((len(queries), k_eff), dtype=np.int64)
    for row, query in enumerate(queries):
        candidates = np.flatnonzero(approx[row] >= kth_approx[row] - 2 * bound[row])
        if len(candidates) < k_eff:  # only when the inputs break the premise (NaN): the full product
            sims, idx = nearest_neighbors(query[None], exemplars, k_eff)
            sims_out[row], idx_out[row] = sims[0], idx[0]
            continue
        exact = exemplars[candidates] @ query
        order = np.lexsort((candidates, -exact))[:k_eff]
        sims_out[row], idx_out[row] = exact[order], candidates[order]
    return sims_out, idx_out
