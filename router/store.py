"""Exemplar store on Qdrant: labelled exemplar vectors, versioned (`router.versions`), with the active
version's vectors in memory. The Qdrant calls, filters and payloads are `router.qdrant`'s (the only module
that imports qdrant_client).

One collection per router; each point is an exemplar's embedding, its label, provenance and versions (the one
that added it, the ones that removed it). A point's id is uuid5 of its normalized text (of text and version
when a later version relabels a text), so re-writing the same text with the same label is idempotent.

Embedded local mode (`path=`) is the default and the same code talks to a Qdrant server (`url=`). Local mode
allows one client per folder: the router deployment owns it while serving, so the CLI fails with
`StoreLockedError` then (use the admin endpoint, stop the router, or run a Qdrant server). Local mode searches by
brute force and gets slow past ~10k points (a warning says so); by default its kNN runs on an in-memory copy of
the active version's vectors (`local_search="matrix"`), exact, and keeps 64-query batches fast. A switch of
version builds the new copy beside the old one and swaps it in, so no query waits or fails meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np

from router import qdrant
from router.config import StoreConfig
from router.errors import StoreError
from router.knn import Search, VectorMatrix, nearest_neighbors
from router.types import Exemplar, Neighbor, StoredExemplar
from router.versions import (
    StoreVersion,
    VersionKind,
    check_rollback,
    lineage,
    version_kind,
)

logger = logging.getLogger(__name__)

_UPSERT_CHUNK = 256


class ExemplarStore:
    """Labelled exemplar vectors in one Qdrant collection, versioned; thread-safe."""

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
        self.versions_collection = f"{collection}__versions"
        self.dim = dim
        self.location = str(path) if path is not None else str(url)
        self.is_local = path is not None
        self._local_max_points = local_max_points
        self._warned_large = False
        self.closed = False
        self._lock = threading.RLock()
        self._db = qdrant.QdrantCollections(collection, dim, path=path, url=url, api_key=api_key,
                                            timeout_s=timeout_s, lock=self._lock)
        self._search = search
        self._use_matrix = self.is_local and local_search == "matrix"
        # The in-memory copy is exact only while this client is the sole writer, which local mode guarantees.
        self._matrix: VectorMatrix | None = None
        self._versions: dict[int, StoreVersion] = {}
        self.active = 0
        """The version queries answer from (0: the empty store)."""
        self._chain: tuple[int, ...] = ()
        self._others: dict[int, VectorMatrix] = {}
        """In-memory copies of versions other than the active one (a shadow router's), dropped on writes."""
        try:
            self._db.ensure()
            self._load_versions()
            if self._use_matrix:
                self._matrix = self._build_matrix(self._chain)
        except BaseException:
            self._db.close()  # release local mode's folder lock
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
        collection = f"{cfg.collection}-{vector_space}" if vector_space else cfg.collection
        return cls(collection=collection, dim=dim, path=path, url=cfg.url, api_key=cfg.api_key,
                   timeout_s=cfg.timeout_s, local_max_points=cfg.local_max_points, local_search=cfg.local_search,
                   search=search)

    # -- versions -------------------------------------------------------------------------------------------

    def versions(self) -> list[StoreVersion]:
        """Every committed version, oldest first (re-read, so another writer's versions show)."""
        with self._lock:
            self._read_versions()
            return [v for _, v in sorted(self._versions.items()) if v.committed]

    def record(self, version: int) -> StoreVersion | None:
        """The record of one version (as this client last read it)."""
        return self._versions.get(version)

    def begin(self, kind: VersionKind, note: str = "", *, parent: int | None = None) -> int:
        """A new draft version on top of the active one (or `parent`): writes given `version=` it are not served
        until `commit`."""
        with self._lock:
            self._read_versions()
            number = max(self._versions, default=0) + 1
            record = StoreVersion(number, self.active if parent is None else parent, kind, time.time(), note)
            self._write_version(record)
            return number

    def commit(self, version: int) -> StoreVersion:
        """Make `version` the active one: queries answer from it from now on (a new in-memory copy is built
        beside the old one, then swapped in)."""
        with self._lock:
            chain = lineage(self._versions, version)
            record = self._versions[version]
            size = self._db.count(qdrant.visible(chain))
            record = replace(record, committed=True, size=size, updated_at=time.time())
            previous = self.active
            self._write_version(record)
            self._switch(version, chain, delta_from=previous if record.parent == previous else None)
            self._db.set_pointer(version)
            logger.info("exemplar store %s: version %d (%s) active, %d exemplars", self.location, version,
                        record.kind, size)
            return record

    def rollback(self, version: int, note: str = "") -> StoreVersion:
        """A new version holding exactly what `version` held, made active; earlier versions stay listed."""
        with self._lock:
            self._read_versions()
            check_rollback(self._versions, version, self.active)
            new = self.begin("rollback", note or f"to {version}", parent=version)
            return self.commit(new)

    def refresh(self) -> int | None:
        """Follow another writer's switch of the active version (a Qdrant server shared by several routers, or
        the CLI): returns the new active version, None when it has not changed."""
        with self._lock:
            active = self._db.pointer() or 0
            if active == self.active:
                return None
            self._read_versions()
            self._switch(active, lineage(self._versions, active), delta_from=None)
            return active

    # -- writes ---------------------------------------------------------------------------------------------

    def upsert(self, exemplars: Sequence[Exemplar], vectors: np.ndarray, *, version: int | None = None) -> int:
        """Write exemplars into `version` (None: a version of their own, committed at once). A text the version
        already holds with the same label is overwritten in place (a new vector); with another label the old
        point leaves this version and a new one enters it. Returns how many were written."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape != (len(exemplars), self.dim):
            raise ValueError(f"vectors have shape {vectors.shape}; expected ({len(exemplars)}, {self.dim}).")
        # Within one call the last duplicate wins, as it would across calls.
        latest = {ex.text_hash: i for i, ex in enumerate(exemplars)}
        order = sorted(latest.values())
        exemplars = [exemplars[i] for i in order]
        vectors = vectors[order]
        if not exemplars:
            return 0
        with self._lock:
            self._others = {}
            own = version is None
            target = self.begin(version_kind(ex.provenance for ex in exemplars)) if own else version
            chain = lineage(self._versions, target)
            now = time.time()
            for start in range(0, len(exemplars), _UPSERT_CHUNK):
                self._upsert_chunk(exemplars[start : start + _UPSERT_CHUNK], vectors[start : start + _UPSERT_CHUNK],
                                   target, chain, now)
            if own:
                self.commit(target)
            elif target in self._versions:
                self._write_version(replace(self._versions[target], updated_at=now))
        self._warn_if_large()
        return len(exemplars)

    def delete(
        self,
        *,
        ids: Sequence[str] | None = None,
        source: str | None = None,
        tier: str | None = None,
        everything: bool = False,
        version: int | None = None,
    ) -> int:
        """Remove exemplars from `version` (None: a `delete` version of its own, committed at once) by point ids,
        source and/or tier, or everything. Older versions keep them. Returns how many went."""
        if not (ids or source or tier or everything):
            raise ValueError("delete needs ids, a source, a tier, or everything=True.")
        with self._lock:
            self._others = {}
            own = version is None
            target = self.begin("delete") if own else version
            chain = lineage(self._versions, target)
            conditions = [] if everything else qdrant.labelled(source=source, tier=tier)
            flt = qdrant.visible(chain, *conditions)
            if ids and not everything:
                flt = qdrant.with_ids(flt, ids)
            gone = [(str(r.id), r.payload) for r in self._db.scroll(flt)]
            self._remove(gone, target)
            if own:
                self.commit(target)
            return len(gone)

    def expire(self, now: float | None = None) -> int:
        """Delete for good, from every version, the exemplars whose `expires_at` has passed (learned prompts are
        kept only as long as the query log's retention allows). Returns how many went."""
        now = time.time() if now is None else now
        with self._lock:
            self._others = {}
            gone = [str(r.id) for r in self._db.scroll(qdrant.expired_before(now))]
            if gone:
                self._db.delete(gone)
                if self._matrix is not None:
                    self._matrix.drop(gone)
            return len(gone)

    # -- reads ----------------------------------------------------------------------------------------------

    def query(self, vectors: np.ndarray, k: int, *, version: int | None = None) -> list[list[Neighbor]]:
        """The k most similar exemplars (cosine) of the active version (or `version`, e.g. a shadow router's)
        for each query vector, most similar first."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"query vectors have shape {vectors.shape}; expected (n, {self.dim}).")
        if len(vectors) == 0:
            return []
        if self.closed:
            raise StoreError(f"the exemplar store at {self.location} is closed.")
        other = version is not None and version != self.active
        matrix = self._other_matrix(version) if other and self._use_matrix else None if other else self._matrix
        if matrix is not None:  # read once: a version switch swaps in a whole new copy
            return matrix.query(vectors, k)
        with self._lock:
            chain = lineage(self._versions, version) if other else self._chain
            if not chain:
                return [[] for _ in vectors]
            return self._db.search(vectors, k, qdrant.visible(chain))

    def _other_matrix(self, version: int) -> VectorMatrix:
        """An in-memory copy of a version that is not served (kept until the next write or switch)."""
        with self._lock:
            cached = self._others.get(version)
            if cached is None:
                self._read_versions()
                cached = self._build_matrix(lineage(self._versions, version))
                self._others = {version: cached}
            return cached

    def count(self, *, tier: str | None = None, source: str | None = None, version: int | None = None) -> int:
        """Exemplars the active version (or `version`) holds, optionally filtered."""
        with self._lock:
            chain = self._chain if version is None else lineage(self._versions, version)
            return self._db.count(qdrant.visible(chain, *qdrant.labelled(source=source, tier=tier)))

    def counts_by_tier(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for item in self.iter(batch=1024):
            counts[item.exemplar.tier] = counts.get(item.exemplar.tier, 0) + 1
        return dict(sorted(counts.items()))

    def list(self, *, limit: int = 100, tier: str | None = None, source: str | None = None) -> list[StoredExemplar]:
        """Up to `limit` exemplars of the active version in point-id order, optionally filtered."""
        out: list[StoredExemplar] = []
        for item in self.iter(tier=tier, source=source, batch=min(limit, 1024)):
            out.append(item)
            if len(out) >= limit:
                break
        return out

    def iter(self, *, tier: str | None = None, source: str | None = None, batch: int = 256
             ) -> Iterator[StoredExemplar]:
        """Every exemplar of the active version (optionally filtered), paging through the collection."""
        with self._lock:
            flt = qdrant.visible(self._chain, *qdrant.labelled(source=source, tier=tier))
        for r in self._db.scroll(flt, batch=batch):
            yield StoredExemplar(id=str(r.id), exemplar=qdrant.exemplar(r.payload), version=int(r.payload["version"]))

    def close(self) -> None:
        """Release the client (and local mode's folder lock); later calls fail."""
        with self._lock:
            self.closed = True
            self._matrix = None
            self._db.close()

    # -- internals ------------------------------------------------------------------------------------------

    def _upsert_chunk(self, exemplars: Sequence[Exemplar], vectors: np.ndarray, target: int,
                      chain: tuple[int, ...], now: float) -> None:
        held = {r.payload["text_hash"]: r for r in self._db.scroll(qdrant.visible(
            chain, qdrant.with_text_hashes([ex.text_hash for ex in exemplars])))}
        taken = self._db.existing([ex.id for ex in exemplars])
        ids, payloads, relabelled, in_place = [], [], [], []
        for ex, vec in zip(exemplars, vectors):
            current = held.get(ex.text_hash)
            added_by = target
            if current is not None and (current.payload["tier"] == ex.tier or current.payload["version"] == target):
                point_id = str(current.id)  # same label (a new vector), or relabelled within this version
                added_by = int(current.payload["version"])
                in_place.append(point_id)
            else:
                if current is not None:
                    relabelled.append((str(current.id), current.payload))
                point_id = ex.id if ex.id not in taken else qdrant.versioned_id(ex.text, target)
            ids.append(point_id)
            payloads.append(qdrant.payload(ex, version=added_by, now=now))
        self._db.upsert(ids, vectors, payloads)
        self._remove(relabelled, target)
        if self._matrix is None:
            return
        # Mirror into the served copy what it holds now: everything when writing into the active version,
        # else only the vectors of points it already holds (same label, so every version agrees on them).
        served = set(ids) if target == self.active else set(in_place) & set(self._matrix.ids)
        rows = [i for i, point_id in enumerate(ids) if point_id in served]
        if rows:
            self._matrix.put([ids[i] for i in rows], vectors[rows], [payloads[i]["tier"] for i in rows])

    def _remove(self, points: Sequence[tuple[str, dict]], version: int) -> None:
        for point_id, payload in points:
            self._db.set_removed_in(point_id, sorted({*payload.get("removed_in", []), version}))
        if points and version == self.active and self._matrix is not None:
            self._matrix.drop([point_id for point_id, _ in points])

    def _switch(self, active: int, chain: tuple[int, ...], *, delta_from: int | None) -> None:
        """Serve `active`: the in-memory copy is patched when `active` only adds to the served version, else
        rebuilt; the old copy keeps answering until the new one is swapped in."""
        if self._use_matrix:
            if delta_from is not None and self._matrix is not None and delta_from == self.active:
                matrix = self._matrix
                for ids, vecs, tiers in self._db.scan_vectors(qdrant.added_by(active, chain)):
                    matrix.put(ids, vecs, tiers)
                matrix.drop([str(r.id) for r in self._db.scroll(qdrant.removed_by(active))])
            else:
                matrix = self._build_matrix(chain)
            self._matrix = matrix
        self.active, self._chain = active, chain

    def _build_matrix(self, chain: tuple[int, ...]) -> VectorMatrix:
        matrix = VectorMatrix(self.dim, self._search)
        if chain:
            for batch in self._db.scan_vectors(qdrant.visible(chain)):
                matrix.put(*batch)
        return matrix

    def _load_versions(self) -> None:
        self._read_versions()
        active = self._db.pointer()
        if active is None:  # a store written before versions: its points become version 1
            active = 0
            if self._db.has_unversioned():
                record = StoreVersion(1, 0, "initial", time.time(), "written before the store had versions")
                self._write_version(record)
                self._db.version_unversioned(1)
                active = 1
                self._write_version(replace(record, committed=True, size=self._db.count(qdrant.visible((1,)))))
            self._db.set_pointer(active)
        self.active, self._chain = active, lineage(self._versions, active)

    def _read_versions(self) -> None:
        self._versions = self._db.read_versions()

    def _write_version(self, record: StoreVersion) -> None:
        self._db.write_version(record)
        self._versions[record.version] = record

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

