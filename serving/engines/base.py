"""The engine seam: what a tier replica needs from an inference engine.

`VllmEngine` (serving.engines.vllm) is the real one; `ScriptedEngine` (serving.engines.scripted) emits
tokens at a fixed rate without a model, so benchmarks can measure the plumbing's own ceiling and
integration tests can drive the real Serve app below the e2e level. A tier deployment takes the class
as `engine_cls=`, as Ray Serve LLM's `LLMServer` does.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path

from router.errors import InvalidRequest, TierserveError
from serving.config import TierConfig
from serving.types import (
    EngineLoad,
    GenerationChunk,
    GenerationRequest,
    SamplingOptions,
    TierInfo,
)


class EngineError(TierserveError):
    """The engine failed on a request, or cannot start (a 500; the message names the tier)."""


def prompt_too_long(prompt_tokens: int, max_tokens: int, max_model_len: int, tier: str) -> InvalidRequest:
    """OpenAI's context-length error, naming both numbers."""
    return InvalidRequest(
        f"This model's maximum context length is {max_model_len} tokens (tier '{tier}'). However, you "
        f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in "
        "the completion). Please reduce the length of the messages or completion.",
        param="messages",
        code="context_length_exceeded",
    )


class Engine(ABC):
    """One engine serving one tier inside one replica."""

    def __init__(self, tier: TierConfig, model_path: Path, device: str) -> None:
        self.tier = tier
        self.model_path = model_path
        self.device = device

    @abstractmethod
    def start(self) -> None:
        """Load the model; raise a TierserveError naming the problem if it cannot."""

    @abstractmethod
    def info(self) -> TierInfo: ...

    @abstractmethod
    def load(self) -> EngineLoad:
        """Live load (running, waiting, KV-cache use) for capacity routing."""

    @abstractmethod
    async def check_health(self) -> None:
        """Raise if the engine is dead (Ray Serve then restarts the replica)."""

    @abstractmethod
    def generate(self, request: GenerationRequest, *, whole: bool = False) -> AsyncIterator[GenerationChunk]:
        """Stream typed deltas; the last has `finish_reason`. With `whole`, one chunk holding the whole answer
        (the engine may then skip per-step work). Closing the iterator early aborts the request.

        Raises a `ClientError` (before the first chunk) for a request the engine refuses.
        """

    async def warmup(self) -> None:
        """Run the paths a first request would pay for (e.g. logprobs), before the replica reports ready."""
        request = GenerationRequest(
            request_id=f"warmup-{self.tier.name}",
            sampling=SamplingOptions(max_tokens=2, temperature=0.0, logprobs=True, top_logprobs=20),
            prompt="Warm up.",
        )
        for whole in (True, False):  # the first call compiles, the second settles
            async with aclosing(self.generate(request, whole=whole)) as chunks:
                async for _ in chunks:
                    pass

    @abstractmethod
    def shutdown(self) -> None: ...
