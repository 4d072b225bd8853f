"""Export the embedder's torch model to ONNX once per model: fused transformer ops, and an int8 copy.

`router.embed.onnx` runs and checks what this writes; see its docstring for why and for the figures.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from router.embed.flag import FlagEmbedder

logger = logging.getLogger(__name__)

EXPORT_VERSION = 2
"""Bumped when `export` changes, so cached exports of an older kind are made again (2: fused attention)."""


def fingerprint(model_dir: Path, pooling: str, max_length: int) -> str:
    h = hashlib.sha256(f"{EXPORT_VERSION}:{pooling}:{max_length}".encode())
    for f in sorted(model_dir.iterdir()):
        if f.is_file():
            h.update(f.name.encode() + str(f.stat().st_size).encode())
    h.update((model_dir / "config.json").read_bytes())
    return h.hexdigest()[:16]


def export(torch_embedder: FlagEmbedder, out_dir: Path, *, num_threads: int = 1) -> tuple[Path, Path]:
    """Export `torch_embedder`'s model to ONNX with fused transformer ops, and an int8 copy; returns (fp32, int8).

    The graph is traced with eager attention (torch's legacy exporter) so that ONNX Runtime's transformer
    optimizer fuses each layer's attention into one `Attention` op (Q, K and V in one packed product) and its
    layer norms and GELU into `SkipLayerNormalization` / `BiasGelu` (MiniLM: 73 nodes instead of 300; the
    figures are in `router.embed.onnx`'s docstring). If the trace or the fusion fails, or the fused graph
    does not reproduce torch's vectors on the export sample, the dynamo exporter's unfused graph is used
    instead. Those checks run on this process's ONNX Runtime pool (`num_threads` sizes it if none exists yet).
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out_dir.mkdir(parents=True, exist_ok=True)
    dense = _dense_module(torch_embedder.encoder(), torch_embedder.pooling)
    sample = torch_embedder.tokenize(["a probe sentence for the export", "short"])
    fp32 = out_dir / "model-fp32.onnx"
    large = sum(p.numel() for p in dense.parameters()) * 4 > 1_500_000_000  # protobuf's 2 GB limit
    with tempfile.TemporaryDirectory(dir=out_dir) as scratch:
        traced = Path(scratch) / "traced.onnx"
        try:
            _trace_eager(dense, sample, traced)
            _fuse(traced, fp32, dense.encoder.config, external_data=large)
            fused = _same_vectors(fp32, dense, sample, num_threads)
        except Exception:
            logger.exception("tracing or fusing the embedder with eager attention failed")
            fused = False
        if not fused:
            logger.warning("the fused ONNX graph is unusable; exporting the unfused dynamo graph instead")
            _export_dynamo(dense, sample, fp32)
    model = onnx.load(str(fp32))
    weights = {i.name: tuple(i.dims) for i in model.graph.initializer}
    keep_fp32 = []
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        shapes = [weights[i] for i in node.input if i in weights]
        # Quantise only the attention projections (the fused Attention ops' packed QKV, the square output
        # weights); activation x activation products and the feed-forward matrices stay fp32.
        if not shapes or len(shapes[0]) != 2 or shapes[0][0] != shapes[0][1]:
            keep_fp32.append(node.name)
    int8 = out_dir / "model-int8.onnx"
    quantize_dynamic(str(fp32), str(int8), per_channel=True, weight_type=QuantType.QInt8,
                     op_types_to_quantize=["Attention", "MatMul"], nodes_to_exclude=keep_fp32,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},  # fused ops carry no types
                     use_external_data_format=large)
    return fp32, int8


def _dense_module(encoder: Any, pooling: str) -> Any:
    """The encoder with the embedder's pooling and L2-normalisation, as one module to export."""
    import torch

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

    return Dense().eval()


_AXES = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, "dense_vec": {0: "batch"}}


def _trace_eager(dense: Any, sample: Any, path: Path) -> None:
    """Torch's legacy tracer, with the encoder switched to eager attention for the trace (the pattern ONNX
    Runtime's fusion recognises; SDPA's trace is not fused)."""
    import warnings

    import torch

    encoder = dense.encoder
    before = encoder.config._attn_implementation
    try:
        encoder.set_attn_implementation("eager")
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about Python branches on shapes
            torch.onnx.export(dense, (sample["input_ids"], sample["attention_mask"]), str(path), dynamo=False,
                              input_names=["input_ids", "attention_mask"], output_names=["dense_vec"],
                              dynamic_axes=_AXES, opset_version=17)
    finally:
        encoder.set_attn_implementation(before)


def _export_dynamo(dense: Any, sample: Any, path: Path) -> None:
    import torch

    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    program = torch.onnx.export(
        dense, (sample["input_ids"], sample["attention_mask"]), dynamo=True,
        input_names=["input_ids", "attention_mask"], output_names=["dense_vec"],
        dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
    )
    program.save(str(path))


def _same_vectors(path: Path, dense: Any, sample: Any, num_threads: int) -> bool:
    """Whether the ONNX graph at `path` gives torch's vectors on `sample` (a padded batch of two)."""
    import torch

    from router.embed.ort import session as ort_session

    with torch.no_grad():
        want = dense(sample["input_ids"], sample["attention_mask"]).numpy()
    session = ort_session(str(path), num_threads)
    got = session.run(None, {name: sample[name].numpy().astype(np.int64)
                             for name in ("input_ids", "attention_mask")})[0]
    return got.shape == want.shape and float(np.min(np.sum(got * want, axis=1))) > 0.9999


def _fuse(source: Path, target: Path, config: Any, *, external_data: bool) -> None:
    """ONNX Runtime's transformer optimizer (BERT rules, which also cover XLM-R): fused attention, skip layer
    norms and GELU. Patterns it does not recognise stay as they were. Python fusions only (`opt_level=0`):
    ONNX Runtime's own graph optimisations run when a session loads the model, so none is created here."""
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(str(source), model_type="bert", num_heads=int(config.num_attention_heads),
                               hidden_size=int(config.hidden_size), opt_level=0)
    logger.info("fused ONNX graph: %s", {k: v for k, v in optimized.get_fused_operator_statistics().items() if v})
    optimized.save_model_to_file(str(target), use_external_data_format=external_data)
