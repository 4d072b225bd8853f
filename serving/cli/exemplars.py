"""`tierserve exemplars import|list|delete|count|versions|rollback`: manage the router's labelled exemplars.

Every write is a store version; `versions` lists them and `rollback V` serves what version V held (as a new
version, so history is kept). A router serving the store follows the switch within `router.store.refresh_s`
(a Qdrant server), or when it reopens its embedded store after `POST /admin/router/release-store`.

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

    ver = ex_sub.add_parser("versions", help="list the store's versions (the active one marked *)")
    ver.add_argument("--json", action="store_true", help="one JSON object per version")
    common(ver)
    ver.set_defaults(func=_versions)

    rb = ex_sub.add_parser("rollback", help="serve what version V held, as a new version (no restart)")
    rb.add_argument("version", type=int, help="the version to restore (see `tierserve exemplars versions`)")
    common(rb)
    rb.set_defaults(func=_rollback)


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


def _versions(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    store = _open_store(_load(args.config))
    try:
        versions, active = store.versions(), store.active
    finally:
        store.close()
    if args.json:
        for v in versions:
            print(json.dumps({**v.to_payload(), "active": v.version == active}))
        return 0
    if not versions:
        print("the store has no versions yet (it is empty)")
        return 0
    print(f"{'':2}{'version':>7}  {'parent':>6}  {'kind':<8}  {'exemplars':>9}  {'created (UTC)':<19}  note")
    for v in versions:
        created = datetime.fromtimestamp(v.created_at, UTC).strftime("%Y-%m-%d %H:%M:%S")
        mark = "*" if v.version == active else " "
        print(f"{mark:2}{v.version:>7}  {v.parent:>6}  {v.kind:<8}  {v.size if v.size is not None else '-':>9}  "
              f"{created:<19}  {v.note}")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    store = _open_store(cfg)
    try:
        record = store.rollback(args.version)
    finally:
        store.close()
    print(f"version {record.version} now serves what version {args.version} held ({record.size} exemplars); "
          f"a serving router follows within router.store.refresh_s ({cfg.router.store.refresh_s:g} s) on a Qdrant "
          "server, or when it reopens an embedded store")
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
