"""A trained classifier saved to disk, loaded by the live Router from config, routes held-out prompts."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from router.classifier import DifficultyClassifier
from router.config import RouterConfig
from router.core import Router
from router.embed import default_embedder
from router.errors import ClassifierMismatchError
from router.exemplars import load_default_exemplars
from tests.routing import route

ROUTINE = [
    "Pull the phone number out of this line: 'Call Dana at 555-0142 after lunch.'",
    "Convert 'twelve thousand five hundred' to digits.",
]
HARD = [
    "Compare the enforceability of a non-compete clause under California, New York and German law for a remote "
    "engineer, and advise the employer on drafting risks.",
    "A patient on warfarin starts amiodarone and has an INR of 5.8 with gum bleeding; weigh reversal against "
    "thrombotic risk and justify a management plan step by step.",
]


@pytest.fixture(scope="module")
def embedder():
    return default_embedder()


@pytest.fixture(scope="module")
def saved_classifier(embedder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    exemplars = [e for e in load_default_exemplars() if e.tier in ("small", "large")]
    texts = [e.text for e in exemplars]
    labels = np.array([1.0 if e.tier == "large" else 0.0 for e in exemplars])
    clf = DifficultyClassifier.fit(embedder.embed(texts), labels, embedder=embedder.name, trained_on="defaults")
    return clf.save(tmp_path_factory.mktemp("clf") / "classifiers" / "defaults")


def test_live_router_routes_with_the_saved_classifier(embedder, saved_classifier: Path, tmp_path: Path) -> None:
    data_dir = saved_classifier.parent.parent  # classifier_path is relative to the data dir
    cfg = RouterConfig(default_router="classifier", classifier_path="classifiers/defaults",
                       store={"path": str(tmp_path / "qdrant")}, seed_default_exemplars=False)
    router = Router.build(cfg, ["small", "large"], data_dir, embedder=embedder)
    try:
        decisions = route(router, ROUTINE + HARD)
        assert [d.router for d in decisions] == ["classifier"] * 4
        assert [d.tier for d in decisions] == ["small", "small", "large", "large"]
        assert all(not d.fallback for d in decisions)
        # Same scores as the classifier object the test trained and saved.
        direct = DifficultyClassifier.load(saved_classifier).predict_difficulty(embedder.embed(ROUTINE + HARD))
        assert [d.score for d in decisions] == pytest.approx(direct.tolist(), abs=1e-6)
        # Per-request threshold still applies: at 1.0 nothing goes to large.
        assert {d.tier for d in route(router, HARD, threshold=1.0, router_kind="classifier")} == {"small"}
    finally:
        router.close()


def test_router_without_a_classifier_falls_back_per_request(embedder, tmp_path: Path) -> None:
    cfg = RouterConfig(store={"path": str(tmp_path / "qdrant")}, seed_default_exemplars=False)
    router = Router.build(cfg, ["small", "large"], tmp_path, embedder=embedder)
    try:
        (decision,) = route(router, [HARD[0]], router_kind="classifier")
        assert decision.fallback and decision.router == "heuristic"
        assert router.fallbacks["classifier"] == 1
    finally:
        router.close()


def test_mismatched_embedder_is_refused_at_start(saved_classifier: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(saved_classifier, tmp_path / "clf")
    manifest = copy / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"dim": 384', '"dim": 1024'))
    cfg = RouterConfig(classifier_path=str(copy), store={"path": str(tmp_path / "q")})
    with pytest.raises(ClassifierMismatchError):
        Router.build(cfg, ["small", "large"], tmp_path)


def test_default_router_classifier_requires_a_path() -> None:
    with pytest.raises(ValueError, match="classifier_path"):
        RouterConfig(default_router="classifier")
