"""Shared test setup: an isolated data dir (cached across runs) and offline model loading."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Tests never reach a model hub, and reuse generated models between runs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TIERSERVE_DATA_DIR", str(REPO / ".tierserve" / "test-data"))


def pytest_collection_modifyitems(config, items) -> None:  # noqa: ANN001
    """End-to-end tests last: their session-wide stack holds the Ray cluster until the session ends."""
    items.sort(key=lambda item: "tests/e2e/" in str(item.fspath).replace("\\", "/"))
