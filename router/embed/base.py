"""The embedder interface the router decides with, and the re-check pairing of a fast and an exact embedder.

`RecheckEmbedder` pairs a fast, approximate embedder (int8 ONNX) with an exact one: the router decides on the
fast vector and re-embeds exactly only the texts whose kNN score lands within `margin` of a tier boundary
(`near_boundary`), so its decisions are the exact model's wherever the fast score error is below the margin.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from router.knn import Search, nearest_neighbors


class Embedder(ABC):
    """Turns texts into L2-normalized float32 vectors; cosine similarity is then a dot product."""

    dim: int
    """Vector size."""
    name: str
    """Short description for logs and the store's metadata, e.g. `minilm:model`."""

    @abstractmethod
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed `texts`; returns float32 of shape (len(texts), dim) with unit-norm rows."""

    def neighbor_search(self) -> Search:
        """The kNN search for vectors of this embedder: numpy's, or one that runs on the embedder's own pool."""
        return nearest_neighbors


class RecheckEmbedder(Embedder):
    """Fast vectors for kNN routing, exact ones near a tier boundary and everywhere else.

    `embed()` returns the exact model's vectors, so exemplars written to the store, the classifier and any
    caller unaware of the band get exact vectors. Only the kNN router calls `embed_fast()` and then
    `embed_recheck()` for the texts whose fast score is within `margin` of a boundary.
    """

    def __init__(self, fast: Embedder, exact: Embedder, *, margin: float) -> None:
        if fast.dim != exact.dim:
            raise ValueError(f"fast embedder dim ({fast.dim}) differs from the exact one's ({exact.dim}).")
        if margin <= 0:
            raise ValueError(f"re-check margin ({margin}) must be > 0.")
        self.fast = fast
        self.exact = exact
        self.margin = margin
        """Half-width of the score band around each boundary in which the exact model decides."""
        self.dim = exact.dim
        self.name = exact.name  # same vector space: stores and classifiers built with either accept it
        self.fast_texts = 0
        """Texts embedded by `embed_fast` so far."""
        self.rechecked_texts = 0
        """Texts re-embedded by `embed_recheck` so far (near a boundary)."""

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.exact.embed(texts)

    def embed_fast(self, texts: Sequence[str]) -> np.ndarray:
        """The approximate vectors the first routing pass uses."""
        self.fast_texts += len(texts)
        return self.fast.embed(texts)

    def embed_recheck(self, texts: Sequence[str]) -> np.ndarray:
        """The exact vectors for texts whose fast score fell near a boundary (counted in `rechecked_texts`)."""
        self.rechecked_texts += len(texts)
        return self.exact.embed(texts)

    def neighbor_search(self) -> Search:
        return self.fast.neighbor_search()


def near_boundary(scores: np.ndarray, thresholds: Sequence[Sequence[float]], margin: float) -> np.ndarray:
    """Rows whose score is within `margin` (exclusive) of any of that row's thresholds; NaN scores are not.

    scores: (n,) difficulty scores; thresholds: n ascending tuples (per-request thresholds may differ).
    """
    scores = np.asarray(scores, dtype=np.float64)
    if len(thresholds) != len(scores):
        raise ValueError(f"{len(scores)} scores but {len(thresholds)} threshold tuples.")
    out = np.zeros(len(scores), dtype=bool)
    if margin <= 0:
        return out
    for row, (score, bounds) in enumerate(zip(scores, thresholds)):
        out[row] = any(abs(score - b) < margin for b in bounds)  # False for NaN
    return out
