"""The ONNX Runtime embedder backends on the bundled MiniLM: exported once, checked against torch, cached."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from router.config import EmbedderConfig
from router.embedder import FlagEmbedder, build_embedder
from router.onnx_embedder import MIN_COSINE, OnnxEmbedder

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


def test_int8_is_used_only_if_it_passes_its_check(cache: Path) -> None:
    embedder = build_embedder(EmbedderConfig(backend="onnx-int8"), cache)
    (folder,) = (cache / "onnx").iterdir()
    check = json.loads((folder / "check-int8.json").read_text())
    passed = check["min_cosine"] >= MIN_COSINE and check["clear_flips"] == 0
    assert isinstance(embedder, OnnxEmbedder if passed else FlagEmbedder)
    assert 0.9 < check["min_cosine"] <= check["mean_cosine"] <= 1.0
    assert 0.9 < check["same_decisions"] <= 1.0
