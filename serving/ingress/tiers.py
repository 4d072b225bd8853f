"""The ingress's view of the tier deployments: streaming calls, readiness and a cached load view."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping

from ray.serve.handle import DeploymentHandle

from serving.capacity import combine_loads
from serving.types import EngineLoad, GenerationChunk, GenerationRequest, GenerationResult, TierInfo

logger = logging.getLogger(__name__)


class TierClient:
    """Calls into the tier deployments. Load is polled in the background, never per request."""

    def __init__(self, handles: Mapping[str, DeploymentHandle], *, poll_interval_s: float = 0.25) -> None:
        self.handles = dict(handles)
        self.names = list(handles)
        self.poll_interval_s = poll_interval_s
        self._loads: dict[str, dict[str, EngineLoad]] = {name: {} for name in self.names}
        self._poller: asyncio.Task | None = None
        self._refreshing: set[str] = set()

    async def stream(self, tier: str, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream a tier's chunks; leaving early cancels the call, which aborts the engine request."""
        gen = self.handles[tier].options(stream=True).generate.remote(request)
        done = False
        try:
            async for chunk in gen:
                yield chunk
            done = True
        finally:
            if not done:
                gen.cancel()

    async def generate(self, tier: str, request: GenerationRequest) -> GenerationResult:
        return GenerationResult.from_chunks([c async for c in self.stream(tier, request)])

    async def info(self, tier: str, timeout_s: float = 2.0) -> TierInfo | None:
        """The tier's info, or None while it has no ready replica."""
        try:
            info = await asyncio.wait_for(self.handles[tier].info.remote(), timeout_s)
        except Exception:  # starting, restarting or gone: not ready
            return None
        return info

    # ---- load -------------------------------------------------------------------------------

    def start_polling(self) -> None:
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll_forever())

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.gather(*(self._poll(name) for name in self.names), return_exceptions=True)
            await asyncio.sleep(self.poll_interval_s)

    def refresh_soon(self, tier: str) -> None:
        """Re-poll a tier after a request on it ends, so a drained tier stops looking busy at once.

        Off the request path (a background task), and at most one refresh per tier at a time.
        """
        if tier in self._refreshing:
            return
        self._refreshing.add(tier)

        async def refresh() -> None:
            try:
                await self._poll(tier)
            finally:
                self._refreshing.discard(tier)

        asyncio.get_running_loop().create_task(refresh())

    async def _poll(self, tier: str) -> None:
        try:
            replica_id, load = await asyncio.wait_for(self.handles[tier].load.remote(), 2.0)
        except Exception as exc:  # a replica starting or restarting: keep the last view, it ages out
            logger.debug("load poll of %s failed: %s", tier, exc)
            return
        held = self._loads[tier].get(replica_id)
        if held is None or load.timestamp >= held.timestamp:  # a slow reply never overwrites a newer one
            self._loads[tier][replica_id] = load

    def loads(self, max_age_s: float = 5.0) -> dict[str, EngineLoad]:
        """Per tier, its replicas' loads reported within max_age_s, combined (tiers with none omitted)."""
        now = time.time()
        result = {}
        for tier, by_replica in self._loads.items():
            fresh = [ld for ld in by_replica.values() if now - ld.timestamp <= max_age_s]
            if fresh:
                result[tier] = combine_loads(fresh)
        return result
