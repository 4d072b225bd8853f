"""LLM-as-judge router: ask the small tier whether a request is hard, read P(hard) from its logprobs.

The small model sees a short yes/no classification prompt and produces one token; instead of trusting the
sampled token, `p_hard` sums the probability mass of every "yes" and every "no" spelling among the top
alternatives of that first token and normalizes over the two. The mechanics are pure and tested here; the
quality of the verdict depends entirely on the model behind `complete`.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

JUDGE_TEMPLATE = (
    "You decide whether a request needs a large, expensive language model or whether a small one will do.\n"
    "A request is hard if it needs multi-step reasoning, math, code, expert knowledge or long careful writing.\n"
    "Is this request hard? Answer yes or no.\n\n"
    "Request:\n{request}\n\n"
    "Answer:"
)
"""The classification prompt; `{request}` is replaced by the (truncated) request text."""

Complete = Callable[[str], Awaitable[Sequence[tuple[str, float]]]]
"""Async call to the small tier: prompt in, top (token, logprob) alternatives of the first generated token out.
Ask for one token at temperature 0 with `top_logprobs` of 5–20."""

_YES = ("yes", "y")
_NO = ("no", "n")


def build_judge_prompt(request: str, *, max_chars: int = 2000) -> str:
    """The judge prompt for `request`; keeps the start and the end of an over-long request."""
    if len(request) > max_chars:
        half = max_chars // 2
        request = f"{request[:half]}\n[...]\n{request[-half:]}"
    return JUDGE_TEMPLATE.format(request=request)


def token_key(token: str) -> str:
    """A token as an answer word: " Yes", "YES", "yes.", "▁Yes" (SentencePiece), "ĠYes" (BPE) all give "yes"."""
    return token.strip().lstrip("\u0120\u2581").strip(" \t\n.,:;!?\"'*`").lower()


def yes_no_mass(
    alternatives: Iterable[tuple[str, float | None]], yes_words: Iterable[str], no_words: Iterable[str]
) -> tuple[float, float]:
    """(probability on yes words, on no words) among one position's top (token, logprob) alternatives.

    Every matching spelling adds its probability; a token listed twice (the sampled one and again among the
    top) counts once; missing or NaN logprobs are skipped. Shared by the judge router and the cascade's
    verification prompt.
    """
    yes_keys = {token_key(w) for w in yes_words}
    no_keys = {token_key(w) for w in no_words}
    seen: set[str] = set()
    yes = no = 0.0
    for token, logprob in alternatives:
        if token in seen or logprob is None or math.isnan(logprob):
            continue
        seen.add(token)
        key = token_key(token)
        if key in yes_keys:
            yes += math.exp(min(logprob, 0.0))
        elif key in no_keys:
            no += math.exp(min(logprob, 0.0))
    return yes, no


@dataclass(frozen=True)
class JudgeVerdict:
    """P(hard) read from one first-token distribution."""

    p_hard: float
    """yes mass / (yes mass + no mass), or the router's fallback when neither appears."""
    answer_mass: float
    """Probability the model put on any yes/no spelling; low means it ignored the format."""
    answered: bool = True
    """False when the call to the model failed (`p_hard` is then the fallback)."""


def p_hard(alternatives: Sequence[tuple[str, float]], *, fallback: float = 0.5) -> JudgeVerdict:
    """Turn the first answer token's top (token, logprob) alternatives into P(hard).

    " Yes", "yes", "YES", "▁Yes", "Yes." all count as yes (likewise no). Different spellings add up. When no
    yes/no spelling is among the alternatives, `p_hard` is `fallback` and `answer_mass` is 0.
    """
    yes, no = yes_no_mass(alternatives, _YES, _NO)
    mass = yes + no
    if mass <= 0.0:
        return JudgeVerdict(fallback, 0.0)
    return JudgeVerdict(yes / mass, min(mass, 1.0))


class JudgeRouter:
    """Scores requests by asking the small tier, through an injected `complete` callable.

    `score()` never raises for a model failure: a failed or off-format call scores `fallback`, so routing
    degrades to "undecided" instead of failing the request.
    """

    def __init__(self, complete: Complete, *, fallback: float = 0.5, max_chars: int = 2000) -> None:
        if not 0.0 <= fallback <= 1.0:
            raise ValueError(f"fallback ({fallback}) must be in [0, 1].")
        self._complete = complete
        self._fallback = fallback
        self._max_chars = max_chars

    async def verdict(self, request: str) -> JudgeVerdict:
        prompt = build_judge_prompt(request, max_chars=self._max_chars)
        try:
            alternatives = await self._complete(prompt)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.warning("judge call failed; scoring %.2f", self._fallback, exc_info=True)
            return JudgeVerdict(self._fallback, 0.0, answered=False)
        return p_hard(alternatives, fallback=self._fallback)

    async def score(self, request: str) -> float:
        """P(hard) in [0, 1] for one request."""
        return (await self.verdict(request)).p_hard

    async def score_many(self, requests: Sequence[str], *, concurrency: int = 8) -> np.ndarray:
        """Scores for many requests, at most `concurrency` calls in flight (for offline evaluation)."""
        gate = asyncio.Semaphore(concurrency)

        async def one(text: str) -> float:
            async with gate:
                return await self.score(text)

        return np.array(await asyncio.gather(*(one(t) for t in requests)), dtype=float)
