"""ONNX Runtime copies of the embedder (fp32, or int8 attention weights): run, checked against torch, cached.

onnxruntime itself is imported in `router.embed.ort` (one process-wide pool), the kNN on that pool is
`router.knn.OnnxSearch`, and the one-time export and quantisation `router.embed.onnx_export`.

Why: on a CPU router the MiniLM forward pass is most of the routing decision (10.6 ms p50 for one query on
this machine, idle, in torch). ONNX Runtime runs the same model in 4.3-5 ms with fused transformer ops (fp32,
vectors equal to torch's; the unfused graph of torch's dynamo exporter took 5-5.7 ms, measured side by side).
How, so it is the same model:
- trace with eager attention (torch's legacy exporter), pooling and L2-normalisation inside the graph, and let
  ONNX Runtime's transformer optimizer fuse each layer (`Attention`, `SkipLayerNormalization`, `BiasGelu`:
  73 nodes instead of 300); if the trace or the fusion fails, or the fused graph does not give torch's
  vectors on the export sample, the dynamo exporter's unfused graph is used instead;
- dynamic int8 quantisation, per output channel, of the attention projections (the fused QKV product and
  the square output weights); the feed-forward matrices stay fp32 (quantising them too is 1.7x faster but
  gives minimum cosine 0.979-0.986, below `MIN_COSINE`, and a re-check band over half of the shipped
  exemplars; quantising only the feed-forward layers that hurt least still flips clear decisions and needs
  a band over a third of them: measured, rejected);
- accepted only if, on the shipped exemplars, every vector has cosine >= `MIN_COSINE` with torch's and a
  leave-one-out kNN over them (the router's own scoring: k=10, similarity weights, boundary 0.5; queries
  embedded by the candidate, exemplars by torch, as the store holds exact vectors) makes the same decisions.
  fp32 must not flip any decision whose torch score is not a near-tie (within `TIE_MARGIN` of the
  boundary). int8 alone does flip some (score errors up to ~0.16), so it serves only with a re-check
  (`router.embed.RecheckEmbedder`): texts whose int8 score is within a margin of a boundary are
  re-embedded exactly. The margin is `RECHECK_FACTOR` x the largest int8 score error on the probe (at least
  `RECHECK_FLOOR`); the check then requires zero flipped decisions with the re-check, and at most
  `MAX_RECHECK_SHARE` of the probe inside the band (a wider band would make the exact model the common
  path). The figures are written beside the model (`check-<precision>.json`); a cached export and check
  are reused only for the same source model.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from router.config import KnnConfig
from router.embed.base import Embedder, near_boundary
from router.embed.flag import FlagEmbedder
from router.embed.ort import pool_threads, session
from router.knn import OnnxSearch, Search, nearest_neighbors
from router.scoring import KnnRouter, MatrixIndex, tiers_for_scores

logger = logging.getLogger(__name__)

MIN_COSINE = 0.99
TIE_MARGIN = 0.02
RECHECK_FACTOR = 1.5
"""Re-check margin = this x the largest |int8 - torch| leave-one-out score error on the probe."""
RECHECK_FLOOR = 0.02
"""Smallest re-check margin."""
MAX_RECHECK_SHARE = 0.5
"""Most of the probe that may fall inside the re-check band; beyond it the fast path is not the common one."""


@dataclass(frozen=True)
class OnnxCheck:
    """How an ONNX copy compares with torch's model on a probe set (leave-one-out kNN, boundary 0.5)."""

    source: str
    """Fingerprint of the source model (config.json + weights sizes)."""
    n: int
    min_cosine: float
    mean_cosine: float
    same_decisions: float
    """Share of leave-one-out kNN tier decisions taken on this model's vectors alone that agree, near-ties
    included."""
    clear_flips: int
    """Decisions on this model's vectors alone that differ although torch's score is more than TIE_MARGIN
    from the boundary."""
    max_score_error: float
    """Largest |candidate - torch| leave-one-out score."""
    recheck_margin: float = 0.0
    """Half-width of the band around a boundary where the exact model re-decides; 0: no re-check."""
    recheck_share: float = 0.0
    """Share of the probe whose candidate score fell inside the band."""
    flips_after_recheck: int = 0
    """Decisions that differ from torch's once in-band texts are re-decided by the exact model (must be 0)."""

    def problems(self) -> list[str]:
        """Why this copy must not serve; empty when it passed."""
        found = []
        if self.min_cosine < MIN_COSINE:
            found.append(f"min cosine {self.min_cosine:.4f} < {MIN_COSINE}")
        if self.recheck_margin == 0 and self.clear_flips:
            found.append(f"{self.clear_flips} clear kNN decisions flipped")
        if self.recheck_margin > 0 and self.flips_after_recheck:
            found.append(f"{self.flips_after_recheck} kNN decisions flipped despite the re-check")
        if self.recheck_share > MAX_RECHECK_SHARE:
            found.append(f"re-check band +-{self.recheck_margin:.3f} holds {100 * self.recheck_share:.0f}% of the "
                         f"probe (> {100 * MAX_RECHECK_SHARE:.0f}%)")
        return found

    @property
    def passed(self) -> bool:
        return not self.problems()


def recheck_margin(reference_scores: np.ndarray, candidate_scores: np.ndarray, *,
                   factor: float = RECHECK_FACTOR, floor: float = RECHECK_FLOOR) -> float:
    """The re-check band's half-width: `factor` x the largest score error, at least `floor`."""
    error = np.abs(np.asarray(candidate_scores, np.float64) - np.asarray(reference_scores, np.float64))
    return max(floor, factor * float(np.max(error, initial=0.0)))


class Tokenizer:
    """A Hugging Face fast tokenizer's own Rust core, set up to pad and truncate as `tokenizer(texts, padding=True,
    truncation=True, max_length=...)` would: the same ids (tested), a fifth of the time (0.09 against 0.4 ms
    for one text)."""

    def __init__(self, tokenizer_dir: Path, max_length: int) -> None:
        from transformers import AutoTokenizer

        hf_tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        self._tokenizer = hf_tokenizer.backend_tokenizer
        self._tokenizer.enable_truncation(max_length)
        self._tokenizer.enable_padding(pad_id=hf_tokenizer.pad_token_id, pad_token=hf_tokenizer.pad_token)
        self._lock = threading.Lock()  # a fast tokenizer shared by two threads can fail

    def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """input_ids and attention_mask, (n, longest) int64, as the exported model takes them."""
        with self._lock:
            encodings = self._tokenizer.encode_batch(list(texts))
        return {"input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64)}


class OnnxEmbedder(Embedder):
    """Embeds with an exported, quantised model; same tokenizer, pooling and normalisation as torch's."""

    def __init__(self, model_file: Path, tokenizer_dir: Path, *, max_length: int, num_threads: int,
                 batch_size: int, dim: int, name: str) -> None:
        self._session = session(str(model_file), num_threads)
        self._tokenize = Tokenizer(tokenizer_dir, max_length)
        self._search: Search | None = None
        self._batch_size = batch_size
        self.dim = dim
        self.name = name

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        order = np.argsort([-len(t) for t in texts], kind="stable")
        for start in range(0, len(texts), self._batch_size):
            idx = order[start:start + self._batch_size]
            out[idx] = self._session.run(None, self._tokenize([texts[i] for i in idx]))[0]
        return out

    def neighbor_search(self) -> Search:
        """`OnnxSearch` on the shared pool (one per embedder); numpy's where sessions have pools of their own."""
        if not pool_threads():
            return nearest_neighbors
        if self._search is None:
            self._search = OnnxSearch()
        return self._search



def compare(reference: Embedder, candidate: Embedder, texts: Sequence[str], difficulty: Sequence[float], *,
            k: int = 10, boundary: float = 0.5, source: str = "",
            recheck_with: Embedder | None = None) -> OnnxCheck:
    """Cosine of each vector with the reference's, and agreement of leave-one-out kNN decisions.

    Queries are embedded by `candidate`, the exemplars they are compared with by `reference` (the store holds
    exact vectors). With `recheck_with` (the exact embedder that will serve re-checks) the band is derived and
    the decisions re-checked inside it are compared too.
    """
    ref = reference.embed(texts)
    got = candidate.embed(texts)
    cosine = np.sum(ref * got, axis=1)
    labels = np.asarray(difficulty, dtype=np.float64)

    knn = KnnRouter(reference.embed, MatrixIndex(ref, labels, exclude_self=True),
                    KnnConfig(k=k, weighting="similarity", temperature=0.05))

    def loo_scores(queries: np.ndarray) -> np.ndarray:
        return knn.score_vectors(queries).values

    ref_scores, got_scores = loo_scores(ref), loo_scores(got)
    ref_tiers = tiers_for_scores(ref_scores, (boundary,))
    differ = ref_tiers != tiers_for_scores(got_scores, (boundary,))
    clear = np.abs(ref_scores - boundary) > TIE_MARGIN
    margin = share = 0.0
    flips_after = int(differ.sum())
    if recheck_with is not None:
        exact_scores = ref_scores if recheck_with is reference else loo_scores(recheck_with.embed(texts))
        margin = recheck_margin(ref_scores, got_scores)
        band = near_boundary(got_scores, [(boundary,)] * len(texts), margin)
        final = np.where(band, exact_scores, got_scores)
        share = float(band.mean())
        flips_after = int(np.sum(tiers_for_scores(final, (boundary,)) != ref_tiers))
    return OnnxCheck(source=source, n=len(texts), min_cosine=float(cosine.min()),
                     mean_cosine=float(cosine.mean()), same_decisions=float(1 - differ.mean()),
                     clear_flips=int(np.sum(differ & clear)),
                     max_score_error=float(np.max(np.abs(got_scores - ref_scores))),
                     recheck_margin=margin, recheck_share=share, flips_after_recheck=flips_after)


def load_or_export(torch_embedder: FlagEmbedder, model_dir: Path, cache_dir: Path, *, precision: str,
                   probe: Sequence[str], probe_difficulty: Sequence[float], max_length: int, num_threads: int,
                   batch_size: int, name: str,
                   recheck_with: Embedder | None = None) -> tuple[OnnxEmbedder | None, OnnxCheck | None]:
    """The ONNX embedder (`precision` fp32 or int8; exported and checked once per source model), or None
    if it failed its check against torch. With `recheck_with` the check derives and tests a re-check band
    (`OnnxCheck.recheck_margin`) for serving it behind that exact embedder."""
    # torch's and ONNX Runtime's exporters load only where a model is exported
    from router.embed.onnx_export import export, fingerprint

    source = fingerprint(model_dir, torch_embedder.pooling, max_length)
    folder = cache_dir / f"{model_dir.name}-{source}"
    check_file = folder / f"check-{precision}.json"
    model_file = folder / f"model-{precision}.onnx"
    check = None
    if not model_file.is_file():
        logger.info("exporting %s to ONNX in %s (once per model)", model_dir, folder)
        export(torch_embedder, folder, num_threads=num_threads)
    elif check_file.is_file():
        check = _cached_check(check_file, recheck=recheck_with is not None)
    embedder = OnnxEmbedder(model_file, model_dir, max_length=max_length, num_threads=num_threads,
                            batch_size=batch_size, dim=torch_embedder.dim, name=name)
    # Same name as the torch model's: a classifier or store built with either accepts the other.
    if check is None:
        check = compare(torch_embedder, embedder, probe, probe_difficulty, source=source, recheck_with=recheck_with)
        check_file.write_text(json.dumps(asdict(check), indent=1))
    if problems := check.problems():
        logger.warning("%s ONNX embedder rejected (%s; figures in %s); using the exact model",
                       precision, "; ".join(problems), check_file)
        return None, check
    logger.info("%s ONNX embedder: min cosine %.4f, mean %.4f, same kNN decisions %.1f%% on its own vectors "
                "(%d clear flips) on %d exemplars", precision, check.min_cosine, check.mean_cosine,
                100 * check.same_decisions, check.clear_flips, check.n)
    if check.recheck_margin > 0:
        logger.info("%s ONNX embedder re-check band +-%.3f around each boundary: %.0f%% of the exemplars re-embedded "
                    "exactly, %d decisions differ from torch's with it", precision, check.recheck_margin,
                    100 * check.recheck_share, check.flips_after_recheck)
    return embedder, check


def _cached_check(check_file: Path, *, recheck: bool) -> OnnxCheck | None:
    """The stored check, or None (check again) if it predates a field or lacks the re-check band asked for."""
    try:
        check = OnnxCheck(**json.loads(check_file.read_text()))
    except (TypeError, ValueError):
        return None
    if recheck and check.recheck_margin == 0:
        return None
    return check
