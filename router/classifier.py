"""Trained-classifier router: P(needs the strong model) from a request's embedding and cheap text features.

A scikit-learn logistic regression (or small MLP) trained on labelled prompts. Labels are difficulties in
[0, 1] (1 = only the strong model gets it right, 0.5 = no difference, 0 = only the weak one does); soft
labels are fitted exactly by giving every prompt a positive row weighted `y` and a negative row weighted
`1 - y`, so the prediction estimates the expected label and ranks prompts by expected gain.

Saved as a folder: `model.joblib` plus `manifest.json` naming the embedder and its dim. Loading checks the
manifest against the router's embedder and refuses a mismatch: vectors from another model are meaningless
to the classifier, and it would route silently at random.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import joblib
import numpy as np

from router.errors import ClassifierMismatchError

logger = logging.getLogger(__name__)

FORMAT = "tierserve-difficulty-classifier/1"
ModelKind = Literal["logreg", "mlp"]

_NUMBER = re.compile(r"\d+(?:[.,]\d+)?")
_MATH = re.compile(r"[+\-*/=^<>%$×÷√∑∫]")
_OPTION = re.compile(r"^\s*[A-Ja-j][.)]\s", re.MULTILINE)
_NEGATION = re.compile(r"\b(NOT|EXCEPT|LEAST|FALSE|INCORRECT)\b")
_WORD = re.compile(r"\w+")

TEXT_FEATURES = (
    "log_chars", "log_words", "log_numbers", "digit_share", "log_math_symbols",
    "log_lines", "log_options", "negation", "questions", "mean_word_len",
)
"""Cheap per-text features added to the embedding (standardized inside the model)."""


def text_features(texts: Sequence[str]) -> np.ndarray:
    """(n, len(TEXT_FEATURES)) float features: length, numbers and math, layout, negated questions."""
    rows = []
    for t in texts:
        words = _WORD.findall(t)
        chars = max(len(t), 1)
        rows.append((
            np.log1p(len(t)),
            np.log1p(len(words)),
            np.log1p(len(_NUMBER.findall(t))),
            sum(c.isdigit() for c in t) / chars,
            np.log1p(len(_MATH.findall(t))),
            np.log1p(t.count("\n")),
            np.log1p(len(_OPTION.findall(t))),
            float(bool(_NEGATION.search(t))),
            float(t.count("?")),
            (sum(len(w) for w in words) / len(words)) if words else 0.0,
        ))
    return np.asarray(rows, dtype=np.float64).reshape(len(texts), len(TEXT_FEATURES))


@dataclass(frozen=True)
class ClassifierManifest:
    """What a saved classifier needs to be used correctly; written as manifest.json."""

    embedder: str
    """`Embedder.name` of the vectors it was trained on."""
    dim: int
    model: ModelKind
    text_features: bool
    """Whether `predict_difficulty` needs the texts as well as the vectors."""
    n_train: int
    trained_on: str = ""
    """Where the labels came from, e.g. "mmlu:train" or "querylog"."""
    params: dict = field(default_factory=dict)
    created: str = ""
    format: str = FORMAT


class DifficultyClassifier:
    """Scores unit vectors (plus texts, if trained with text features) with P(strong model needed)."""

    def __init__(self, estimator, scaler, manifest: ClassifierManifest) -> None:
        self._estimator = estimator
        self._scaler = scaler
        self.manifest = manifest

    @classmethod
    def fit(
        cls,
        vectors: np.ndarray,
        labels: np.ndarray,
        *,
        embedder: str,
        texts: Sequence[str] | None = None,
        model: ModelKind = "logreg",
        c: float = 1.0,
        hidden: int = 64,
        trained_on: str = "",
        seed: int = 0,
    ) -> DifficultyClassifier:
        """Train on (n, dim) vectors and (n,) labels in [0, 1]. Passing `texts` adds `text_features`."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.neural_network import MLPClassifier
        from sklearn.preprocessing import StandardScaler

        vectors = np.asarray(vectors, dtype=np.float64)
        labels = np.clip(np.asarray(labels, dtype=np.float64), 0.0, 1.0)
        if len(vectors) != len(labels) or len(vectors) < 2:
            raise ValueError(f"need matching vectors ({len(vectors)}) and labels ({len(labels)}), at least 2")
        scaler = None
        x = vectors
        if texts is not None:
            scaler = StandardScaler().fit(text_features(texts))
            x = np.hstack([vectors, scaler.transform(text_features(texts))])
        x2 = np.vstack([x, x])
        y2 = np.r_[np.ones(len(x)), np.zeros(len(x))]
        w2 = np.r_[labels, 1.0 - labels]
        keep = w2 > 0
        if len(np.unique(y2[keep])) < 2:
            raise ValueError("labels are all 0 or all 1; a classifier needs both easy and hard examples")
        if model == "logreg":
            est = LogisticRegression(C=c, max_iter=2000)
            params = {"C": c}
        elif model == "mlp":
            est = MLPClassifier(hidden_layer_sizes=(hidden,), alpha=1.0 / c, max_iter=300,
                                early_stopping=False, random_state=seed)
            params = {"hidden": hidden, "alpha": 1.0 / c}
        else:
            raise ValueError(f"model {model!r} is not one of 'logreg', 'mlp'")
        est.fit(x2[keep], y2[keep], sample_weight=w2[keep])
        manifest = ClassifierManifest(
            embedder=embedder, dim=vectors.shape[1], model=model, text_features=texts is not None,
            n_train=len(vectors), trained_on=trained_on, params=params,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        return cls(est, scaler, manifest)

    def predict_difficulty(self, vectors: np.ndarray, texts: Sequence[str] | None = None) -> np.ndarray:
        """(n,) P(strong model needed) in [0, 1] for (n, dim) unit vectors (and their texts)."""
        vectors = np.asarray(vectors, dtype=np.float64)
        if vectors.ndim != 2 or vectors.shape[1] != self.manifest.dim:
            raise ClassifierMismatchError(
                f"vectors have shape {vectors.shape}; this classifier expects (n, {self.manifest.dim}) from "
                f"embedder {self.manifest.embedder!r}."
            )
        x = vectors
        if self.manifest.text_features:
            if texts is None or len(texts) != len(vectors):
                raise ValueError("this classifier was trained with text features; pass the texts with the vectors")
            x = np.hstack([vectors, self._scaler.transform(text_features(texts))])
        return self._estimator.predict_proba(x)[:, 1]

    def check_embedder(self, name: str, dim: int) -> None:
        """Raise ClassifierMismatchError unless (name, dim) is the embedder this classifier was trained on."""
        m = self.manifest
        if (name, dim) != (m.embedder, m.dim):
            raise ClassifierMismatchError(
                f"classifier was trained on embeddings of {m.embedder!r} ({m.dim}-d) but the router's embedder "
                f"is {name!r} ({dim}-d); retrain it with `tierserve train-router` using this embedder, or set "
                f"router.embedder back to the one it was trained with."
            )

    def save(self, path: str | os.PathLike) -> Path:
        """Write `model.joblib` and `manifest.json` into the folder `path` (created if needed)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        joblib.dump({"estimator": self._estimator, "scaler": self._scaler}, path / "model.joblib")
        (path / "manifest.json").write_text(json.dumps(asdict(self.manifest), indent=2) + "\n")
        return path

    @classmethod
    def load(
        cls, path: str | os.PathLike, *, embedder_name: str | None = None, dim: int | None = None
    ) -> DifficultyClassifier:
        """Load a saved classifier; with `embedder_name`/`dim` given, refuse one trained on another embedder."""
        path = Path(path)
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"{path}: no manifest.json; point the router at a folder written by `tierserve train-router`."
            )
        data = json.loads(manifest_path.read_text())
        if data.get("format") != FORMAT:
            raise ClassifierMismatchError(f"{manifest_path}: format {data.get('format')!r}, expected {FORMAT!r}")
        manifest = ClassifierManifest(**data)
        blob = joblib.load(path / "model.joblib")
        clf = cls(blob["estimator"], blob["scaler"], manifest)
        if embedder_name is not None or dim is not None:
            clf.check_embedder(embedder_name or manifest.embedder, manifest.dim if dim is None else dim)
        logger.info("classifier loaded from %s (%s on %s, %d train rows)", path, manifest.model,
                    manifest.embedder, manifest.n_train)
        return clf
