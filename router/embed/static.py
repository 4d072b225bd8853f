"""A static embedder distilled from the router's own model: one vector per token, a text is their mean.

Why: on a CPU router the transformer's forward pass is most of a routing decision (9.3 of 10.9 ms at c=1 with
fp32 ONNX, and 90-119 decisions/s at most on 2 cores), so a traffic peak pushes `auto` onto the busy fallback.
A static embedder looks its tokens up instead: no matrix product per layer, tens of microseconds per text.

How (model2vec's distillation recipe, computed here from the local model, offline, once per model):
- every token of the teacher's vocabulary goes through the teacher alone (`[CLS] token [SEP]`) and is pooled as
  the teacher pools (`FlagEmbedder.token_vectors`);
- PCA (centred, top `dims` components) decorrelates the rows and drops the direction every token shares;
- Zipf/SIF weighting, `sif / (sif + p(rank))` with p ∝ 1/rank by vocabulary order, shrinks the frequent tokens
  (the vocabularies list them first), so a mean over a text's tokens is led by its rare, topical ones;
- a text is the mean of its tokens' rows (no special tokens, truncated at `max_length` tokens), L2-normalised.

The vectors live in their own space (not the teacher's), so the router keeps them in their own collection
(`EmbedderConfig.vector_space`). Whether it routes as well as its teacher is measured, not assumed:
`python -m benchmarks.embedder_quality` writes `benchmarks/embedder_quality.md`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from router.embed.base import Embedder

if TYPE_CHECKING:
    from router.embed.flag import FlagEmbedder

logger = logging.getLogger(__name__)

STATIC_VERSION = 1
"""Bumped when `distill` changes, so cached static models of an older kind are made again."""
SIF_COEFFICIENT = 1e-4
"""model2vec's default: tokens more frequent than about this share of the text are shrunk."""


class StaticEmbedder(Embedder):
    """Mean of per-token vectors, L2-normalised; the teacher's tokenizer, without special tokens."""

    def __init__(self, vectors: np.ndarray, tokenizer_dir: Path, *, max_length: int, name: str) -> None:
        from transformers import AutoTokenizer

        if vectors.ndim != 2:
            raise ValueError(f"static vectors must be a (vocabulary, dims) matrix, got shape {vectors.shape}.")
        hf_tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        self._tokenizer = hf_tokenizer.backend_tokenizer
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length)
        self._lock = threading.Lock()  # a fast tokenizer shared by two threads can fail ("Already borrowed")
        self._vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.dim = int(vectors.shape[1])
        self.name = name

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        with self._lock:
            encodings = self._tokenizer.encode_batch(texts, add_special_tokens=False)
        ids = [np.asarray(e.ids, dtype=np.int64) for e in encodings]
        lengths = np.array([len(i) for i in ids])
        rows = np.flatnonzero(lengths)  # a text without tokens keeps a zero vector (similar to nothing)
        if rows.size:
            flat = np.concatenate([ids[r] for r in rows])
            starts = np.concatenate([[0], np.cumsum(lengths[rows])[:-1]])
            sums = np.add.reduceat(self._vectors[flat], starts, axis=0)
            out[rows] = sums / lengths[rows, None]
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
        return out


def distill(teacher: FlagEmbedder, *, dims: int, token_ids: Sequence[int] | None = None,
            sif_coefficient: float = SIF_COEFFICIENT) -> np.ndarray:
    """The static vectors of `teacher`'s vocabulary, (vocabulary, min(dims, teacher.dim)) float32.

    `token_ids`: distil only these rows (the others stay zero; for tests); None: the whole vocabulary.
    """
    vocab_size = teacher.vocab_size
    ids = np.arange(vocab_size) if token_ids is None else np.asarray(sorted(set(token_ids)), dtype=np.int64)
    raw = teacher.token_vectors(ids.tolist()).astype(np.float64)
    dims = min(dims, raw.shape[1], len(ids))
    centred = raw - raw.mean(axis=0)
    # PCA from the (dim x dim) covariance: the top `dims` directions, largest first (an SVD of the rows would
    # hold a copy of BGE-M3's 250k x 1024 matrix more).
    _, eigvecs = np.linalg.eigh(centred.T @ centred)
    projected = centred @ eigvecs[:, ::-1][:, :dims]
    inv_rank = 1.0 / np.arange(2, vocab_size + 2)
    proba = inv_rank / inv_rank.sum()
    weights = sif_coefficient / (sif_coefficient + proba[ids])
    vectors = np.zeros((vocab_size, dims), dtype=np.float32)
    vectors[ids] = (projected * weights[:, None]).astype(np.float32)
    return vectors


def load_or_distill(teacher: Callable[[], FlagEmbedder], model_dir: Path, cache_dir: Path, *, pooling: str,
                    dims: int, max_length: int, kind: str) -> StaticEmbedder:
    """The static embedder of the model in `model_dir`, distilled into `cache_dir` once per source model and
    `dims` (`teacher()` loads the model only then), and loaded from there. A cached copy is used only if it
    was made from the same model files by the same recipe."""
    source = fingerprint(model_dir, pooling, dims)
    folder = cache_dir / f"{model_dir.name}-{source}"
    vectors_file = folder / "vectors.npy"
    if not _valid(folder, source):
        logger.info("distilling a static embedder from %s into %s (once per model; about a minute for MiniLM "
                    "on 2 cores)", model_dir, folder)
        vectors = distill(teacher(), dims=dims)
        folder.mkdir(parents=True, exist_ok=True)
        # Written under temporary names and renamed: a process killed mid-write leaves no half model behind.
        with tempfile.NamedTemporaryFile(dir=folder, suffix=".npy", delete=False) as tmp:
            np.save(tmp, vectors)
        os.replace(tmp.name, vectors_file)
        meta = {"source": source, "version": STATIC_VERSION, "teacher": str(model_dir), "pooling": pooling,
                "vocabulary": int(vectors.shape[0]), "dims": int(vectors.shape[1]),
                "sif_coefficient": SIF_COEFFICIENT}
        (folder / "meta.json.tmp").write_text(json.dumps(meta, indent=1))
        os.replace(folder / "meta.json.tmp", folder / "meta.json")
    vectors = np.load(vectors_file)
    # The fingerprint in the name keeps another recipe's vectors apart wherever names key them (the eval
    # cache, a saved classifier's embedder check).
    name = f"static-{kind}:{model_dir.name}:{source}"
    logger.info("static embedder %s: %d tokens x %d dims from %s", name, vectors.shape[0], vectors.shape[1], folder)
    return StaticEmbedder(vectors, model_dir, max_length=max_length, name=name)


def fingerprint(model_dir: Path, pooling: str, dims: int) -> str:
    """Identifies a static model: the recipe's version, pooling, dims, and the teacher's files (names, sizes,
    config.json)."""
    h = hashlib.sha256(f"static{STATIC_VERSION}:{pooling}:{dims}:{SIF_COEFFICIENT}".encode())
    for f in sorted(model_dir.iterdir()):
        if f.is_file():
            h.update(f.name.encode() + str(f.stat().st_size).encode())
    h.update((model_dir / "config.json").read_bytes())
    return h.hexdigest()[:16]


def _valid(folder: Path, source: str) -> bool:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("source") == source and (folder / "vectors.npy").is_file()
