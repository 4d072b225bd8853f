"""Exemplar store on Qdrant: the only module that imports qdrant_client.

One collection per router; each point is an exemplar's embedding with payload `tier`, `source`, `text_hash`,
`text` (and `category`). Point ids are uuid5 of the normalized text, so upserts are idempotent.

Embedded local mode (`path=`) is the default and the same code talks to a Qdrant server (`url=`). Local mode
allows one client per folder: the router deployment owns it while serving, so the CLI fails with
`StoreLockedError` then (use the admin endpoint, stop the router, or run a Qdrant server). Local mode searches by
brute force and gets slow past ~10k points (a warning says so); by default its kNN runs on an in-memory copy of
the vectors (`local_search="matrix"`), which is exact and keeps 64-query batches fast.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from qdrant_client import QdrantClient, models

from router.config import StoreConfig
from router.errors import StoreError, StoreLockedError
from router.knn import Search, nearest_neighbors
from router.types import Exemplar, Neighbor, StoredExemplar

logger = logging.getLogger(__name__)

_UPSERT_CHUNK = 256


class ExemplarStore:
    """Labelled exemplar vectors in one Qdrant collection; thread-safe."""

    def __init__(
        self,
        *,
        collection: str,
        dim: int,
        path: str | Path | None = None,
        url: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 5.0,
        local_max_points: int = 10_000,
        local_search: Literal["matrix", "qdrant"] = "matrix",
        search: Search = nearest_neighbors,
    ) -> None:
        """`search`: the in-memory matrix's kNN (the router passes its embedder's `neighbor_search()`)."""
        if (path is None) == (url is None):
            raise ValueError("ExemplarStore needs exactly one of path (embedded Qdrant) or url (Qdrant server).")
        self.collection = collection
        self.dim = dim
        self.location = str(path) if path is not None else str(url)
        self.is_local = path is not None
        self._local_max_points = local_max_points
        self._warned_large = False
        self.closed = False
        self._lock = threading.RLock()
        self._client = _connect(path=path, url=url, api_key=api_key, timeout_s=timeout_s)
        # The in-memory copy is exact only while this client is the sole writer, which local mode guarantees.
        self._matrix: _VectorMatrix | None = None
        self._search = search
        try:
            self._ensure_collection()
            if self.is_local and local_search == "matrix":
                self._matrix = _VectorMatrix(dim, search)
                for ids, vectors, tiers in self._scan_vectors():
                    self._matrix.put(ids, vectors, tiers)
        except BaseException:
            self._client.close()  # release local mode's folder lock
            raise
        self._warn_if_large()

    @classmethod
    def open(cls, cfg: StoreConfig, *, dim: int, data_dir: str | Path, search: Search = nearest_neighbors,
             vector_space: str = "") -> ExemplarStore:
        """The store the config describes; local folder defaults to `<data_dir>/qdrant`. Vectors of another
        space than the embedding model's own (`EmbedderConfig.vector_space`, e.g. `static256`) are kept in
        the collection `<collection>-<space>`, so switching backends never mixes two spaces in one collection."""
        path = None
        if cfg.url is None:
            path = Path(cfg.path).expanduser() if cfg.path else Path(data_dir).expanduser() / "qdrant"
        return cls(
            collection=f"{cfg.collection}-{vector_space}" if vector_space else cfg.collection,
            dim=dim,
            path=path,
            url=cfg.url,
            api_key=cfg.api_key,
            timeout_s=cfg.timeout_s,
            local_max_points=cfg.local_max_points,
            local_search=cfg.local_search,
            search=search,
        )

    # -- writes ---------------------------------------------------------------------------------------------

    def upsert(self, exemplars: Sequence[Exemplar], vectors: np.ndarray) -> int:
        """Insert or overwrite exemplars (same normalized text = same point). Returns how many were written."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape != (len(exemplars), self.dim):
            raise ValueError(f"vectors have shape {vectors.shape}; expected ({len(exemplars)}, {self.dim}).")
        # Within one call the last duplicate wins, as it would across calls.
        latest = {ex.id: i for i, ex in enumerate(exemplars)}
        order = sorted(latest.values())
        exemplars = [exemplars[i] for i in order]
        vectors = vectors[order]
        with self._lock:
            for start in range(0, len(exemplars), _UPSERT_CHUNK):
                chunk = exemplars[start : start + _UPSERT_CHUNK]
                chunk_vectors = vectors[start : start + _UPSERT_CHUNK]
                self._client.upsert(
                    self.collection,
                    points=[
                        models.PointStruct(id=ex.id, vector=vec.tolist(), payload=_payload(ex))
                        for ex, vec in zip(chunk, chunk_vectors)
                    ],
                    wait=True,
                )
                if self._matrix is not None:  # mirror only what Qdrant accepted
                    self._matrix.put([ex.id for ex in chunk], chunk_vectors, [ex.tier for ex in chunk])
        self._warn_if_large()
        return len(exemplars)

    def delete(
        self,
        *,
        ids: Sequence[str] | None = None,
        source: str | None = None,
        tier: str | None = None,
        everything: bool = False,
    ) -> int:
        """Delete by point ids, by source and/or tier, or everything. Returns how many points went."""
        if not (ids or source or tier or everything):
            raise ValueError("delete needs ids, a source, a tier, or everything=True.")
        with self._lock:
            before = self.count()
            if everything:
                self._client.delete_collection(self.collection)
                self._ensure_collection()
            else:
                if ids:
                    self._client.delete(self.collection, models.PointIdsList(points=list(ids)), wait=True)
                if source or tier:
                    flt = _filter(source=source, tier=tier)
                    self._client.delete(self.collection, models.FilterSelector(filter=flt), wait=True)
            if self._matrix is not None:
                self._matrix = _VectorMatrix(self.dim, self._search)
                for batch in self._scan_vectors():
                    self._matrix.put(*batch)
            return before - self.count()

    # -- reads ----------------------------------------------------------------------------------------------

    def query(self, vectors: np.ndarray, k: int) -> list[list[Neighbor]]:
        """The k most similar exemplars (cosine) for each query vector, most similar first."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"query vectors have shape {vectors.shape}; expected (n, {self.dim}).")
        if len(vectors) == 0:
            return []
        with self._lock:
            if self.closed:
                raise StoreError(f"the exemplar store at {self.location} is closed.")
            if self._matrix is not None:
                return self._matrix.query(vectors, k)
            responses = self._client.query_batch_points(
                self.collection,
                requests=[models.QueryRequest(query=v.tolist(), limit=k, with_payload=["tier"]) for v in vectors],
            )
        return [
            [Neighbor(id=str(p.id), tier=p.payload["tier"], similarity=float(p.score)) for p in r.points]
            for r in responses
        ]

    def count(self, *, tier: str | None = None, source: str | None = None) -> int:
        flt = _filter(source=source, tier=tier) if (tier or source) else None
        with self._lock:
            return self._client.count(self.collection, count_filter=flt, exact=True).count

    def counts_by_tier(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for item in self.iter(batch=1024):
            counts[item.exemplar.tier] = counts.get(item.exemplar.tier, 0) + 1
        return dict(sorted(counts.items()))

    def list(
        self, *, limit: int = 100, tier: str | None = None, source: str | None = None
    ) -> list[StoredExemplar]:
        """Up to `limit` exemplars in point-id order, optionally filtered."""
        out: list[StoredExemplar] = []
        for item in self.iter(tier=tier, source=source, batch=min(limit, 1024)):
            out.append(item)
            if len(out) >= limit:
                break
        return out

    def iter(
        self, *, tier: str | None = None, source: str | None = None, batch: int = 256
    ) -> Iterator[StoredExemplar]:
        """Every exemplar (optionally filtered), paging through the collection."""
        flt = _filter(source=source, tier=tier) if (tier or source) else None
        offset = None
        while True:
            with self._lock:
                records, offset = self._client.scroll(
                    self.collection, scroll_filter=flt, limit=batch, offset=offset, with_payload=True
                )
            for r in records:
                yield StoredExemplar(id=str(r.id), exemplar=_exemplar(r.payload))
            if offset is None:
                return

    def close(self) -> None:
        """Release the client (and local mode's folder lock); later calls fail."""
        with self._lock:
            self.closed = True
            self._matrix = None
            self._client.close()

    # -- internals ------------------------------------------------------------------------------------------

    def _ensure_collection(self) -> None:
        if not self._client.collection_exists(self.collection):
            self._client.create_collection(
                self.collection,
                vectors_config=models.VectorParams(size=self.dim, distance=models.Distance.COSINE),
            )
            if not self.is_local:  # payload indexes do nothing in local mode
                for key in ("tier", "source"):
                    self._client.create_payload_index(self.collection, key, models.PayloadSchemaType.KEYWORD)
            return
        params = self._client.get_collection(self.collection).config.params.vectors
        size = params.size if isinstance(params, models.VectorParams) else None
        if size != self.dim:
            raise StoreError(
                f"collection {self.collection!r} at {self.location} holds {size}-d vectors but the embedder makes "
                f"{self.dim}-d ones (the embedder changed?); set router.store.collection to a new name, or "
                "empty it with `tierserve exemplars delete --all` and re-import."
            )

    def _scan_vectors(self) -> Iterator[tuple[list[str], np.ndarray, list[str]]]:
        offset = None
        while True:
            records, offset = self._client.scroll(
                self.collection, limit=1024, offset=offset, with_payload=["tier"], with_vectors=True
            )
            if records:
                yield (
                    [str(r.id) for r in records],
                    np.asarray([r.vector for r in records], dtype=np.float32),
                    [r.payload["tier"] for r in records],
                )
            if offset is None:
                return

    def _warn_if_large(self) -> None:
        if self.is_local and not self._warned_large and (n := self.count()) > self._local_max_points:
            self._warned_large = True
            logger.warning(
                "exemplar store %s holds %d points in embedded Qdrant (brute force, suggested limit %d); "
                "set router.store.url to a Qdrant server for large exemplar sets",
                self.location,
                n,
                self._local_max_points,
            )


class _VectorMatrix:
    """Unit-normalized vectors in one array: exact cosine kNN for a whole batch in one matrix product."""

    def __init__(self, dim: int, search: Search = nearest_neighbors) -> None:
        self._search = search
        self._vectors = np.empty((0, dim), dtype=np.float32)
        self._ids: list[str] = []
        self._tiers: list[str] = []
        self._row: dict[str, int] = {}

    def put(self, ids: Sequence[str], vectors: np.ndarray, tiers: Sequence[str]) -> None:
        """Add or overwrite rows. The matrix is replaced by a new array, never changed in place: a search may
        keep what it derives from one (`router.embed.onnx_search`)."""
        vectors = _unit(vectors)
        new_rows, overwrite = [], {}
        for i, point_id in enumerate(ids):
            row = self._row.get(point_id)
            if row is None:
                self._row[point_id] = len(self._ids) + len(new_rows)
                new_rows.append(i)
            else:
                overwrite[row] = i
                self._tiers[row] = tiers[i]
        if not new_rows and not overwrite:
            return
        matrix = np.concatenate([self._vectors, vectors[new_rows]]) if new_rows else self._vectors.copy()
        for row, i in overwrite.items():
            matrix[row] = vectors[i]
        self._vectors = matrix
        self._ids.extend(ids[i] for i in new_rows)
        self._tiers.extend(tiers[i] for i in new_rows)

    def query(self, queries: np.ndarray, k: int) -> list[list[Neighbor]]:
        if not self._ids:
            return [[] for _ in queries]
        sims, idx = self._search(_unit(queries), self._vectors, k)
        return [
            [Neighbor(id=self._ids[j], tier=self._tiers[j], similarity=float(s)) for j, s in zip(row, row_sims)]
            for row, row_sims in zip(idx, sims)
        ]


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1.0, norms)


def _connect(*, path: str | Path | None, url: str | None, api_key: str | None, timeout_s: float) -> QdrantClient:
    if url is not None:
        return QdrantClient(url=url, api_key=api_key, timeout=int(max(1, timeout_s)))
    Path(path).mkdir(parents=True, exist_ok=True)
    try:
        return QdrantClient(path=str(path))
    except RuntimeError as exc:
        if "already accessed" not in str(exc):
            raise
        raise StoreLockedError(
            f"the exemplar store folder {path} is in use by another process (a running tierserve router?). "
            "Embedded Qdrant allows one process per folder: add exemplars through the router's admin endpoint, "
            "stop the router first, or set router.store.url to a Qdrant server."
        ) from None


def _payload(ex: Exemplar) -> dict:
    payload = {"tier": ex.tier, "source": ex.source, "text_hash": ex.text_hash, "text": ex.text}
    if ex.category is not None:
        payload["category"] = ex.category
    return payload


def _exemplar(payload: dict) -> Exemplar:
    return Exemplar(
        text=payload.get("text", ""),
        tier=payload["tier"],
        source=payload.get("source", ""),
        category=payload.get("category"),
    )


def _filter(*, source: str | None, tier: str | None) -> models.Filter:
    must = [
        models.FieldCondition(key=key, match=models.MatchValue(value=value))
        for key, value in (("source", source), ("tier", tier))
        if value is not None
    ]
    return models.Filter(must=must)
