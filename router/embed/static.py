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

Then tokenlearn's step (how model2vec makes its "potion" models), offline on a corpus of texts (`fit`): the rows
are trained so that a text's normalised mean of rows points where the teacher's own (normalised) sentence
embedding of that text points, rotated into the distillation's PCA basis (`Distilled.project`: the basis only, not
the token centre, which is 3.7 long against unit sentence vectors and would point every target the same way).
Loss: cosine distance, with a small L2 pull towards the distilled rows; the fit starts from them, and rows of
tokens the corpus never shows are not changed. The SIF weights stay folded into the rows, whose lengths (a
per-token weight) are learned with their directions. The router fits on its shipped exemplars' texts at first
start; the quality benchmark fits one model on the train splits of all its sets (never their test splits), as
one router serves all traffic.

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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from router.embed.base import Embedder

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from router.embed.flag import FlagEmbedder

logger = logging.getLogger(__name__)

STATIC_VERSION = 2
"""Bumped when `distill` or `fit` changes, so cached static models of an older kind are made again."""
SIF_COEFFICIENT = 1e-4
"""model2vec's default: tokens more frequent than about this share of the text are shrunk."""


@dataclass(frozen=True)
class FitSettings:
    """How `fit` trains the distilled rows: Adam, `epochs` passes over the corpus in shuffled mini-batches."""

    epochs: int = 5
    lr: float = 3e-3
    """Adam's step, for rows scaled to a mean length of 1."""
    l2: float = 1e-6
    """Pull of the rows towards their distilled values: l2 * |row - distilled|^2, summed over rows. Measured on
    the benchmark's train texts: 1e-4 and 1e-5 held the rows back (kNN neighbours shared with the teacher's,
    top 20 of held-out texts: 40% and 47%; 1e-6: 52%; none: 54%)."""
    batch_size: int = 64
    seed: int = 0

    def key(self) -> str:
        return f"{self.epochs}:{self.lr:g}:{self.l2:g}:{self.batch_size}:{self.seed}"


FIT = FitSettings()


@dataclass(frozen=True)
class Distilled:
    """`distill`'s output: the static rows, and the projection that made them (for `project`)."""

    vectors: np.ndarray
    """(vocabulary, dims) float32; rows not distilled are zero."""
    basis: np.ndarray
    """(teacher dim, dims) the PCA directions, largest first."""

    def project(self, embeddings: np.ndarray) -> np.ndarray:
        """The teacher's sentence embeddings as `fit`'s targets: rotated into the PCA basis, not centred (centred
        on the token vectors' mean every target pointed nearly the same way: kNN routed worse)."""
        return (np.asarray(embeddings, np.float64) @ self.basis).astype(np.float32)


class StaticEmbedder(Embedder):
    """Mean of per-token vectors, L2-normalised; the teacher's tokenizer, without special tokens."""

    def __init__(self, vectors: np.ndarray, tokenizer_dir: Path | None, *, max_length: int, name: str,
                 tokenizer: Tokenizer | None = None) -> None:
        """The teacher's tokenizer from `tokenizer_dir` (through transformers), or `tokenizer` itself."""
        if vectors.ndim != 2:
            raise ValueError(f"static vectors must be a (vocabulary, dims) matrix, got shape {vectors.shape}.")
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir)).backend_tokenizer
        self._tokenizer = tokenizer
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length)
        self._lock = threading.Lock()  # a fast tokenizer shared by two threads can fail ("Already borrowed")
        self._vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self._max_length = max_length
        self.dim = int(vectors.shape[1])
        self.name = name

    def __reduce__(self) -> tuple:
        """Pickled as its rows and its tokenizer's JSON (the router hands its overflow to the ingress, which
        then needs neither the model's files nor transformers, whose import takes seconds)."""
        return _restore, (self._vectors, self._tokenizer.to_str(), self._max_length, self.name)

    @property
    def vectors(self) -> np.ndarray:
        """The (vocabulary, dims) rows, read-only."""
        view = self._vectors.view()
        view.flags.writeable = False
        return view

    def token_ids(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Each text's token ids as `embed` averages them: no special tokens, truncated at `max_length`."""
        if not texts:
            return []
        with self._lock:
            encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encodings]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        ids = self.token_ids(texts)
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


def _restore(vectors: np.ndarray, tokenizer_json: str, max_length: int, name: str) -> StaticEmbedder:
    from tokenizers import Tokenizer

    return StaticEmbedder(vectors, None, max_length=max_length, name=name,
                          tokenizer=Tokenizer.from_str(tokenizer_json))


def distill(teacher: FlagEmbedder, *, dims: int, token_ids: Sequence[int] | None = None,
            sif_coefficient: float = SIF_COEFFICIENT) -> Distilled:
    """The static vectors of `teacher`'s vocabulary, (vocabulary, min(dims, teacher.dim)) float32, and their
    projection.

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
    basis = eigvecs[:, ::-1][:, :dims]
    projected = centred @ basis
    inv_rank = 1.0 / np.arange(2, vocab_size + 2)
    proba = inv_rank / inv_rank.sum()
    weights = sif_coefficient / (sif_coefficient + proba[ids])
    vectors = np.zeros((vocab_size, dims), dtype=np.float32)
    vectors[ids] = (projected * weights[:, None]).astype(np.float32)
    return Distilled(vectors, basis)


def fit(vectors: np.ndarray, token_ids: Sequence[np.ndarray], targets: np.ndarray,
        settings: FitSettings = FIT) -> np.ndarray:
    """`vectors` trained so that each text's normalised mean of rows (`token_ids`, as `StaticEmbedder.token_ids`
    gives them) has a high cosine with its row of `targets` (`Distilled.project` of the teacher's embeddings).

    Returns new rows, scaled to a mean length of 1 over the rows that are not zero (the scale of all rows
    together changes no embedding). Rows of tokens absent from the texts are the input's, rescaled.
    """
    import torch

    keep = [i for i, t in enumerate(token_ids) if len(t)]
    if not keep:
        raise ValueError("fit needs at least one text with tokens.")
    norms = np.linalg.norm(vectors, axis=1)
    scale = float(norms[norms > 0].mean()) if (norms > 0).any() else 1.0
    init = torch.from_numpy(np.asarray(vectors, np.float32) / scale)
    rows = torch.nn.Parameter(init.clone())
    target = torch.nn.functional.normalize(torch.from_numpy(np.asarray(targets, np.float32)[keep]), dim=1)
    ids = [torch.from_numpy(token_ids[i]) for i in keep]
    optimiser = torch.optim.Adam([rows], lr=settings.lr)
    generator = np.random.default_rng(settings.seed)
    started, losses = time.perf_counter(), []
    for _ in range(settings.epochs):
        order = generator.permutation(len(ids))
        losses.clear()
        for start in range(0, len(order), settings.batch_size):
            batch = order[start:start + settings.batch_size]
            flat = torch.cat([ids[i] for i in batch])
            offsets = torch.tensor(np.concatenate([[0], np.cumsum([len(ids[i]) for i in batch])[:-1]]))
            means = torch.nn.functional.embedding_bag(flat, rows, offsets, mode="mean")
            cosine = (torch.nn.functional.normalize(means, dim=1) * target[batch]).sum(dim=1)
            loss = (1 - cosine).mean() + settings.l2 * ((rows - init) ** 2).sum()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
        logger.info("static fit: epoch loss %.4f", float(np.mean(losses)))
    logger.info("static fit: %d texts, %d epochs in %.1f s", len(ids), settings.epochs, time.perf_counter() - started)
    return rows.detach().numpy().copy()


def load_or_distill(teacher: Callable[[], FlagEmbedder], model_dir: Path, cache_dir: Path, *, pooling: str,
                    dims: int, max_length: int, kind: str, corpus: Sequence[str] = (),
                    settings: FitSettings = FIT) -> StaticEmbedder:
    """The static embedder of the model in `model_dir`, distilled into `cache_dir` once per source model,
    `dims` and `corpus` (`teacher()` loads the model only then), and loaded from there. With a `corpus` the
    distilled rows are then fitted on its texts (`fit`; duplicates and order do not matter). A cached copy is
    used only if it was made from the same model files, corpus and recipe."""
    texts = sorted(set(corpus))
    source = fingerprint(model_dir, pooling, dims, texts, settings)
    folder = cache_dir / f"{model_dir.name}-{source}"
    vectors_file = folder / "vectors.npy"
    if not _valid(folder, source):
        logger.info("distilling a static embedder from %s into %s, fitted on %d texts (once per model and "
                    "corpus; about a minute for MiniLM on 2 cores, plus embedding the corpus)", model_dir, folder,
                    len(texts))
        started = time.perf_counter()
        model = teacher()
        distilled = distill(model, dims=dims)
        vectors = distilled.vectors
        if texts:
            tokens = StaticEmbedder(vectors, model_dir, max_length=max_length, name="fit").token_ids(texts)
            vectors = fit(vectors, tokens, distilled.project(model.embed(texts)), settings)
        seconds = time.perf_counter() - started
        folder.mkdir(parents=True, exist_ok=True)
        # Written under temporary names and renamed: a process killed mid-write leaves no half model behind.
        with tempfile.NamedTemporaryFile(dir=folder, suffix=".npy", delete=False) as tmp:
            np.save(tmp, vectors)
        os.replace(tmp.name, vectors_file)
        meta = {"source": source, "version": STATIC_VERSION, "teacher": str(model_dir), "pooling": pooling,
                "vocabulary": int(vectors.shape[0]), "dims": int(vectors.shape[1]),
                "sif_coefficient": SIF_COEFFICIENT, "fit_texts": len(texts), "fit": settings.key(),
                "seconds": round(seconds, 1)}
        (folder / "meta.json.tmp").write_text(json.dumps(meta, indent=1))
        os.replace(folder / "meta.json.tmp", folder / "meta.json")
    vectors = np.load(vectors_file)
    # The fingerprint in the name keeps another recipe's vectors apart wherever names key them (the eval
    # cache, a saved classifier's embedder check).
    name = f"static-{kind}:{model_dir.name}:{source}"
    logger.info("static embedder %s: %d tokens x %d dims from %s", name, vectors.shape[0], vectors.shape[1], folder)
    return StaticEmbedder(vectors, model_dir, max_length=max_length, name=name)


def fingerprint(model_dir: Path, pooling: str, dims: int, corpus: Sequence[str] = (),
                settings: FitSettings = FIT) -> str:
    """Identifies a static model: the recipe's version, pooling, dims, the teacher's files (names, sizes,
    config.json), and the fit's corpus (its distinct texts) and settings."""
    h = hashlib.sha256(f"static{STATIC_VERSION}:{pooling}:{dims}:{SIF_COEFFICIENT}".encode())
    for f in sorted(model_dir.iterdir()):
        if f.is_file():
            h.update(f.name.encode() + str(f.stat().st_size).encode())
    h.update((model_dir / "config.json").read_bytes())
    texts = sorted(set(corpus))
    if texts:
        h.update(f"fit:{settings.key()}:{len(texts)}".encode())
        for text in texts:
            h.update(hashlib.sha256(text.encode()).digest())
    return h.hexdigest()[:16]


def _valid(folder: Path, source: str) -> bool:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("source") == source and (folder / "vectors.npy").is_file()
