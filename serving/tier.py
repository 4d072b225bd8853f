"""The Ray Serve deployment hosting one tier's vLLM engine."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path

from ray import serve

from serving.config import TierConfig
from serving.engine import VllmEngine
from serving.types import EngineLoad, GenerationChunk, GenerationRequest, TierInfo

logger = logging.getLogger(__name__)


class TierServer:
    """One replica of one tier. The ingress streams from `generate` and polls `load`."""

    async def __init__(self, tier: TierConfig, model_path: str, device: str) -> None:
        self.engine = VllmEngine(tier, Path(model_path), device)
        self.engine.start()
        self.replica_id = serve.get_replica_context().replica_id.unique_id

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        # aclosing: a cancelled call aborts the engine request at once, not when the generator is collected.
        async with aclosing(self.engine.generate(request)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def load(self) -> tuple[str, EngineLoad]:
        return self.replica_id, self.engine.load()

    async def info(self) -> TierInfo:
        return self.engine.info()

    async def check_health(self) -> None:
        """Ray Serve restarts a replica whose engine died."""
        await self.engine.check_health()

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
