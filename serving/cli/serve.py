"""`tierserve up` and `tierserve models tiny`."""

from __future__ import annotations

import argparse
import signal
import threading
import time

DEFAULT_CONFIG = "deploy/cpu.yaml"


def register(sub: argparse._SubParsersAction) -> None:
    up = sub.add_parser("up", help="start a local Ray cluster (or join one) and the tierserve app; Ctrl-C stops it")
    up.add_argument("--config", default=DEFAULT_CONFIG, help=f"tierserve YAML (default: {DEFAULT_CONFIG})")
    up.add_argument(
        "--address",
        help="join this existing Ray cluster (e.g. auto, 10.0.0.5:6379) instead of starting a local one; "
        "overrides ray.address. Tiers go where their resources.custom / node_labels say; Ctrl-C removes only the app",
    )
    up.add_argument("--no-tiny", action="store_true", help="do not generate missing tiny models")
    up.set_defaults(func=cmd_up)

    models = sub.add_parser("models", help="model utilities")
    models_sub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    tiny = models_sub.add_parser("tiny", help="generate the tiny random-weight test models (offline, idempotent)")
    tiny.add_argument("outdir", nargs="?", help="output folder (default: <data_dir>/models)")
    tiny.add_argument("--force", action="store_true", help="regenerate even if present")
    tiny.set_defaults(func=cmd_models_tiny)

    check = sub.add_parser("config", help="validate a config file and print it resolved")
    check.add_argument("config", help="tierserve YAML")
    check.set_defaults(func=cmd_config)


def cmd_models_tiny(args: argparse.Namespace) -> int:
    from serving.config import default_data_dir
    from serving.models.tiny import generate_tiny_models

    outdir = args.outdir or default_data_dir() / "models"
    for name, path in generate_tiny_models(outdir, force=args.force).items():
        print(f"{name}: {path}")
    return 0


def ensure_tiny_models(config) -> None:  # noqa: ANN001
    """Generate the tiny models a config points at (paths named tiny-small / tiny-large) if missing."""
    from serving.models.tiny import TINY_MODELS, generate_tiny_models, is_complete

    tiny_names = {f"tiny-{spec.name}" for spec in TINY_MODELS}
    for tier in config.tiers:
        path = config.model_path(tier)
        if path.name in tiny_names and not is_complete(path):
            print(f"generating tiny models in {path.parent} ...")
            generate_tiny_models(path.parent)


def cmd_up(args: argparse.Namespace) -> int:
    from serving import launch
    from serving.config import load_config

    config = load_config(args.config)
    if args.address:
        config = config.model_copy(update={"ray": config.ray.model_copy(update={"address": args.address})})
    joined = config.ray.address is not None
    if not args.no_tiny and not joined:  # a cluster's nodes hold their own model folders
        ensure_tiny_models(config)
    started = time.perf_counter()
    where = f"on the Ray cluster at {config.ray.address}" if joined else "on a local Ray cluster"
    print(f"starting tierserve ({len(config.tiers)} tiers: {', '.join(config.tier_names)}) {where} ...", flush=True)
    url = launch.start(config)
    print(f"tierserve is ready at {url}/v1 (started in {time.perf_counter() - started:.0f} s). Ctrl-C stops it.")
    print(f"  try: curl {url}/v1/chat/completions -H 'content-type: application/json' "
          "-d '{\"model\": \"auto\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}'", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    print("stopping ...")
    launch.stop(app_only=joined)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from serving.config import load_config

    config = load_config(args.config)
    print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return 0
