"""The classifier router with the bundled embedder on real GSM8K prompts: train on train, save, load,
identical predictions, and a refused embedder mismatch."""

from __future__ import annotations

import json

import numpy as np
import pytest

from router.classifier import DifficultyClassifier
from router.errors import ClassifierMismatchError
from router.eval import metrics
from router.eval.datasets import default_data_dir, difficulty_label, load_dataset
from router.eval.embcache import EmbeddingCache

DATA = default_data_dir()
pytestmark = pytest.mark.skipif(
    not (DATA / "routellm").is_dir(), reason=f"shared routing data not found at {DATA} (set TIERSERVE_EVAL_DATA)"
)


@pytest.fixture(scope="module")
def gsm8k(tmp_path_factory):
    from router.embed import default_embedder

    cache = EmbeddingCache(default_embedder(), tmp_path_factory.mktemp("emb"))
    ds = load_dataset("gsm8k", DATA)
    train, test = ds.train.iloc[:300], ds.test.iloc[:200]
    return {
        "cache": cache,
        "train": train,
        "test": test,
        "train_vectors": cache.embed(train["prompt"].tolist(), progress=False),
        "test_vectors": cache.embed(test["prompt"].tolist(), progress=False),
    }


def _fit(d, **kw):
    train = d["train"]
    return DifficultyClassifier.fit(d["train_vectors"], difficulty_label(train), embedder=d["cache"].name,
                                    texts=train["prompt"].tolist(), trained_on="gsm8k:train", **kw)


def test_round_trip_gives_identical_predictions(gsm8k, tmp_path):
    clf = _fit(gsm8k, c=0.1)
    texts = gsm8k["test"]["prompt"].tolist()
    before = clf.predict_difficulty(gsm8k["test_vectors"], texts=texts)
    clf.save(tmp_path / "clf")
    manifest = json.loads((tmp_path / "clf" / "manifest.json").read_text())
    assert manifest["embedder"] == gsm8k["cache"].name and manifest["dim"] == 384
    assert manifest["text_features"] is True and manifest["n_train"] == 300
    loaded = DifficultyClassifier.load(tmp_path / "clf", embedder_name=gsm8k["cache"].name, dim=384)
    after = loaded.predict_difficulty(gsm8k["test_vectors"], texts=texts)
    np.testing.assert_array_equal(before, after)
    assert before.min() >= 0.0 and before.max() <= 1.0 and before.std() > 0.01


def test_it_learns_something_on_held_out_prompts(gsm8k):
    clf = _fit(gsm8k, c=0.1)
    test = gsm8k["test"]
    scores = clf.predict_difficulty(gsm8k["test_vectors"], texts=test["prompt"].tolist())
    strong, weak = test["strong"].to_numpy(float), test["weak"].to_numpy(float)
    curve = metrics.threshold_sweep(scores, strong, weak)
    assert metrics.apgr(curve, strong.mean() * 100, weak.mean() * 100) > 0.55  # random: 0.5


def test_mismatched_embedder_is_refused(gsm8k, tmp_path):
    _fit(gsm8k, c=0.1).save(tmp_path / "clf")
    with pytest.raises(ClassifierMismatchError, match=r"'bge-m3:bge-m3' \(1024-d\)"):
        DifficultyClassifier.load(tmp_path / "clf", embedder_name="bge-m3:bge-m3", dim=1024)
    with pytest.raises(ClassifierMismatchError, match="minilm"):
        DifficultyClassifier.load(tmp_path / "clf", embedder_name="minilm:other-model", dim=384)
    loaded = DifficultyClassifier.load(tmp_path / "clf")
    with pytest.raises(ClassifierMismatchError, match=r"\(n, 384\)"):
        loaded.predict_difficulty(np.zeros((2, 1024)), texts=["a", "b"])
    with pytest.raises(ValueError, match="text features"):
        loaded.predict_difficulty(gsm8k["test_vectors"][:2])


def test_embeddings_only_mlp_round_trips(gsm8k, tmp_path):
    train = gsm8k["train"]
    clf = DifficultyClassifier.fit(gsm8k["train_vectors"], difficulty_label(train), embedder=gsm8k["cache"].name,
                                   model="mlp", hidden=16, c=1.0)
    clf.save(tmp_path / "mlp")
    loaded = DifficultyClassifier.load(tmp_path / "mlp", embedder_name=gsm8k["cache"].name, dim=384)
    np.testing.assert_array_equal(clf.predict_difficulty(gsm8k["test_vectors"]),
                                  loaded.predict_difficulty(gsm8k["test_vectors"]))
    assert loaded.manifest.model == "mlp" and not loaded.manifest.text_features


def test_missing_folder_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-router"):
        DifficultyClassifier.load(tmp_path / "nothing")
