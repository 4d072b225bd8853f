"""Exemplar-store versions on embedded Qdrant, with the in-memory matrix and with Qdrant's own filtered search
(the path a Qdrant server takes): every write is a version, a rollback restores an older one's exemplars,
history is kept, learned exemplars expire, and a store written before versions becomes version 1."""

from __future__ import annotations

import numpy as np
import pytest
from qdrant_client import QdrantClient, models

from router.store import ExemplarStore
from router.types import Exemplar

E = np.eye(4, dtype=np.float32)


@pytest.fixture(params=["matrix", "qdrant"])
def store(request, tmp_path):
    s = ExemplarStore(collection="c", dim=4, path=tmp_path / "q", local_search=request.param)
    yield s
    s.close()


def nearest(store: ExemplarStore, row: int, version: int | None = None) -> str:
    return store.query(E[row : row + 1], 1, version=version)[0][0].tier


def test_a_relabel_is_a_new_version_and_a_rollback_restores_the_old_label(store) -> None:
    store.upsert([Exemplar("summarize this memo", "small"), Exemplar("prove the theorem", "large")], E[:2])
    assert store.active == 1 and nearest(store, 0) == "small"
    store.upsert([Exemplar("Summarize  this memo", "large", provenance="cascade")], E[:1])  # same text, new label
    assert store.active == 2 and nearest(store, 0) == "large" and store.count() == 2
    assert nearest(store, 0, version=1) == "small"  # the old version still holds the old label
    store.rollback(1)
    assert (store.active, nearest(store, 0), store.count()) == (3, "small", 2)
    listed = [(v.version, v.parent, v.kind, v.size) for v in store.versions()]
    assert listed == [(1, 0, "import", 2), (2, 1, "learn", 2), (3, 1, "rollback", 2)]
    store.rollback(2)  # forward again: history is kept
    assert nearest(store, 0) == "large"
    with pytest.raises(ValueError, match="does not exist"):
        store.rollback(99)


def test_the_same_label_again_is_idempotent_and_a_draft_is_not_served(store) -> None:
    store.upsert([Exemplar("a", "small")], E[:1])
    store.upsert([Exemplar("a", "small")], E[1:2])  # a new vector for the same label: overwritten in place
    assert store.count() == 1 and store.query(E[1:2], 1)[0][0].similarity == pytest.approx(1.0)
    draft = store.begin("import", "big file")
    store.upsert([Exemplar("b", "large")], E[2:3], version=draft)
    assert store.count() == 1 and nearest(store, 2) == "small"  # not served until committed
    store.commit(draft)
    assert store.count() == 2 and nearest(store, 2) == "large"


def test_a_delete_is_a_version_too(store) -> None:
    store.upsert([Exemplar("a", "small"), Exemplar("b", "large")], E[:2])
    assert store.delete(tier="small") == 1 and store.count() == 1 and nearest(store, 0) == "large"
    assert store.count(version=1) == 2
    store.rollback(1)
    assert store.count() == 2 and nearest(store, 0) == "small"


def test_learned_exemplars_keep_their_provenance_and_expire_for_good(store) -> None:
    learned = Exemplar("q", "large", source="learned", provenance="feedback", created_at=10.0, key_id="abc",
                       expires_at=100.0)
    store.upsert([Exemplar("keep", "small"), learned], E[:2])
    got = {item.exemplar.text: item for item in store.iter()}
    assert got["q"].exemplar == learned and got["q"].version == 1
    assert got["keep"].exemplar.provenance == "import" and got["keep"].exemplar.created_at is not None
    assert store.expire(now=99.0) == 0
    assert store.expire(now=101.0) == 1
    assert store.count() == 1 and store.count(version=1) == 1 and nearest(store, 1) == "small"


def test_another_writer_switching_the_active_version_is_followed(store) -> None:
    store.upsert([Exemplar("a", "small")], E[:1])
    store.upsert([Exemplar("a", "large")], E[:1])
    assert store.refresh() is None
    # what a second router or the CLI does on a shared Qdrant server: point the active version elsewhere
    store._db.set_pointer(1)
    assert nearest(store, 0) == "large"  # until it looks
    assert store.refresh() == 1 and nearest(store, 0) == "small"


def test_a_store_written_before_versions_becomes_version_one(tmp_path) -> None:
    client = QdrantClient(path=str(tmp_path / "q"))
    client.create_collection("c", vectors_config=models.VectorParams(size=4, distance=models.Distance.COSINE))
    ex = Exemplar("old", "large")
    client.upsert("c", points=[models.PointStruct(id=ex.id, vector=E[0].tolist(),
                                                  payload={"tier": "large", "text": "old", "source": "x"})])
    client.close()
    store = ExemplarStore(collection="c", dim=4, path=tmp_path / "q")
    try:
        assert store.active == 1 and store.count() == 1 and nearest(store, 0) == "large"
        assert [(v.version, v.kind, v.size) for v in store.versions()] == [(1, "initial", 1)]
    finally:
        store.close()
    reopened = ExemplarStore(collection="c", dim=4, path=tmp_path / "q")
    try:
        assert reopened.active == 1 and len(reopened.versions()) == 1
    finally:
        reopened.close()


def test_an_empty_store_has_no_version_and_answers_nothing(store) -> None:
    assert store.active == 0 and store.versions() == [] and store.count() == 0
    assert store.query(E[:1], 3) == [[]]
