"""`tierserve eval / calibrate / train-router / report` subcommands."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the evaluation subcommands to the `tierserve` parser."""
