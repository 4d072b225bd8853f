"""Evaluation-only scoring: the LLM judge over an OpenAI-compatible endpoint.

Every other router `tierserve eval` scores is the serving code itself (`router.scoring`): the heuristic, the
classifier and kNN, the latter over a `MatrixIndex` of the train split instead of the store.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from router.judge import Complete, JudgeRouter
from router.scoring import Scores


@dataclass
class JudgeEvalRouter:
    """The LLM-as-judge router over an async `complete` (e.g. `openai_complete` against the small tier)."""

    complete: Complete
    concurrency: int = 8
    kind: str = "judge"

    def score(self, texts: Sequence[str]) -> Scores:
        import asyncio

        values = asyncio.run(JudgeRouter(self.complete).score_many(texts, concurrency=self.concurrency))
        return Scores(np.asarray(values, dtype=float), tuple(f"judge: P(hard) {v:.3f}" for v in values))


def openai_complete(base_url: str, model: str, *, api_key: str | None = None, top_logprobs: int = 20,
                    timeout_s: float = 60.0, transport=None) -> Complete:
    """A `Complete` that asks an OpenAI-compatible `/v1/completions` endpoint for one token at temperature 0
    and returns the top alternatives of that token (the legacy `logprobs.top_logprobs[0]` mapping)."""
    import httpx

    url = base_url.rstrip("/") + "/v1/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def complete(prompt: str) -> list[tuple[str, float]]:
        body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0, "logprobs": top_logprobs}
        async with httpx.AsyncClient(timeout=timeout_s, transport=transport) as client:
            response = await client.post(url, json=body, headers=headers)
        response.raise_for_status()
        top = response.json()["choices"][0]["logprobs"]["top_logprobs"][0]
        return list(top.items())

    return complete
