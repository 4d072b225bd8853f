"""`tierserve exemplars ...` subcommands."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the router's subcommands to the `tierserve` parser."""
