"""The arguments and loaders that `eval`, `calibrate`, `train-router` and `report` share: a labelled dataset,
the embedding cache over the configured embedder, and a query-log window."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

ROUTER_CHOICES = ("random", "heuristic", "knn", "classifier")


def dataset_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("--dataset", required=required,
                   help="mmlu, gsm8k, mt-bench, arc-challenge, mbpp, winogrande, or a .csv/.jsonl path")
    p.add_argument("--data-dir", help="shared routing data (default: $TIERSERVE_EVAL_DATA or <repo>/../shared/data)")
    p.add_argument("--config", default=os.environ.get("TIERSERVE_CONFIG"),
                   help="tierserve YAML config; its router.embedder is used (default: the bundled MiniLM), and "
                        "eval also prices the policies in GPU time from its cost.* and resources.num_gpus")
    p.add_argument("--cache-dir", help="embedding cache (default: <tierserve data dir>/eval-cache)")
    p.add_argument("--test-fraction", type=float, default=0.5, help="hash split for sets without one")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--strong-model", help="RouterBench column of the strong model")
    p.add_argument("--weak-model", help="RouterBench column of the weak model")
    for col in ("prompt", "strong", "weak"):
        p.add_argument(f"--{col}-col", default=col, help=f"generic file: column of the {col} (default {col})")
    p.add_argument("--split-col", help="generic file: column holding train/test")
    p.add_argument("--strong-cost-col")
    p.add_argument("--weak-cost-col")
    p.add_argument("--score-max", type=float, default=1.0, help="generic file: divide scores by this")
    p.add_argument("--weak-confidence-col",
                   help="generic file: column of the weak model's confidence in its answer (enables cascades)")
    p.add_argument("--weak-confidence-kind", choices=("prob", "logprob"),
                   help="what --weak-confidence-col holds: a probability or a log-probability (default: inferred)")
    p.add_argument("--cost-ratio", type=float,
                   help="weak/strong cost of one call, for data without cost columns (e.g. 0.114 for 8B vs 70B); "
                        "without it and without cost columns only strong calls are counted")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _load(args):
    from router.eval.datasets import default_data_dir, load_dataset

    data_dir = Path(args.data_dir).expanduser() if args.data_dir else default_data_dir()
    return load_dataset(
        args.dataset, data_dir, test_fraction=args.test_fraction, seed=args.split_seed,
        strong_model=args.strong_model, weak_model=args.weak_model, prompt_col=args.prompt_col,
        strong_col=args.strong_col, weak_col=args.weak_col, split_col=args.split_col,
        strong_cost_col=args.strong_cost_col, weak_cost_col=args.weak_cost_col, score_max=args.score_max,
        weak_confidence_col=args.weak_confidence_col, weak_confidence_kind=args.weak_confidence_kind,
    )


def load_dataset_noting(args):
    """Load `--dataset` and print, on stderr, everything the loader decided on its own."""
    ds = _load(args)
    for note in ds.notices:
        print(f"note: {note}", file=sys.stderr)
    return ds


def embedding_cache(args):
    """The embedding cache over `--config`'s router embedder (default: the bundled MiniLM)."""
    from router.embed import build_embedder, default_embedder
    from router.eval.embcache import EmbeddingCache

    if args.config:
        from serving.config import load_config

        cfg = load_config(args.config)
        embedder = build_embedder(cfg.router.embedder, cfg.resolved_data_dir())
    else:
        embedder = default_embedder()
    return EmbeddingCache(embedder, args.cache_dir)


def querylog_dir(config: str | None) -> Path:
    if not config:
        raise ValueError("give --querylog DIR or --config FILE")
    from serving.config import load_config

    app = load_config(config)
    return app.query_log.resolved_path(app.resolved_data_dir())


def parse_since(value: str | None) -> float | None:
    """'24h', '7d', '30m' back from now, or an ISO date/time."""
    if not value:
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([mhd])", value.strip())
    if m:
        return time.time() - float(m.group(1)) * {"m": 60, "h": 3600, "d": 86_400}[m.group(2)]
    from datetime import UTC, datetime

    parsed = datetime.fromisoformat(value)
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
