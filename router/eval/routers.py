"""Eval-side routers: each scores prompts with a strong-win rate / difficulty in [0, 1] (higher = strong).

They reuse the live router's pieces -- `router.heuristic`, `router.scoring.difficulty_from_neighbors`,
`router.classifier` -- so an evaluated router scores exactly as the deployed one would. Only the kNN
neighbour search differs: an exact numpy matrix product over the train vectors instead of Qdrant.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from router.classifier import DifficultyClassifier
from router.config import HeuristicConfig, KnnConfig
from router.heuristic import HeuristicScorer
from router.judge import Complete, JudgeRouter
from router.scoring import difficulty_from_neighbors

Embed = Callable[[Sequence[str]], np.ndarray]
"""Texts → (n, dim) unit vectors (usually an `EmbeddingCache.embed`)."""


class EvalRouter(Protocol):
    name: str

    def score(self, prompts: Sequence[str]) -> np.ndarray:
        """(n,) scores in [0, 1]; higher means the strong model is more likely needed."""


@dataclass
class RandomRouter:
    """RouteLLM's random baseline: an independent uniform score per prompt, seeded by the prompt text."""

    seed: int = 0
    name: str = "random"

    def score(self, prompts: Sequence[str]) -> np.ndarray:
        out = np.empty(len(prompts))
        for i, p in enumerate(prompts):
            digest = hashlib.sha256(f"{self.seed}\x01{p}".encode()).digest()
            out[i] = int.from_bytes(digest[:8], "big") / 2**64
        return out


@dataclass
class HeuristicRouter:
    """The live heuristic router (length and keyword rules), with its configured or default rules."""

    config: HeuristicConfig = HeuristicConfig()
    name: str = "heuristic"

    def score(self, prompts: Sequence[str]) -> np.ndarray:
        scorer = HeuristicScorer(self.config)
        return np.array([scorer.score(p).score for p in prompts])


def nearest_neighbors(
    queries: np.ndarray, exemplars: np.ndarray, k: int, *, exclude_self: bool = False, chunk: int = 2048
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k cosine neighbours of unit vectors: (similarities, indices), both (n, k), best first.

    `exclude_self` drops each query's own row (queries == exemplars), for leave-one-out scoring on train.
    """
    k_eff = min(k, len(exemplars) - (1 if exclude_self else 0))
    sims_out = np.empty((len(queries), k_eff), dtype=np.float32)
    idx_out = np.empty((len(queries), k_eff), dtype=np.int64)
    for start in range(0, len(queries), chunk):
        sims = queries[start : start + chunk] @ exemplars.T
        if exclude_self:
            rows = np.arange(len(sims))
            sims[rows, start + rows] = -np.inf
        top = np.argpartition(-sims, k_eff - 1, axis=1)[:, :k_eff]
        top_sims = np.take_along_axis(sims, top, axis=1)
        order = np.argsort(-top_sims, axis=1, kind="stable")
        idx_out[start : start + chunk] = np.take_along_axis(top, order, axis=1)
        sims_out[start : start + chunk] = np.take_along_axis(top_sims, order, axis=1)
    return sims_out, idx_out


@dataclass
class KnnRouter:
    """The live kNN router's scoring over train exemplars: k nearest by cosine, labels weighted."""

    embed: Embed
    train_vectors: np.ndarray
    train_labels: np.ndarray
    """Difficulty label per train exemplar in [0, 1] (see `datasets.difficulty_label`)."""
    knn: KnnConfig = KnnConfig()
    name: str = "knn"

    def score(self, prompts: Sequence[str]) -> np.ndarray:
        return self.score_vectors(self.embed(prompts))

    def score_vectors(self, vectors: np.ndarray, *, exclude_self: bool = False) -> np.ndarray:
        sims, idx = nearest_neighbors(vectors, self.train_vectors, self.knn.k, exclude_self=exclude_self)
        return difficulty_from_neighbors(
            sims, self.train_labels[idx], weighting=self.knn.weighting, temperature=self.knn.temperature
        )


@dataclass
class ClassifierRouter:
    """A trained `DifficultyClassifier` over the embedder's vectors (and its text features)."""

    embed: Embed
    classifier: DifficultyClassifier
    name: str = "classifier"

    def score(self, prompts: Sequence[str]) -> np.ndarray:
        return self.classifier.predict_difficulty(self.embed(prompts), texts=prompts)


@dataclass
class JudgeEvalRouter:
    """The LLM-as-judge router over an async `complete` (e.g. `openai_complete` against the small tier)."""

    complete: Complete
    concurrency: int = 8
    name: str = "judge"

    def score(self, prompts: Sequence[str]) -> np.ndarray:
        import asyncio

        return asyncio.run(JudgeRouter(self.complete).score_many(prompts, concurrency=self.concurrency))


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
