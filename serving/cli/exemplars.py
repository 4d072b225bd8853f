"""`tierserve exemplars import|list|delete|count`: manage the router's labelled exemplars.

These open the store named by the config. Embedded Qdrant allows one process per folder, so while the router
is serving they fail with a clear message: use the admin endpoint, stop the router, or run a Qdrant server.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router.store import ExemplarStore
    from serving.config import AppConfig

DEFAULT_CONFIG = "deploy/cpu.yaml"


def register(sub: argparse._SubParsersAction) -> None:
    """Add the router's subcommands to the `tierserve` parser."""
    parser = sub.add_parser("exemplars", help="manage the router's labelled exemplars")
    ex_sub = parser.add_subparsers(dest="exemplars_command", required=True, metavar="ACTION")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config",
            default=os.environ.get("TIERSERVE_CONFIG", DEFAULT_CONFIG),
            help=f"tierserve YAML config (default: $TIERSERVE_CONFIG or {DEFAULT_CONFIG})",
        )

    imp = ex_sub.add_parser("import", help="embed and store exemplars from a .jsonl or .csv file (idempotent)")
    imp.add_argument("file", help="a .jsonl or .csv file")
    imp.add_argument("--text-column", default="text", help="column holding the prompt (default: text)")
    imp.add_argument("--tier-column", default="tier", help="column holding the label (default: tier)")
    imp.add_argument(
        "--label-map",
        nargs="*",
        metavar="VALUE=TIER",
        help="turn label values into tiers, e.g. --label-map 0=small 1=large",
    )
    imp.add_argument("--category-column", help="optional column with a task category")
    imp.add_argument("--source", help="source tag stored with each exemplar (default: the file name)")
    common(imp)
    imp.set_defaults(func=_import)

    lst = ex_sub.add_parser("list", help="print stored exemplars as JSON lines")
    lst.add_argument("--tier")
    lst.add_argument("--source")
    lst.add_argument("--limit", type=int, default=20)
    common(lst)
    lst.set_defaults(func=_list)

    dele = ex_sub.add_parser("delete", help="delete exemplars by id, source and/or tier, or all")
    dele.add_argument("--id", dest="ids", nargs="*", default=[], help="point ids (as shown by list)")
    dele.add_argument("--source")
    dele.add_argument("--tier")
    dele.add_argument("--all", action="store_true", help="empty the collection")
    common(dele)
    dele.set_defaults(func=_delete)

    cnt = ex_sub.add_parser("count", help="count stored exemplars, per tier label")
    common(cnt)
    cnt.set_defaults(func=_count)


def _import(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from router.core import Router
    from router.embed import build_embedder
    from router.exemplars import parse_label_map, read_exemplars

    cfg = _load(args.config)
    exemplars = read_exemplars(
        args.file,
        text_column=args.text_column,
        tier_column=args.tier_column,
        label_map=parse_label_map(args.label_map),
        category_column=args.category_column,
        source=args.source,
    )
    store = _open_store(cfg)
    try:
        embedder = build_embedder(cfg.router.embedder, cfg.resolved_data_dir())
        router = Router(cfg.router, cfg.tier_names, embedder=embedder, store=store)
        before = store.count()
        with tqdm(total=len(exemplars), unit="ex", desc="embedding") as bar:
            router.add_exemplars(exemplars, progress=bar.update)
        after = store.count()
    finally:
        store.close()
    print(f"read {len(exemplars)} exemplars from {args.file}; store now holds {after} ({after - before:+d})")
    return 0


def _list(args: argparse.Namespace) -> int:
    store = _open_store(_load(args.config))
    try:
        for item in store.list(limit=args.limit, tier=args.tier, source=args.source):
            ex = item.exemplar
            row = {"id": item.id, "tier": ex.tier, "source": ex.source, "category": ex.category, "text": ex.text}
            print(json.dumps(row, ensure_ascii=False))
    finally:
        store.close()
    return 0


def _delete(args: argparse.Namespace) -> int:
    if not (args.ids or args.source or args.tier or args.all):
        raise ValueError("exemplars delete needs --id, --source, --tier or --all.")
    store = _open_store(_load(args.config))
    try:
        removed = store.delete(ids=args.ids, source=args.source, tier=args.tier, everything=args.all)
        print(f"deleted {removed} exemplars; {store.count()} remain")
    finally:
        store.close()
    return 0


def _count(args: argparse.Namespace) -> int:
    store = _open_store(_load(args.config))
    try:
        counts = store.counts_by_tier()
        print(json.dumps({"total": sum(counts.values()), "by_tier": counts, "store": store.location}))
    finally:
        store.close()
    return 0


def _load(path: str) -> AppConfig:
    from serving.config import load_config

    return load_config(path)


def _open_store(cfg: AppConfig) -> ExemplarStore:
    from router.embed import embedder_dim
    from router.store import ExemplarStore

    return ExemplarStore.open(
        cfg.router.store, dim=embedder_dim(cfg.router.embedder), data_dir=cfg.resolved_data_dir(),
        vector_space=cfg.router.embedder.vector_space,
    )
