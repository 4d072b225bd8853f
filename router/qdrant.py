"""The exemplar store's Qdrant side: the only module that imports qdrant_client.

`QdrantCollections` holds the client and the two collections of one store: the exemplars (each point an
exemplar's embedding with payload `tier`, `source`, `text_hash`, `text`, `category`, its provenance
`provenance`, `created_at`, `key_id`, `expires_at`, and its versions: `version`, the store version that added
it, and `removed_in`, the versions that dropped it) and `<collection>__versions` (the version records, and
the active-version pointer at point 0). The filters below say which points a version holds; which version
is served, and the in-memory copy of it, are `router.store`'s.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from qdrant_client import QdrantClient, models

from router.errors import StoreError, StoreLockedError
from router.types import Exemplar, Neighbor, normalize_text
from router.versions import StoreVersion

Filter = models.Filter
Condition = models.Filter | models.FieldCondition
_POINTER = 0
"""Point id of the active-version pointer in the versions collection (versions are 1, 2, ...)."""
_VERSIONED_ID = uuid.UUID("0c8f1d52-7a43-5f0e-b3a1-5e8d2c6b9f17")
_UNVERSIONED = models.Filter(must=[models.IsEmptyCondition(is_empty=models.PayloadField(key="version"))])


class QdrantCollections:
    """The exemplar collection and its versions collection on one client (an embedded folder or a server).

    Paged reads take `lock` per page, so a long scan never holds it across the caller's own work."""

    def __init__(self, collection: str, dim: int, *, path: str | Path | None, url: str | None,
                 api_key: str | None, timeout_s: float, lock: threading.RLock) -> None:
        self.collection = collection
        self.versions_collection = f"{collection}__versions"
        self.dim = dim
        self.location = str(path) if path is not None else str(url)
        self.is_local = path is not None
        self._lock = lock
        self._client = _connect(path=path, url=url, api_key=api_key, timeout_s=timeout_s)

    def close(self) -> None:
        self._client.close()

    def ensure(self) -> None:
        """Create the collections (with payload indexes on a server), or check the vectors' size."""
        if not self._client.collection_exists(self.collection):
            self._client.create_collection(
                self.collection,
                vectors_config=models.VectorParams(size=self.dim, distance=models.Distance.COSINE),
            )
            if not self.is_local:  # payload indexes do nothing in local mode
                for key in ("tier", "source", "text_hash"):
                    self._client.create_payload_index(self.collection, key, models.PayloadSchemaType.KEYWORD)
                self._client.create_payload_index(self.collection, "version", models.PayloadSchemaType.INTEGER)
        else:
            params = self._client.get_collection(self.collection).config.params.vectors
            size = params.size if isinstance(params, models.VectorParams) else None
            if size != self.dim:
                raise StoreError(
                    f"collection {self.collection!r} at {self.location} holds {size}-d vectors but the embedder "
                    f"makes {self.dim}-d ones (the embedder changed?); set router.store.collection to a new name, "
                    "or delete the collection and re-import."
                )
        if not self._client.collection_exists(self.versions_collection):
            self._client.create_collection(
                self.versions_collection, vectors_config=models.VectorParams(size=1, distance=models.Distance.DOT)
            )

    # -- versions -------------------------------------------------------------------------------------------

    def read_versions(self) -> dict[int, StoreVersion]:
        records = {}
        for r in self.scroll(None, collection=self.versions_collection):
            if int(r.id) != _POINTER:
                records[int(r.id)] = StoreVersion.from_payload(r.payload)
        return records

    def write_version(self, record: StoreVersion) -> None:
        self._client.upsert(self.versions_collection, wait=True, points=[
            models.PointStruct(id=record.version, vector=[0.0], payload=record.to_payload())])

    def pointer(self) -> int | None:
        """The active version as the pointer says; None when the store has none yet."""
        records = self._client.retrieve(self.versions_collection, ids=[_POINTER], with_payload=True)
        return int(records[0].payload["active"]) if records else None

    def set_pointer(self, active: int) -> None:
        self._client.upsert(self.versions_collection, wait=True,
                            points=[models.PointStruct(id=_POINTER, vector=[0.0], payload={"active": active})])

    def has_unversioned(self) -> bool:
        """Whether the collection holds points written before the store had versions."""
        return bool(self._client.count(self.collection, count_filter=_UNVERSIONED, exact=True).count)

    def version_unversioned(self, version: int) -> None:
        """Give the points written before the store had versions to `version`."""
        self._client.set_payload(self.collection, payload={"version": version}, points=_UNVERSIONED, wait=True)

    # -- points ---------------------------------------------------------------------------------------------

    def count(self, flt: Filter) -> int:
        return self._client.count(self.collection, count_filter=flt, exact=True).count

    def existing(self, ids: Sequence[str]) -> set[str]:
        """Which of these point ids the collection holds (under any version)."""
        return {str(r.id) for r in self._client.retrieve(self.collection, ids=list(ids))}

    def upsert(self, ids: Sequence[str], vectors: np.ndarray, payloads: Sequence[dict]) -> None:
        self._client.upsert(self.collection, wait=True, points=[
            models.PointStruct(id=i, vector=v.tolist(), payload=p) for i, v, p in zip(ids, vectors, payloads)])

    def set_removed_in(self, point_id: str, removed_in: Sequence[int]) -> None:
        self._client.set_payload(self.collection, payload={"removed_in": list(removed_in)}, points=[point_id],
                                 wait=True)

    def delete(self, ids: Sequence[str]) -> None:
        """Delete points for good, from every version."""
        self._client.delete(self.collection, models.PointIdsList(points=list(ids)), wait=True)

    def search(self, vectors: np.ndarray, k: int, flt: Filter) -> list[list[Neighbor]]:
        """Qdrant's own filtered kNN (cosine), most similar first, for each query vector."""
        responses = self._client.query_batch_points(
            self.collection,
            requests=[models.QueryRequest(query=v.tolist(), limit=k, filter=flt, with_payload=["tier"])
                      for v in vectors],
        )
        return [
            [Neighbor(id=str(p.id), tier=p.payload["tier"], similarity=float(p.score)) for p in r.points]
            for r in responses
        ]

    def scroll(self, flt: Filter | None, *, batch: int = 1024, collection: str | None = None) -> Iterator[Any]:
        """Every point matching `flt` (records with `.id` and `.payload`), page by page."""
        offset = None
        while True:
            with self._lock:
                records, offset = self._client.scroll(collection or self.collection, scroll_filter=flt, limit=batch,
                                                      offset=offset, with_payload=True)
            yield from records
            if offset is None:
                return

    def scan_vectors(self, flt: Filter) -> Iterator[tuple[list[str], np.ndarray, list[str]]]:
        """(ids, vectors, tiers) of the points matching `flt`, page by page."""
        offset = None
        while True:
            with self._lock:
                records, offset = self._client.scroll(
                    self.collection, scroll_filter=flt, limit=1024, offset=offset, with_payload=["tier"],
                    with_vectors=True,
                )
            if records:
                yield (
                    [str(r.id) for r in records],
                    np.asarray([r.vector for r in records], dtype=np.float32),
                    [r.payload["tier"] for r in records],
                )
            if offset is None:
                return


# -- which points: filters ------------------------------------------------------------------------------------


def visible(chain: Sequence[int], *conditions: Condition) -> Filter:
    """Points a version of lineage `chain` holds (added by one of them, removed by none), and `conditions`."""
    if not chain:  # the empty store: a condition nothing meets
        return models.Filter(must=[models.HasIdCondition(has_id=[])])
    return models.Filter(
        must=[models.FieldCondition(key="version", match=models.MatchAny(any=list(chain))), *conditions],
        must_not=[models.FieldCondition(key="removed_in", match=models.MatchAny(any=list(chain)))],
    )


def labelled(*, source: str | None, tier: str | None) -> list[Condition]:
    """The conditions for `source` and/or `tier` (none when neither is given)."""
    if not (source or tier):
        return []
    return [models.Filter(must=[models.FieldCondition(key=key, match=models.MatchValue(value=value))
                                for key, value in (("source", source), ("tier", tier)) if value is not None])]


def with_text_hashes(hashes: Sequence[str]) -> Condition:
    return models.FieldCondition(key="text_hash", match=models.MatchAny(any=list(hashes)))


def with_ids(flt: Filter, ids: Sequence[str]) -> Filter:
    return models.Filter(must=[*flt.must, models.HasIdCondition(has_id=list(ids))], must_not=flt.must_not)


def expired_before(now: float) -> Filter:
    return models.Filter(must=[models.FieldCondition(key="expires_at", range=models.Range(lt=now))])


def added_by(version: int, chain: Sequence[int]) -> Filter:
    """Points `version` added that no version of `chain` removed."""
    return models.Filter(must=[models.FieldCondition(key="version", match=models.MatchValue(value=version))],
                         must_not=[models.FieldCondition(key="removed_in", match=models.MatchAny(any=list(chain)))])


def removed_by(version: int) -> Filter:
    return models.Filter(must=[models.FieldCondition(key="removed_in", match=models.MatchValue(value=version))])


# -- payloads ---------------------------------------------------------------------------------------------------


def payload(ex: Exemplar, *, version: int, now: float) -> dict:
    """A point's payload for an exemplar added by `version` (created now unless it says when)."""
    out = {"tier": ex.tier, "source": ex.source, "text_hash": ex.text_hash, "text": ex.text, "version": version,
           "provenance": ex.provenance, "created_at": ex.created_at if ex.created_at is not None else now}
    for key in ("category", "key_id", "expires_at"):
        if (value := getattr(ex, key)) is not None:
            out[key] = value
    return out


def exemplar(payload: dict) -> Exemplar:
    """The exemplar a point's payload describes."""
    return Exemplar(
        text=payload.get("text", ""),
        tier=payload["tier"],
        source=payload.get("source", ""),
        category=payload.get("category"),
        provenance=payload.get("provenance", "import"),
        created_at=payload.get("created_at"),
        key_id=payload.get("key_id"),
        expires_at=payload.get("expires_at"),
    )


def versioned_id(text: str, version: int) -> str:
    """The point id of a text relabelled by `version` (its plain id is taken by the older label)."""
    return str(uuid.uuid5(_VERSIONED_ID, f"{version}\x00{normalize_text(text)}"))


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
