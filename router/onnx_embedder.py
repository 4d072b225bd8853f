"""ONNX Runtime copies of the embedder (fp32, or int8 attention weights): the only module that imports onnxruntime.

Why: on a CPU router the MiniLM forward pass is most of the routing decision (10.6 ms p50 for one query on
this machine, idle); ONNX Runtime runs the same graph in 7.3 ms (fp32, vectors equal to torch's) or
4.7 ms (int8 attention weights). How, so it is the same model:
- export with torch's dynamo exporter (`torch.onnx.export(dynamo=True)`; the legacy tracer produced wrong
  activations for this transformers version), pooling and L2-normalisation inside the graph;
- dynamic int8 quantisation, per output channel, of the attention projections (the square weight
  matrices); the feed-forward matrices stay fp32 (quantising them too gives 3.3 ms instead of 4.7 ms but
  minimum cosine 0.986 and 4% flipped kNN decisions on the shipped exemplars: measured, rejected);
- accepted only if, on the shipped exemplars, every vector has cosine >= `MIN_COSINE` with torch's and a
  leave-one-out kNN over them (the router's own scoring: k=10, similarity weights, boundary 0.5) makes the
  same decision for every exemplar whose torch score is not a near-tie (within `TIE_MARGIN` of the
  boundary). The figures are written beside the model (`check.json`); a cached export is reused only for
  the same source model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from router.embedder import Embedder, FlagEmbedder
from router.scoring import difficulty_from_neighbors

logger = logging.getLogger(__name__)

MIN_COSINE = 0.99
TIE_MARGIN = 0.02


@dataclass(frozen=True)
class OnnxCheck:
    """How the int8 model compares with torch's on a probe set."""

    source: str
    """Fingerprint of the source model (config.json + weights sizes)."""
    n: int
    min_cosine: float
    mean_cosine: float
    same_decisions: float
    """Share of leave-one-out kNN tier decisions that agree, near-ties included."""
    clear_flips: int
    """Decisions that differ although torch's score is more than TIE_MARGIN from the boundary (must be 0)."""

    @property
    def passed(self) -> bool:
        return self.min_cosine >= MIN_COSINE and self.clear_flips == 0


class OnnxEmbedder(Embedder):
    """Embeds with an exported, quantised model; same tokenizer, pooling and normalisation as torch's."""

    def __init__(self, model_file: Path, tokenizer_dir: Path, *, max_length: int, num_threads: int,
                 batch_size: int, dim: int, name: str) -> None:
        import onnxruntime as ort
        from transformers import AutoTokenizer

        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
        self._tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        self._tokenizer_lock = threading.Lock()  # a fast tokenizer shared by two threads can fail
        self._max_length = max_length
        self._batch_size = batch_size
        self.dim = dim
        self.name = name

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        order = np.argsort([-len(t) for t in texts], kind="stable")
        for start in range(0, len(texts), self._batch_size):
            idx = order[start:start + self._batch_size]
            with self._tokenizer_lock:
                enc = self._tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                      max_length=self._max_length, return_tensors="np")
            feeds = {"input_ids": enc["input_ids"].astype(np.int64),
                     "attention_mask": enc["attention_mask"].astype(np.int64)}
            out[idx] = self._session.run(None, feeds)[0]
        return out


def fingerprint(model_dir: Path, pooling: str, max_length: int) -> str:
    h = hashlib.sha256(f"{pooling}:{max_length}".encode())
    for f in sorted(model_dir.iterdir()):
        if f.is_file():
            h.update(f.name.encode() + str(f.stat().st_size).encode())
    h.update((model_dir / "config.json").read_bytes())
    return h.hexdigest()[:16]


def export(torch_embedder: FlagEmbedder, out_dir: Path) -> tuple[Path, Path]:
    """Export `torch_embedder`'s model to ONNX (dynamo exporter) and an int8 copy; returns (fp32, int8)."""
    import onnx
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out_dir.mkdir(parents=True, exist_ok=True)
    encoder = torch_embedder.encoder()
    pooling = torch_embedder.pooling

    class Dense(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            if pooling == "cls":
                vec = hidden[:, 0]
            else:
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                vec = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(vec, dim=-1)

    sample = torch_embedder.tokenize(["a probe sentence for the export", "short"])
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    fp32 = out_dir / "model-fp32.onnx"
    program = torch.onnx.export(
        Dense().eval(), (sample["input_ids"], sample["attention_mask"]), dynamo=True,
        input_names=["input_ids", "attention_mask"], output_names=["dense_vec"],
        dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
    )
    program.save(str(fp32))
    model = onnx.load(str(fp32))
    weights = {i.name: tuple(i.dims) for i in model.graph.initializer}
    keep_fp32 = []
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        shapes = [weights[i] for i in node.input if i in weights]
        # Quantise only the attention projections (square weights); activation x activation products and
        # the feed-forward matrices stay fp32.
        if not shapes or len(shapes[0]) != 2 or shapes[0][0] != shapes[0][1]:
            keep_fp32.append(node.name)
    int8 = out_dir / "model-int8.onnx"
    quantize_dynamic(str(fp32), str(int8), per_channel=True, weight_type=QuantType.QInt8,
                     nodes_to_exclude=keep_fp32)
    return fp32, int8


def compare(reference: Embedder, candidate: Embedder, texts: Sequence[str], difficulty: Sequence[float], *,
            k: int = 10, boundary: float = 0.5, source: str = "") -> OnnxCheck:
    """Cosine of each vector with the reference's, and agreement of leave-one-out kNN decisions."""
    ref = reference.embed(texts)
    got = candidate.embed(texts)
    cosine = np.sum(ref * got, axis=1)
    labels = np.asarray(difficulty, dtype=np.float64)

    def loo_scores(vecs: np.ndarray) -> np.ndarray:
        sims = vecs @ vecs.T
        np.fill_diagonal(sims, -np.inf)
        top = np.argsort(-sims, axis=1)[:, :k]
        return difficulty_from_neighbors(np.take_along_axis(sims, top, axis=1), labels[top],
                                         weighting="similarity", temperature=0.05)

    ref_scores, got_scores = loo_scores(ref), loo_scores(got)
    differ = (ref_scores > boundary) != (got_scores > boundary)
    clear = np.abs(ref_scores - boundary) > TIE_MARGIN
    return OnnxCheck(source=source, n=len(texts), min_cosine=float(cosine.min()),
                     mean_cosine=float(cosine.mean()), same_decisions=float(1 - differ.mean()),
                     clear_flips=int(np.sum(differ & clear)))


def load_or_export(torch_embedder: FlagEmbedder, model_dir: Path, cache_dir: Path, *, precision: str,
                   probe: Sequence[str], probe_difficulty: Sequence[float], max_length: int, num_threads: int,
                   batch_size: int, name: str) -> tuple[OnnxEmbedder | None, OnnxCheck | None]:
    """The ONNX embedder (`precision` fp32 or int8; exported and checked once per source model), or None
    if it failed its check against torch."""
    source = fingerprint(model_dir, torch_embedder.pooling, max_length)
    folder = cache_dir / f"{model_dir.name}-{source}"
    check_file = folder / f"check-{precision}.json"
    model_file = folder / f"model-{precision}.onnx"
    check = None
    if not model_file.is_file():
        logger.info("exporting %s to ONNX in %s (once per model)", model_dir, folder)
        export(torch_embedder, folder)
    elif check_file.is_file():
        check = OnnxCheck(**json.loads(check_file.read_text()))
    embedder = OnnxEmbedder(model_file, model_dir, max_length=max_length, num_threads=num_threads,
                            batch_size=batch_size, dim=torch_embedder.dim, name=name)
    # Same name as the torch model's: a classifier or store built with either accepts the other.
    if check is None:
        check = compare(torch_embedder, embedder, probe, probe_difficulty, source=source)
        check_file.write_text(json.dumps(asdict(check), indent=1))
    if not check.passed:
        logger.warning("%s ONNX embedder rejected (min cosine %.4f, %d clear kNN decisions flipped); using torch",
                       precision, check.min_cosine, check.clear_flips)
        return None, check
    logger.info("%s ONNX embedder: min cosine %.4f, mean %.4f, same kNN decisions %.1f%% (no clear one flipped) "
                "on %d exemplars", precision, check.min_cosine, check.mean_cosine, 100 * check.same_decisions, check.n)
    return embedder, check
