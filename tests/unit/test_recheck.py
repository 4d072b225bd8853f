"""The exact re-check near a boundary: band arithmetic, the check's verdict, and the router's second pass.

The router tests use a real local Qdrant store and table embedders (real `Embedder` subclasses that return
fixed vectors), so which text is re-checked, and what it then decides, is known exactly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from router.config import KnnConfig, RouterConfig
from router.core import Router
from router.embed import Embedder, RecheckEmbedder, near_boundary
from router.embed.onnx import (
    MAX_RECHECK_SHARE,
    RECHECK_FLOOR,
    OnnxCheck,
    _cached_check,
    compare,
    recheck_margin,
)
from router.store import ExemplarStore
from router.types import Exemplar, RouteInput
from tests.routing import route

TIERS = ["small", "large"]


class TableEmbedder(Embedder):
    """Returns the vector listed for each text (unit-normalized); raises for an unknown text."""

    def __init__(self, table: dict[str, Sequence[float]], name: str = "table") -> None:
        self.table = {t: np.asarray(v, np.float32) / np.linalg.norm(v) for t, v in table.items()}
        self.dim = len(next(iter(self.table.values())))
        self.name = name
        self.calls: list[list[str]] = []

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return np.stack([self.table[t] for t in texts]) if texts else np.empty((0, self.dim), np.float32)


# -- pure pieces ------------------------------------------------------------------------------------------


def test_near_boundary_uses_each_rows_thresholds_and_an_open_band() -> None:
    scores = np.array([0.5, 0.58, 0.62, 0.1, 0.3, np.nan])
    thresholds = [(0.5,), (0.5,), (0.5,), (0.5,), (0.25, 0.75), (0.5,)]
    got = near_boundary(scores, thresholds, 0.1)
    assert got.tolist() == [True, True, False, False, True, False]
    assert not near_boundary(np.array([0.75]), [(0.5,)], 0.25).any()  # exactly margin away: outside
    assert not near_boundary(scores, thresholds, 0.0).any()


def test_near_boundary_rejects_mismatched_thresholds() -> None:
    with pytest.raises(ValueError, match="2 scores but 1 threshold"):
        near_boundary(np.array([0.1, 0.2]), [(0.5,)], 0.1)


def test_recheck_margin_is_factor_times_worst_error_with_a_floor() -> None:
    ref = np.array([0.1, 0.5, 0.9])
    assert recheck_margin(ref, ref + np.array([0.0, -0.08, 0.02])) == pytest.approx(1.5 * 0.08)
    assert recheck_margin(ref, ref, floor=0.03) == 0.03
    assert recheck_margin(ref, ref + 0.01, factor=2.0, floor=0.0) == pytest.approx(0.02)


def _check(**overrides: object) -> OnnxCheck:
    base = {"source": "s", "n": 100, "min_cosine": 0.997, "mean_cosine": 0.998, "same_decisions": 0.98,
            "clear_flips": 2, "max_score_error": 0.1, "recheck_margin": 0.15, "recheck_share": 0.3,
            "flips_after_recheck": 0}
    return OnnxCheck(**{**base, **overrides})


def test_check_verdicts() -> None:
    assert _check().passed  # clear flips alone are fine when the re-check repairs them
    assert "despite the re-check" in _check(flips_after_recheck=1).problems()[0]
    assert "min cosine" in _check(min_cosine=0.98).problems()[0]
    too_wide = _check(recheck_share=MAX_RECHECK_SHARE + 0.01).problems()
    assert len(too_wide) == 1 and "band" in too_wide[0]
    no_recheck = _check(recheck_margin=0.0, recheck_share=0.0, flips_after_recheck=2)
    assert "2 clear kNN decisions flipped" in no_recheck.problems()[0]
    assert _check(recheck_margin=0.0, recheck_share=0.0, clear_flips=0, flips_after_recheck=1).passed


def test_cached_check_is_redone_when_stale(tmp_path: Path) -> None:
    path = tmp_path / "check-int8.json"
    old = {k: v for k, v in asdict(_check()).items() if k not in ("max_score_error", "recheck_margin",
                                                                  "recheck_share", "flips_after_recheck")}
    path.write_text(json.dumps(old))
    assert _cached_check(path, recheck=True) is None  # written before the re-check existed
    path.write_text(json.dumps(asdict(_check(recheck_margin=0.0))))
    assert _cached_check(path, recheck=True) is None  # no band, but one is needed
    assert _cached_check(path, recheck=False) == _check(recheck_margin=0.0)


def test_compare_with_recheck_repairs_every_flip_by_construction() -> None:
    rng = np.random.default_rng(3)
    centers = rng.normal(size=(6, 16))
    vecs = np.repeat(centers, 20, axis=0) + 0.9 * rng.normal(size=(120, 16))
    texts = [f"t{i}" for i in range(120)]
    labels = [float(i % 3 == 0) for i in range(120)]  # labels cut across the clusters: many close calls
    exact = TableEmbedder(dict(zip(texts, vecs)))
    noisy = TableEmbedder(dict(zip(texts, vecs + 0.35 * rng.normal(size=vecs.shape))))
    alone = compare(exact, noisy, texts, labels)
    assert alone.recheck_margin == 0 and alone.same_decisions < 1  # the noise does flip decisions
    check = compare(exact, noisy, texts, labels, recheck_with=exact)
    assert check.flips_after_recheck == 0
    assert check.recheck_margin == pytest.approx(max(RECHECK_FLOOR, 1.5 * check.max_score_error))
    assert 0 < check.recheck_share < 1
    assert check.same_decisions == alone.same_decisions and check.clear_flips == alone.clear_flips


# -- the router's second pass -----------------------------------------------------------------------------

EXEMPLARS = {"easy one": ([1, 0, 0], "small"), "hard one": ([0, 1, 0], "large")}
# Fast vectors: "clear" sits on the easy exemplar; "close" halfway (score 0.5). The exact model puts "close"
# on the hard exemplar.
FAST = {"clear": [1, 0.05, 0], "close": [1, 1, 0.2]}
EXACT = {"clear": [1, 0.05, 0], "close": [0.1, 1, 0]}


@pytest.fixture
def store(tmp_path: Path):
    store = ExemplarStore(collection="recheck", dim=3, path=tmp_path / "qdrant")
    store.upsert([Exemplar(t, tier) for t, (_, tier) in EXEMPLARS.items()],
                 np.array([v for v, _ in EXEMPLARS.values()], np.float32))
    yield store
    store.close()


def _router(store: ExemplarStore, embedder: Embedder) -> Router:
    return Router(RouterConfig(knn=KnnConfig(k=2)), TIERS, embedder=embedder, store=store)


def test_router_rechecks_only_near_the_boundary_and_decides_on_the_exact_vector(store: ExemplarStore) -> None:
    fast, exact = TableEmbedder(FAST), TableEmbedder(EXACT)
    recheck = RecheckEmbedder(fast, exact, margin=0.1)
    clear, close = _router(store, recheck).route_inputs([RouteInput(t) for t in ["clear", "close"]])
    assert fast.calls == [["clear", "close"]] and exact.calls == [["close"]]
    assert (recheck.fast_texts, recheck.rechecked_texts) == (2, 1)
    assert clear.tier == "small" and clear.score < 0.1
    exact_close = _router(store, exact).route_inputs([RouteInput(t) for t in ["close"]])[0]
    assert close.tier == "large" == exact_close.tier
    assert close.score == pytest.approx(exact_close.score) and close.neighbors == exact_close.neighbors
    assert close.embed_ms > 0


def test_band_follows_the_per_request_threshold(store: ExemplarStore) -> None:
    fast, exact = TableEmbedder(FAST), TableEmbedder(EXACT)
    recheck = RecheckEmbedder(fast, exact, margin=0.1)
    (far,) = _router(store, recheck).route_inputs([RouteInput("close", threshold=0.9)])
    assert exact.calls == [] and far.tier == "small" and math.isclose(far.score, 0.5, abs_tol=0.05)
    (near,) = _router(store, recheck).route_inputs([RouteInput("clear", threshold=0.05)])
    assert exact.calls == [["clear"]] and near.router == "knn"


def test_failing_recheck_falls_back_to_the_heuristic(store: ExemplarStore) -> None:
    recheck = RecheckEmbedder(TableEmbedder(FAST), TableEmbedder({"unrelated": [0, 0, 1]}), margin=0.1)
    router = _router(store, recheck)
    decisions = route(router, ["clear", "close"])
    assert [d.router for d in decisions] == ["heuristic", "heuristic"] and all(d.fallback for d in decisions)
    assert router.fallbacks["embedder"] == 2


def test_recheck_embedder_hands_out_exact_vectors_by_default() -> None:
    fast, exact = TableEmbedder(FAST, name="fast"), TableEmbedder(EXACT, name="exact")
    recheck = RecheckEmbedder(fast, exact, margin=0.1)
    assert np.array_equal(recheck.embed(["close"]), exact.embed(["close"]))
    assert recheck.name == "exact" and recheck.dim == 3 and fast.calls == []
    with pytest.raises(ValueError, match="margin"):
        RecheckEmbedder(fast, exact, margin=0.0)
