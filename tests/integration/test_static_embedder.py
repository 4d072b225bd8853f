"""The static embedder distilled from the shipped MiniLM: distillation, the fit on a corpus, the cached export,
loading, and routing.

The full distillation (the whole 30,522-token vocabulary through MiniLM) and its fit on the shipped exemplars run
once into the test data dir (`TIERSERVE_DATA_DIR`, kept between runs) and are reused from there, as the router
reuses them.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import numpy as np
import pytest

from router.config import EmbedderConfig, RouterConfig
from router.core import Router
from router.embed import build_embedder
from router.embed.build import model_dir
from router.embed.flag import FlagEmbedder
from router.embed.static import StaticEmbedder, distill, fingerprint, fit, load_or_distill
from router.exemplars import load_default_exemplars
from router.types import Exemplar, RouteInput
from tests.integration.test_router_knn import NEAR_LARGE, NEAR_SMALL, TIERS

CFG = EmbedderConfig(backend="static")
SHIPPED = [e.text for e in load_default_exemplars()]


@pytest.fixture(scope="module")
def data_dir() -> Path:
    return Path(os.environ["TIERSERVE_DATA_DIR"]).expanduser()


@pytest.fixture(scope="module")
def static(data_dir) -> StaticEmbedder:
    return build_embedder(CFG, data_dir)


@pytest.fixture(scope="module")
def teacher() -> FlagEmbedder:
    return FlagEmbedder(model_dir(EmbedderConfig()), pooling="mean")


def test_distillation_projects_and_shrinks_frequent_tokens(teacher):
    vocab = teacher._tokenizer.get_vocab()
    words = ["the", "of", "and", "enzyme", "arbitration", "mortgage", "theorem", "polynomial"]
    ids = [vocab[w] for w in words]
    vectors = distill(teacher, dims=4, token_ids=ids).vectors
    assert vectors.shape == (teacher.vocab_size, 4) and vectors.dtype == np.float32
    distilled = np.flatnonzero(np.abs(vectors).sum(axis=1))
    assert sorted(distilled) == sorted(ids)  # only the tokens asked for; the rest stay zero
    # Zipf/SIF weighting: against the same projection unweighted (a huge coefficient), each row shrinks by
    # sif / (sif + p(rank)), most for the most frequent tokens, which the vocabulary lists first.
    unweighted = distill(teacher, dims=4, token_ids=ids, sif_coefficient=1e9).vectors
    shrink = dict(zip(words, np.linalg.norm(vectors[ids], axis=1) / np.linalg.norm(unweighted[ids], axis=1)))
    assert all(0 < v < 1 for v in shrink.values())
    assert max(shrink["the"], shrink["of"], shrink["and"]) < min(shrink["enzyme"], shrink["arbitration"]) - 0.1


def test_fitting_on_a_corpus_follows_the_teacher_on_held_out_texts(teacher):
    texts = sorted(set(SHIPPED))
    train, held_out = texts[::4] + texts[1::4] + texts[2::4], texts[3::4]
    probe = StaticEmbedder(np.zeros((teacher.vocab_size, 1), np.float32), model_dir(CFG), max_length=256, name="p")
    used = sorted({int(i) for ids in probe.token_ids(texts) for i in ids})  # distil only the tokens seen: fast
    distilled = distill(teacher, dims=64, token_ids=used)
    tokens = probe.token_ids(train)
    fitted = fit(distilled.vectors, tokens, distilled.project(teacher.embed(train)))
    assert fitted.shape == distilled.vectors.shape and fitted.dtype == np.float32
    unseen = np.setdiff1d(used, np.concatenate(tokens))  # tokens only the held-out texts have: left as distilled
    scale = np.linalg.norm(distilled.vectors[used], axis=1).mean()
    assert unseen.size and np.allclose(fitted[unseen], distilled.vectors[unseen] / scale, atol=1e-6)

    def agreement(vectors: np.ndarray) -> tuple[float, float]:
        """Mean cosine to the projected teacher embedding; correlation of pairwise similarities with the teacher's."""
        mine = StaticEmbedder(vectors, model_dir(CFG), max_length=256, name="s").embed(held_out)
        theirs = teacher.embed(held_out)
        target = distilled.project(theirs)
        target /= np.linalg.norm(target, axis=1, keepdims=True)
        upper = np.triu_indices(len(held_out), 1)
        pairs = np.corrcoef((mine @ mine.T)[upper], (theirs @ theirs.T)[upper])[0, 1]
        return float((mine * target).sum(axis=1).mean()), float(pairs)

    (cos_before, pairs_before), (cos_after, pairs_after) = agreement(distilled.vectors), agreement(fitted)
    assert cos_after > cos_before + 0.1, (cos_before, cos_after)
    assert pairs_after > pairs_before + 0.05, (pairs_before, pairs_after)


def test_first_start_distils_and_fits_into_the_data_dir_once(static, data_dir):
    path = model_dir(CFG)
    folder = data_dir / "static" / f"{path.name}-{fingerprint(path, 'mean', CFG.static_dims, SHIPPED)}"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["vocabulary"] == 30522 and meta["dims"] == CFG.static_dims == static.dim
    assert meta["fit_texts"] == len(set(SHIPPED)) and meta["version"] == 2
    assert np.load(folder / "vectors.npy").shape == (30522, CFG.static_dims)
    assert static.name.startswith("static-minilm:model:")

    def no_teacher() -> FlagEmbedder:
        raise AssertionError("a cached static model must load without the teacher")

    # The same texts in another order, some twice: the same corpus, so the same cached model.
    again = load_or_distill(no_teacher, path, data_dir / "static", pooling="mean", dims=CFG.static_dims,
                            max_length=CFG.max_length, kind="minilm", corpus=SHIPPED[::-1] + SHIPPED[:5])
    texts = ["Extract the invoice number.", "Prove the theorem step by step."]
    assert np.array_equal(again.embed(texts), static.embed(texts)) and again.name == static.name


def test_a_changed_recipe_or_model_is_distilled_again(tmp_path, data_dir):
    path = model_dir(CFG)
    source = fingerprint(path, "mean", CFG.static_dims)
    assert fingerprint(path, "mean", 128) != source and fingerprint(path, "cls", CFG.static_dims) != source
    fitted = fingerprint(path, "mean", CFG.static_dims, SHIPPED)
    assert fitted != source and fingerprint(path, "mean", CFG.static_dims, SHIPPED[1:]) != fitted
    assert fingerprint(path, "mean", CFG.static_dims, [*SHIPPED, "Summarise this email."]) != fitted
    folder = tmp_path / f"{path.name}-{source}"
    folder.mkdir()
    np.save(folder / "vectors.npy", np.zeros((10, CFG.static_dims), np.float32))
    (folder / "meta.json").write_text(json.dumps({"source": "another-model"}))
    called = []

    def teacher_factory() -> FlagEmbedder:
        called.append(True)
        raise RuntimeError("distilling")  # stops before the minute-long distillation: reaching here is the point

    with pytest.raises(RuntimeError, match="distilling"):
        load_or_distill(teacher_factory, path, tmp_path, pooling="mean", dims=CFG.static_dims,
                        max_length=CFG.max_length, kind="minilm")
    assert called
    # A cached model fitted on the shipped exemplars is not reused once the corpus holds one more text.
    with pytest.raises(RuntimeError, match="distilling"):
        load_or_distill(teacher_factory, path, data_dir / "static", pooling="mean", dims=CFG.static_dims,
                        max_length=CFG.max_length, kind="minilm", corpus=[*SHIPPED, "Summarise this email."])
    assert len(called) == 2


def test_vectors_are_unit_norm_and_batch_independent(static):
    texts = ["Convert these dates to ISO format.", "", "Design a sharded key-value store.", "a " * 2000]
    vectors = static.embed(texts)
    assert vectors.shape == (4, static.dim) and vectors.dtype == np.float32
    norms = np.linalg.norm(vectors, axis=1)
    assert np.allclose(norms[[0, 2, 3]], 1.0, atol=1e-5) and norms[1] == 0.0  # no tokens: similar to nothing
    one_by_one = np.vstack([static.embed([t]) for t in texts])
    assert np.allclose(vectors, one_by_one, atol=1e-6)


def test_static_router_uses_its_own_collection_and_routes_held_out_prompts(tmp_path, static, teacher):
    cfg = RouterConfig(embedder=CFG)
    router = Router.build(cfg, TIERS, tmp_path, embedder=static)
    try:
        assert router.store.collection == "tierserve_exemplars-static256" and router.store.dim == 256
        decisions = router.route_inputs([RouteInput(t) for t in NEAR_SMALL + NEAR_LARGE])
    finally:
        router.close()
    want = ["small"] * len(NEAR_SMALL) + ["large"] * len(NEAR_LARGE)
    right = sum(d.tier == w for d, w in zip(decisions, want))
    assert all(d.router == "knn" and not d.fallback for d in decisions)
    assert right >= len(want) - 2, [d.tier for d in decisions]
    # The model's own vectors stay in theirs: switching back needs no new collection name and mixes nothing.
    back = Router.build(RouterConfig(), TIERS, tmp_path, embedder=teacher)
    try:
        assert back.store.collection == "tierserve_exemplars" and back.store.dim == 384
    finally:
        back.close()


def test_repeated_text_is_decided_from_the_cache_until_the_exemplars_change(tmp_path, static):
    from router.deployment import RouterDeployment

    deployment = RouterDeployment(RouterConfig(embedder=CFG), TIERS, str(tmp_path), embedder=static)
    text = NEAR_LARGE[0]

    async def route() -> object:
        return await deployment.route(RouteInput(text))

    try:
        first, second = asyncio.run(route()), asyncio.run(route())
        assert not first.cached and second.cached and second.tier == first.tier
        assert second.overhead_ms < first.overhead_ms and second.embed_ms == 0.0
        before = asyncio.run(deployment.stats()).cache
        assert asyncio.run(deployment.add_exemplars([Exemplar("Name three primary colours.", "small")])) == 1
        third = asyncio.run(route())
        after = asyncio.run(deployment.stats()).cache
    finally:
        deployment.close()
    assert not third.cached  # the exemplars changed: decided again
    assert (before.hits, before.misses, before.hit_rate) == (1, 1, 0.5)
    assert (after.hits, after.misses, after.invalidations - before.invalidations) == (1, 2, 1)
