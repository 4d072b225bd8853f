"""`tierserve` command line: one subcommand per job, each defined next to the code it drives."""

from __future__ import annotations

import argparse
import logging
import sys

from serving.cli import bench, calibrate, eval, exemplars, plan, replay, serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tierserve", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve.register(sub)
    exemplars.register(sub)
    eval.register(sub)
    calibrate.register(sub)
    bench.register(sub)
    plan.register(sub)
    replay.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a CLI reports the error, not a traceback, for known failures
        from router.errors import TierserveError

        if isinstance(exc, TierserveError | ValueError | FileNotFoundError):
            print(f"tierserve: error: {exc}", file=sys.stderr)
            return 2
        raise


