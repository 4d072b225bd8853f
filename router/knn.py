"""Exact top-k cosine neighbours by matrix product: the one kNN search of the embedded store's in-memory
matrix (`router.store`) and of evaluation over a train split."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from router.types import Neighbor

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


class VectorMatrix:
    """Unit-normalized vectors in one array, with their ids and tier labels: exact cosine kNN for a whole batch
    in one matrix product (the embedded store's in-memory copy of one exemplar version).

    Every change replaces the (ids, tiers, vectors) snapshot as a whole, never an array in place: a query
    running meanwhile keeps the one it read, and a search may keep what it derives from an array
    (`router.embed.onnx_search`)."""

    def __init__(self, dim: int, search: Search = nearest_neighbors) -> None:
        self._search = search
        self._state: tuple[list[str], list[str], np.ndarray] = ([], [], np.empty((0, dim), dtype=np.float32))
        self._row: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._state[0])

    @property
    def ids(self) -> list[str]:
        return list(self._state[0])

    def put(self, ids: Sequence[str], vectors: np.ndarray, tiers: Sequence[str]) -> None:
        """Add or overwrite rows by id."""
        old_ids, old_tiers, old_vectors = self._state
        vectors = unit(np.asarray(vectors, dtype=np.float32))
        row_of = dict(self._row)
        new_rows, overwrite = [], {}
        for i, point_id in enumerate(ids):
            row = row_of.get(point_id)
            if row is None:
                row_of[point_id] = len(old_ids) + len(new_rows)
                new_rows.append(i)
            else:
                overwrite[row] = i
        if not new_rows and not overwrite:
            return
        matrix = np.concatenate([old_vectors, vectors[new_rows]]) if new_rows else old_vectors.copy()
        tiers_now = list(old_tiers)
        for row, i in overwrite.items():
            matrix[row] = vectors[i]
            tiers_now[row] = tiers[i]
        tiers_now.extend(tiers[i] for i in new_rows)
        self._row = row_of
        self._state = (old_ids + [ids[i] for i in new_rows], tiers_now, matrix)

    def drop(self, ids: Sequence[str]) -> None:
        """Remove rows by id (ids not present are ignored)."""
        old_ids, old_tiers, old_vectors = self._state
        gone = {self._row[i] for i in ids if i in self._row}
        if not gone:
            return
        keep = np.array([r not in gone for r in range(len(old_ids))], dtype=bool)
        new_ids = [i for i, k in zip(old_ids, keep) if k]
        self._row = {point_id: row for row, point_id in enumerate(new_ids)}
        self._state = (new_ids, [t for t, k in zip(old_tiers, keep) if k], old_vectors[keep])

    def query(self, queries: np.ndarray, k: int) -> list[list[Neighbor]]:
        ids, tiers, vectors = self._state
        if not ids:
            return [[] for _ in queries]
        sims, idx = self._search(unit(queries), vectors, k)
        return [
            [Neighbor(id=ids[j], tier=tiers[j], similarity=float(s)) for j, s in zip(row, row_sims)]
            for row, row_sims in zip(idx, sims)
        ]


def unit(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1.0, norms)
