"""Top-k cosine neighbours: the exact matrix product in numpy (`nearest_neighbors`, evaluation's search), the same
search on the ONNX embedder's warm pool with an int8 first pass (`OnnxSearch`), and the in-memory exemplar
matrix both search (`VectorMatrix`, the embedded store's copy of one version).

`OnnxSearch`: one query against 10k exemplars is a product bound by memory (15 MB of vectors): right after an
embedding has streamed the model's weights through the caches, numpy's one BLAS thread took 1.7 ms for it, the
pool's two warm threads 0.5-1 ms (numpy cannot take a second thread: it would fight the pool's spinning ones). For
a few queries against a large store an int8 copy of the exemplars (a quarter of the bytes) goes first: every
exemplar whose int8 similarity is within the copy's error bound of the k-th best is then scored in float32, and
the best k of those are the answer (`rerank_within_bound`). Measured on 10k real MMLU exemplars right after an
embedding: 0.89-0.95 instead of 1.14-1.44 ms (0.28-0.47 ms less, paired), 81 exemplars re-scored at p50 and 630
at p95; 0.46-0.58 ms less per routing decision in `benchmarks/router_latency.py`'s store. The answer is the
float32 product's up to float32 rounding: the re-scoring is a matrix-vector product, so two exemplars within
~1e-6 of each other may come in the other order.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import numpy as np

from router.types import Neighbor

logger = logging.getLogger(__name__)

Search = Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray]]
"""(unit queries, unit exemplars, k) -> (similarities, indices), both (n, min(k, len(exemplars))), best first,
ties by exemplar index: `nearest_neighbors`, or `OnnxSearch` on the embedder's pool."""


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
    (`OnnxSearch`)."""

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


# -- the search on ONNX Runtime's pool ------------------------------------------------------------------------

INT8_LEVELS = 63
"""Exemplar values are quantised to -63..63, not -127..127: ONNX Runtime's int8 product on x86 CPUs without
VNNI adds pairs of uint8 x int8 products in 16 bits, saturating at 32767; 2 x 255 x 63 = 32130 never does."""


class OnnxSearch:
    """Top-k cosine neighbours, best first, ties by the lower exemplar index (as `nearest_neighbors`).

    A matrix the int8 copy was not made from (the store changed) is searched in float32 while a background
    thread makes its copy: a store change never puts the copy's making (50-150 ms at 10k) on a routed request.
    The exemplar matrix must not change in place (`router.store` replaces it).
    """

    INT8_MIN_ROWS = 2048
    """Smaller stores fit the caches: the float32 product is as fast."""
    INT8_MAX_QUERIES = 4
    """Beyond this many queries in one call the re-scoring, query by query, costs more than it saves."""

    def __init__(self) -> None:
        from onnx import TensorProto, helper

        graph = helper.make_graph(
            [helper.make_node("Gemm", ["queries", "exemplars"], ["sims"], transB=1),
             helper.make_node("TopK", ["sims", "k"], ["top_sims", "top_idx"], axis=-1, largest=1, sorted=1)],
            "knn",
            [helper.make_tensor_value_info("queries", TensorProto.FLOAT, ["n", "dim"]),
             helper.make_tensor_value_info("exemplars", TensorProto.FLOAT, ["rows", "dim"]),
             helper.make_tensor_value_info("k", TensorProto.INT64, [1])],
            [helper.make_tensor_value_info("top_sims", TensorProto.FLOAT, ["n", "kk"]),
             helper.make_tensor_value_info("top_idx", TensorProto.INT64, ["n", "kk"])],
        )
        self._session = _pooled_session(_serialized(graph))
        self._lock = threading.Lock()
        self._int8: Int8Exemplars | None = None
        self._wanted: np.ndarray | None = None
        """The newest matrix searched, whose int8 copy the builder makes next."""
        self._builder: threading.Thread | None = None
        self._failed: np.ndarray | None = None
        """A matrix whose int8 copy could not be made (searched in float32, not retried)."""

    def __call__(self, queries: np.ndarray, exemplars: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k_eff = max(0, min(k, len(exemplars)))
        if k_eff == 0 or len(queries) == 0:
            return np.empty((len(queries), k_eff), np.float32), np.empty((len(queries), k_eff), np.int64)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if len(exemplars) >= self.INT8_MIN_ROWS and len(queries) <= self.INT8_MAX_QUERIES:
            int8 = self._int8
            if int8 is not None and int8.source is exemplars:
                return int8.search(queries, k_eff)
            self._want_int8(exemplars)
        feeds = {"queries": queries, "exemplars": np.ascontiguousarray(exemplars, dtype=np.float32),
                 "k": np.array([k_eff], np.int64)}
        sims, idx = self._session.run(None, feeds)  # best first, ties by lower index
        return sims, idx

    def wait_int8(self, timeout: float | None = None) -> bool:
        """Wait for the background copy; whether the newest matrix searched has its int8 copy (for tests)."""
        builder = self._builder
        if builder is not None:
            builder.join(timeout)
        int8 = self._int8
        return int8 is not None and int8.source is self._wanted

    def _want_int8(self, exemplars: np.ndarray) -> None:
        with self._lock:
            if exemplars is self._failed:
                return
            self._wanted = exemplars
            if self._builder is None:
                self._builder = threading.Thread(target=self._build, name="tierserve-knn-int8", daemon=True)
                self._builder.start()

    def _build(self) -> None:
        """Make the int8 copy of the newest matrix wanted, again while a newer one arrived meanwhile."""
        while True:
            with self._lock:
                target = self._wanted
                if target is None or (self._int8 is not None and self._int8.source is target):
                    self._builder = None
                    return
            try:
                built = Int8Exemplars(target)
            except Exception:
                logger.warning("could not make the int8 copy of the exemplars; searching them in float32",
                               exc_info=True)
                with self._lock:
                    self._failed, self._builder = target, None
                return
            with self._lock:
                self._int8 = built


class Int8Exemplars:
    """An int8 copy of one exemplar matrix (symmetric, a scale per row) and the session that scores queries
    against it, quantising them on the fly (ONNX `DynamicQuantizeLinear`: uint8, one scale per call)."""

    def __init__(self, exemplars: np.ndarray) -> None:
        from onnx import TensorProto, helper, numpy_helper

        self.source = exemplars
        """The matrix this copy was made from (held, so identity means "unchanged")."""
        self._exemplars = np.ascontiguousarray(exemplars, dtype=np.float32)
        self._dim = exemplars.shape[1]
        scales = np.abs(self._exemplars).max(axis=1) / INT8_LEVELS
        scales[scales == 0] = 1.0
        quantized = np.round(self._exemplars / scales[:, None]).astype(np.int8)
        self._max_scale = float(scales.max())
        self._max_l1 = float(np.abs(self._exemplars).sum(axis=1).max())
        graph = helper.make_graph(
            [helper.make_node("DynamicQuantizeLinear", ["queries"], ["q8", "q_scale", "q_zero"]),
             helper.make_node("MatMulInteger", ["q8", "exemplars_t", "q_zero", "zero"], ["dots"]),
             helper.make_node("Cast", ["dots"], ["dots_f"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["dots_f", "q_scale"], ["scaled"]),
             helper.make_node("Mul", ["scaled", "row_scales"], ["sims"]),
             helper.make_node("TopK", ["sims", "k"], ["top_sims", "top_idx"], axis=-1, largest=1, sorted=0)],
            "knn_int8",
            [helper.make_tensor_value_info("queries", TensorProto.FLOAT, ["n", self._dim]),
             helper.make_tensor_value_info("k", TensorProto.INT64, [1])],
            [helper.make_tensor_value_info("sims", TensorProto.FLOAT, ["n", "rows"]),
             helper.make_tensor_value_info("q_scale", TensorProto.FLOAT, []),
             helper.make_tensor_value_info("top_sims", TensorProto.FLOAT, ["n", "kk"])],
            [numpy_helper.from_array(np.ascontiguousarray(quantized.T), "exemplars_t"),
             numpy_helper.from_array(np.array(0, np.int8), "zero"),
             numpy_helper.from_array(scales.astype(np.float32), "row_scales")],
        )
        self._session = _pooled_session(_serialized(graph))

    def similarities(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
        """(int8 similarities (n, rows), each query's k-th best of them, the queries' quantisation step)."""
        sims, q_scale, top = self._session.run(None, {"queries": queries, "k": np.array([k], np.int64)})
        return sims, top.min(axis=1), float(q_scale)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        approx, kth, q_scale = self.similarities(queries, k)
        bound = self.error_bound(queries, q_scale)
        if not np.all(np.isfinite(bound)):  # a NaN or infinite query: no bound holds; the float32 product
            return nearest_neighbors(queries, self._exemplars, k)
        return rerank_within_bound(queries, self._exemplars, approx, kth_approx=kth, bound=bound, k=k)

    def error_bound(self, queries: np.ndarray, q_scale: float) -> np.ndarray:
        """Largest |int8 - float32| similarity per query. exact - approx = (q - q8).e + q8.(e - e8): each query
        element is off by at most one quantisation step (half a step when rounding, a step where the zero
        point saturates), each exemplar element by half its row's step; plus float rounding."""
        q_l1 = np.abs(queries).sum(axis=1)
        return q_scale * self._max_l1 + (q_l1 + self._dim * q_scale) * self._max_scale / 2 + 1e-5


def _serialized(graph: object) -> bytes:
    from onnx import helper

    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


def _pooled_session(model: bytes) -> object:
    """A session on the embedder's pool (onnxruntime is imported only where the ONNX embedder searches)."""
    from router.embed.ort import pooled_session

    return pooled_session(model)
