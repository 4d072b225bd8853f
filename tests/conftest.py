"""Shared test setup: an isolated data dir (cached across runs) and offline model loading."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Tests never reach a model hub, and reuse generated models between runs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TIERSERVE_DATA_DIR", str(REPO / ".tierserve" / "test-data"))
