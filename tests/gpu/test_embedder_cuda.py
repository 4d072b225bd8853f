"""The router's embedder on CUDA in fp16, batched: the same decisions as on CPU.

Run on a machine with a CUDA GPU and torch (no vLLM needed):

    .venv/bin/python -m pytest tests/gpu/test_embedder_cuda.py -m gpu

Skipped, with the reason, where torch sees no CUDA device (the CPU suite checks the refusal there:
tests/unit/test_embedder_device.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from router.config import EmbedderConfig
from router.embed import build_embedder

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_embedder():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine (tests/unit/test_embedder_device.py covers the refusal)")
    return build_embedder(EmbedderConfig(device="cuda", use_fp16=True, batch_size=64))


def test_fp16_on_cuda_matches_fp32_on_cpu(cuda_embedder):
    import torch

    params = list(cuda_embedder.encoder().parameters())
    assert all(p.device.type == "cuda" and p.dtype == torch.float16 for p in params)
    texts = [f"Route request number {i}: summarise the attached contract clause {i}." for i in range(130)]
    got = cuda_embedder.embed(texts)  # three batches of at most 64
    want = build_embedder(EmbedderConfig()).embed(texts)
    assert got.shape == want.shape and got.dtype == np.float32
    assert float(np.min(np.sum(got * want, axis=1))) > 0.999
